"""Benchmarks: analytic FLOPs, latency, output agreement; each prints a table and writes JSON."""
