"""Launch parameters for the Triton attention kernels, per device family.

The kernels are shared by the CUDA and ROCm backends; only these numbers differ. ``extra``
carries vendor-specific launch options (e.g. ``waves_per_eu`` on AMD) passed straight to the
kernel launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LaunchParams:
    """Tile sizes and launch options.

    ``num_kv_splits`` fixes the split-KV fan-out of decode. It is a constant (not derived
    from the batch's lengths) so that a decode step launches the same grid whatever the
    sequence lengths are, which is what lets a captured graph be replayed.
    """

    extend_block_m: int = 64
    extend_block_n: int = 64
    decode_block_n: int = 64
    num_kv_splits: int = 8
    num_warps: int = 4
    num_stages: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("extend_block_m", "extend_block_n", "decode_block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        s = self.num_kv_splits
        if s < 1 or s & (s - 1):
            raise ValueError(f"num_kv_splits must be a power of two >= 1, got {s}")

    def launch_kwargs(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.extra}


# Hopper/Ampere defaults: 64x64 tiles keep fp16 q/k/v tiles for D=128 within shared memory.
CUDA_DEFAULT = LaunchParams()

# Small tiles for the CPU interpreter (TRITON_INTERPRET=1): each program runs in numpy, so
# fewer, smaller programs keep the tests fast.
INTERPRETER = LaunchParams(
    extend_block_m=16,
    extend_block_n=32,
    decode_block_n=32,
    num_kv_splits=2,
    num_warps=1,
    num_stages=1,
)
