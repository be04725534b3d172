"""The runtime layer: joining a job's ranks (distributed, launcher), atomic checkpoints, metric
loggers (jsonl, W&B — wandb is imported only in loggers.py) and plots."""
