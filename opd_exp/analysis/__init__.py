"""Analysis of finished runs: paper-shaped tables and plots from run directories."""
