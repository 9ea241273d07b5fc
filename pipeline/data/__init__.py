"""Datasets: the catalog of names, readers by file kind, the Arrow cache, and D4RL downloads."""
