"""Portable torch ops that a backend may replace with its own kernel: the contract's
defaults live here (not in ``plait.models``) so the core can name them without importing a
model. ``plait.ops.fused_moe``: the mixture-of-experts product (``Backend.fused_moe``)."""
