"""Micro-benchmarks of single CPU kernels and products, outside the engine."""
