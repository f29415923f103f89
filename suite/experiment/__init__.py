"""Experiments: configuration, data, one cell, the matrix of cells, the results store, pre-flight checks, utility."""
