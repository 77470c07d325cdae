"""Experts over time: feedback and retraining, split/merge/rename/optimize, tuning the embedder, and
declarative YAML expert folders."""
