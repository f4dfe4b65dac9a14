"""The named configurations ``benchmarks.offline --compare`` measures against each other.

A preset is how one engine is built: ``plait.Engine`` keyword arguments, CPU backend switches
(class attributes of ``CpuBackend``, set only while that engine is built), environment
variables, or a peer (transformers ``generate``) behind the same ``generate``/``flush_cache``
surface. The comparisons the earlier one-purpose scripts made, as presets:

=====================  ================================================================
old script             comparison (``--compare BASE NEW ...``)
=====================  ================================================================
offline_throughput.py  ``transformers plait``; radix cache ``no-radix-cache plait``
cpu_decode.py          ``mkl-eager prepacked``; ``--compiled``: ``prepacked
                       prepacked-compile``; ``--attention``: ``prepacked paged-attention``
quantized.py           ``fp32 gguf gguf-a8 int8``
overlap.py             ``overlap-off overlap --phases``
tensor_parallel.py     ``tp1 tp2 --metric decode --workloads batch1,batch16 --prompt-len 8``
tpu_jax_cpu.py         ``cpu-torch tpu-jax``
=====================  ================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The CPU backend switches as cpu_decode.py set them: its old and prepacked paths both used the
# torch (gather) decode attention, so the Linear layers were the only difference.
_GATHER = {"paged_decode_kernel": False}
_CPU_AB = {"kv_cache_memory_gb": 0.5}
_QUANT = {"max_total_tokens": 16384}
_TP = {"disable_radix_cache": True, "max_total_tokens": 8192}
_OVERLAP = {"max_running_requests": 64}
# queued prompts are admitted while others decode, a chunk at a time: what mixing serves
_CHUNKED = {"chunked_prefill_size": 256, "max_running_requests": 16, "kv_cache_memory_gb": 0.25}


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    about: str  # one line for --list
    engine: dict = field(default_factory=dict)  # plait.Engine keyword arguments
    cpu: dict = field(default_factory=dict)  # CpuOptions fields for the engine
    env: dict = field(default_factory=dict)  # os.environ, set before building
    peer: str | None = None  # "transformers": not a Plait engine
    full_warmup: bool = False  # warm up on every workload in full (jit buckets), not a short one
    info: tuple[str, ...] = ()  # get_server_info keys shown after
    lora_adapters: int = 0  # random rank-8 adapters, prompts spread over them (benchmarks/lora.py)


PRESETS = {
    p.name: p
    for p in [
        Preset(name="plait", about="Plait's defaults"),
        Preset(
            name="lora8",
            lora_adapters=8,
            about="Plait's defaults serving 8 random rank-8 LoRA adapters (all projections), "
            "prompt i on adapter i mod 8: compare with plait (docs/lora.md)",
        ),
        Preset(
            name="transformers",
            peer="transformers",
            about="transformers generate, one static left-padded batch per workload, float32",
        ),
        Preset(
            name="no-radix-cache",
            engine={"disable_radix_cache": True},
            about="Plait's defaults with --disable-radix-cache",
        ),
        Preset(
            name="mkl-eager",
            engine=_CPU_AB,
            cpu={"prepack_weights": False, **_GATHER},
            about="CPU: nn.Linear on MKL, raw weights, eager, torch gather attention",
        ),
        Preset(
            name="prepacked",
            engine=_CPU_AB,
            cpu={"prepack_weights": True, **_GATHER},
            about="CPU: prepacked Linear weights, eager, torch gather attention",
        ),
        Preset(
            name="prepacked-compile",
            engine={**_CPU_AB, "enable_graph_capture": True},
            cpu={"prepack_weights": True, **_GATHER},
            info=("graph_capture", "graph_compiles"),
            about="CPU: prepacked + torch.compile (compiles for minutes at start)",
        ),
        Preset(
            name="paged-attention",
            engine=_CPU_AB,
            cpu={"prepack_weights": True, "paged_decode_kernel": True},
            about="CPU: prepacked, the paged decode attention kernel",
        ),
        Preset(
            name="panels",
            cpu={"compact_weights": False},
            about="CPU: float32 panels only, no lossless 4-bit/16-bit weight form",
        ),
        Preset(
            name="bf16",
            engine={"dtype": "bfloat16"},
            about="Plait in bfloat16: 16-bit weights, float32 activations in the native step, "
            "a bfloat16 KV pool (docs/cpu-backend.md); compare with plait",
        ),
        Preset(
            name="bf16-eager",
            engine={"dtype": "bfloat16"},
            cpu={"native_decode": False, "paged_decode_kernel": False, "linear_layout": "onednn"},
            about="bfloat16 as before the native bf16 step: eager torch, oneDNN bf16 Linears, "
            "the gather attention",
        ),
        Preset(
            name="fp32",
            engine={**_QUANT, "quantization": "none"},
            about="the default model's GGUF dequantized to float32 (--quantization none)",
        ),
        Preset(
            name="gguf",
            engine={**_QUANT, "quantization": "gguf"},
            about="the GGUF run natively: Q4_1 layers, Q8_0 embedding / LM head",
        ),
        Preset(
            name="gguf-a8",
            engine={**_QUANT, "quantization": "gguf", "quantization_activations": "int8"},
            about="gguf with int8 activations (AVX-512 VNNI kernel)",
        ),
        Preset(
            name="int8",
            engine={**_QUANT, "quantization": "int8"},
            about="float32 checkpoint quantized at load, int8 per channel",
        ),
        Preset(
            name="overlap-off",
            engine={**_OVERLAP, "disable_overlap_schedule": True},
            about="the inline schedule (--disable-overlap-schedule), 64 running requests",
        ),
        Preset(
            name="overlap",
            engine=_OVERLAP,
            about="the overlap schedule (the default), 64 running requests",
        ),
        Preset(
            name="chunked",
            engine=_CHUNKED,
            info=("forward_passes", "mixed_forward_passes"),
            about="prefill in chunks of 256 tokens, 16 running requests (the rest queue)",
        ),
        Preset(
            name="mixed-chunk",
            engine={**_CHUNKED, "enable_mixed_chunk": True},
            info=("forward_passes", "mixed_forward_passes"),
            about="chunked + --enable-mixed-chunk: a chunk rides with the decodes "
            "(docs/scheduling.md)",
        ),
        Preset(
            name="tp1",
            engine={**_TP, "tp_size": 1},
            info=("tp_ranks",),
            about="tp 1 with this process's threads, no radix cache, 8192 KV tokens",
        ),
        Preset(
            name="tp2",
            engine={**_TP, "tp_size": 2},
            info=("tp_ranks",),
            about="tp 2 (the launcher splits the cores per rank), no radix cache, 8192 KV tokens",
        ),
        Preset(
            name="cpu-torch",
            engine={"device": "cpu", "dtype": "float32"},
            about="the torch CPU backend, float32 (tpu-jax's baseline)",
        ),
        Preset(
            name="tpu-jax",
            engine={"device": "tpu", "dtype": "float32"},
            env={"PLAIT_TPU_PLATFORM": "cpu"},
            full_warmup=True,
            info=("jit_compiles",),
            about="the TPU backend's JAX runner on JAX's CPU device (development mode)",
        ),
    ]
}


def parse_presets(names: list[str]) -> list[Preset]:
    """The presets named, in order; ValueError naming ``--compare`` for an unknown or
    repeated name, or fewer than two."""
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(
            f"--compare: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}"
        )
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"--compare: give a baseline and at least one other preset, each once; "
            f"got {' '.join(names)}"
        )
    return [PRESETS[n] for n in names]
