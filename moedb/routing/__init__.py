"""Pure NumPy / hnswlib routing core: no database I/O in this package."""
