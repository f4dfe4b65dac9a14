"""End-to-end greedy parity: a backend must generate token-identical greedy output to the CPU
reference on a tiny random Llama (see :mod:`plait.testing.tiny_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Ragged prompts (token ids) so batching, padding and prefix sharing all take part.
PROMPTS = [
    [1, 42, 71, 78, 78, 81],
    [1, 90, 63],
    [1, 42, 71, 78, 78, 81, 223, 89, 130, 117, 84],
    [1, 5],
]


def engine_available() -> bool:
    try:
        from plait import Engine  # noqa: F401
    except ImportError:
        return False
    return True


def greedy_output_ids(
    device: str,
    model_dir: str | Path,
    prompts: list[list[int]] = PROMPTS,
    max_new_tokens: int = 8,
    **engine_kwargs: Any,
) -> list[list[int]]:
    from plait import Engine

    kwargs = {"dtype": "float32", "max_total_tokens": 4096, **engine_kwargs}
    engine = Engine(model_path=str(model_dir), device=device, **kwargs)
    try:
        outs = engine.generate(
            input_ids=prompts,
            sampling_params={
                "max_new_tokens": max_new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs]


def check_greedy_parity(device: str, model_dir: str | Path, **engine_kwargs: Any) -> None:
    """``Engine(device=device)`` and ``Engine(device="cpu")`` agree token for token."""
    want = greedy_output_ids("cpu", model_dir, **engine_kwargs)
    got = greedy_output_ids(device, model_dir, **engine_kwargs)
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise AssertionError(
                f"greedy parity {device!r} vs 'cpu', prompt {i}: got {g}, expected {w}"
            )
