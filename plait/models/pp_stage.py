"""A Llama-family model cut down to one pipeline stage (``plait.core.pp``).

:func:`keep_stage` runs on the model while it is still on the meta device, so nothing it drops
is ever allocated: the stage keeps decoder layers ``stage.start..stage.stop`` (renumbered from
0, so ``model.layers`` and the KV pool hold this stage's layers only and ``layer_id`` indexes
its own pool), the embedding only on the first stage, the final norm and the LM head only on
the last. :func:`stage_name` maps a checkpoint tensor's name to the stage's parameter name, or
None for a tensor another stage holds.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from plait.core.pp.stage import PPStage


def keep_stage(model: Any, stage: PPStage) -> None:
    """Drop what ``stage`` does not hold from ``model`` (a ``LlamaForCausalLM``); with a tied
    LM head the last stage keeps the head's own weight, which it loads from the checkpoint's
    embedding (see :func:`stage_name`)."""
    if type(model).__name__ != "LlamaForCausalLM":
        raise ValueError(
            f"pp_size={stage.size}: pipeline parallelism splits Llama-family models only "
            f"(LlamaForCausalLM), not {type(model).__name__}"
        )
    kept = list(model.layers)[stage.start : stage.stop]
    for local_id, layer in enumerate(kept):
        layer.self_attn.layer_id = local_id
    model.layers = nn.ModuleList(kept)
    model.sliding_windows = tuple(model.sliding_windows)[stage.start : stage.stop]
    if not stage.first:
        model.embed_tokens = None
    if not stage.last:
        model.norm = None
        model.lm_head = None
    model.pp_stage = stage


def stage_name(name: str, stage: PPStage, tied: bool) -> str | None:
    """The stage's parameter name for checkpoint tensor ``name`` (``model.`` prefix removed),
    or None when another stage holds it."""
    name = name.removeprefix("model.")
    if name.startswith("layers."):
        index = int(name.split(".")[1])
        if not stage.start <= index < stage.stop:
            return None
        rest = name.split(".", 2)[2]
        return f"layers.{index - stage.start}.{rest}"
    if name.startswith("embed_tokens."):
        if stage.first:
            return name
        return name.replace("embed_tokens.", "lm_head.") if tied and stage.last else None
    if name.startswith(("norm.", "lm_head.")):
        return name if stage.last else None
    return name
