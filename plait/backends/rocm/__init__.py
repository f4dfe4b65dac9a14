"""The ROCm backend: the CUDA backend's Triton kernels with AMD launch parameters, HIP graphs."""
