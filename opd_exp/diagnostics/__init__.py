"""Diagnostics maths: token overlap (tokens.py) and parameter-space geometry (geometry.py) — pure functions on tensors."""
