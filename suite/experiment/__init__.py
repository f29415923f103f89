"""Experiments: configuration, data, one cell, the matrix (plan: sweeps into cells; run: one training group;
schedule: local, worker processes, Ray; seeds: pooling), the results store, pre-flight checks, utility."""
