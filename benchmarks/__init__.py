"""Plait's benchmarks: scripts that print a table with the baseline measured in the same run.

Run each as a module from the repository root (``python -m benchmarks.offline --help``).
``harness`` holds what they share: the seeded workloads, the one definition of each rate, the
alternating order of rounds, medians and the ratio table. This package imports nothing itself,
so the peer workers can run from virtualenvs without Plait (``benchmarks/peers/``).
"""
