"""The CUDA backend: Triton attention kernels over the paged KV pool and CUDA-graph decode.

Importing this package is cheap: triton is imported only by the kernel modules, which the
plugin loads once ``device="cuda"`` is chosen.
"""
