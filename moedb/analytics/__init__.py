"""Load analytics: per-expert load, imbalance, latency and load over time from the query log."""
