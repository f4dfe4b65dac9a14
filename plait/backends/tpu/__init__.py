"""The TPU backend: JAX/Pallas paged attention, ``jax.jit`` shape buckets as graph capture.

Importing this package is cheap; jax is imported when the device is chosen (or, on a machine
with libtpu, when detection asks jax whether it sees a TPU).
"""
