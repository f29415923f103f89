"""Split training across processes and machines: gRPC with mutual TLS, checkpoints, certificates."""
