"""AMD (CDNA/RDNA) launch parameters for the shared Triton kernels.

A wavefront is 64 lanes on CDNA, so 4 warps already fill a 256-thread workgroup; one pipeline
stage avoids LDS pressure; ``waves_per_eu`` asks the compiler to budget registers so that two
waves share each SIMD, which hides the latency of the gathered K/V loads. More KV splits than
on CUDA: MI2xx/MI300 have more compute units to fill during decode.
"""

from __future__ import annotations

from plait.backends.cuda.launch import LaunchParams

ROCM_DEFAULT = LaunchParams(
    extend_block_m=64,
    extend_block_n=64,
    decode_block_n=64,
    num_kv_splits=16,
    num_warps=4,
    num_stages=1,
    extra={"waves_per_eu": 2},
)
