"""Plait's worker (the repository's venv, PYTHONPATH at the repository root): the offline
``Engine`` on the float32 checkpoint, or on the Q4_1 GGUF with ``options.quantization`` (and
``options.quantization_activations``); ``options.compact_weights`` false streams the float32
panels even where a weight has a lossless smaller form."""

from __future__ import annotations

from importlib.metadata import version

import torch

import plait
from benchmarks.peers.workers.common import Request, Serve, main
from plait.backends.cpu.plugin import CpuOptions


def load(job: dict) -> Serve:
    torch.set_num_threads(job["threads"])
    compact = job["options"].get("compact_weights", True)
    quantization = job["options"].get("quantization", "none")
    activations = job["options"].get("quantization_activations", "float")
    dtype = job["options"].get("dtype")  # None: the CPU backend's float32
    engine = plait.Engine(
        model_path=job["model_dir"],
        quantization=quantization,
        quantization_activations=activations,
        kv_cache_memory_gb=2.0,
        random_seed=job["seed"],
        dtype=dtype,
        backend_options=CpuOptions(compact_weights=compact),
    )

    def generate(reqs: list[Request]) -> list[list[int]]:
        sps = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for _, n in reqs]
        outs = engine.generate(input_ids=[p for p, _ in reqs], sampling_params=sps)
        return [o["output_ids"] for o in (outs if isinstance(outs, list) else [outs])]

    name = "plait" if quantization == "none" else f"plait-{quantization}"
    name += "-a8" if activations == "int8" else ""
    name += "" if compact else "-panels"
    name += "-bf16" if dtype == "bfloat16" else ""
    return Serve(
        name,
        version("plait"),
        generate,
        engine.flush_cache,
        notes="continuous batching, radix cache",
    )


if __name__ == "__main__":
    main(load)
