"""Measurement and stress harnesses: step-time/throughput benchmarks, the audit benchmark, kill chaos, wire fuzzing."""
