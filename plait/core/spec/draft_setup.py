"""Building STANDALONE's draft model next to the target: the tokenizer check, then the draft's
own model runner, KV pool and request table on the target's backend (``draft_model.py``).

The draft must speak the target's token ids: the same ``vocab_size`` and, where both
tokenizers list their vocabulary, the same token-to-id map; anything else is refused with a
``ValueError`` naming both checkpoints before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from plait.core.backend_api import ModelSpec
from plait.core.memory import ReqToTokenPool
from plait.core.model_runner import build_model_runner
from plait.core.spec.draft_model import DraftModel
from plait.quant import QuantConfig

if TYPE_CHECKING:
    from plait.compose import Checkpoint
    from plait.core.backend_api import Backend
    from plait.core.engine_config import EngineConfig
    from plait.core.scheduler import Scheduler


def check_same_tokenizer(target: Checkpoint, draft: Checkpoint) -> None:
    """ValueError naming both checkpoints when the draft's token ids are not the target's."""
    tv, dv = target.hf_config.vocab_size, draft.hf_config.vocab_size
    if tv != dv:
        raise ValueError(
            f"speculative_draft_model_path: the draft model {draft.model_dir} has "
            f"vocab_size {dv}, the target {target.model_dir} has {tv}; STANDALONE needs a "
            "draft with the target's tokenizer"
        )
    t_vocab, d_vocab = _vocab(target.tokenizer), _vocab(draft.tokenizer)
    if t_vocab is not None and d_vocab is not None and t_vocab != d_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(d_vocab.items()))[:3]
        raise ValueError(
            f"speculative_draft_model_path: the draft model {draft.model_dir} has another "
            f"tokenizer than the target {target.model_dir} ({len(d_vocab)} against "
            f"{len(t_vocab)} tokens; e.g. {differ}); STANDALONE needs the target's tokenizer"
        )


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    get = getattr(tokenizer, "get_vocab", None)
    return dict(get()) if callable(get) else None


def attach_draft_model(
    scheduler: Scheduler,
    backend: Backend,
    cfg: EngineConfig,
    draft: Checkpoint,
    spec: ModelSpec,
    num_slots: int,
) -> DraftModel:
    """Load ``draft`` on ``backend`` as the target's ``spec`` says (dtype, batch size, graph
    capture; unquantized), with ``num_slots`` KV slots of its own, and make it the scheduler's
    drafter. Its context is the target's, capped at the draft's ``max_position_embeddings``."""
    hf = draft.hf_config
    context_len = min(spec.context_len, int(getattr(hf, "max_position_embeddings", 1 << 30)))
    draft_spec = dataclasses.replace(
        spec,
        model_dir=draft.model_dir,
        hf_config=hf,
        context_len=context_len,
        load_model=draft.load_model,
        quantization=QuantConfig(),
    )
    req_pool = ReqToTokenPool(cfg.max_running_requests, context_len + 1, backend.torch_device)
    runner, allocator = build_model_runner(backend, draft_spec, num_slots, 1, req_pool)
    drafter = DraftModel(runner, allocator, req_pool, context_len)
    speculator = scheduler.spec
    if speculator is None:
        raise ValueError("speculative_algorithm='STANDALONE' but the scheduler does not speculate")
    speculator.drafter = drafter
    scheduler.kv.on_release.append(drafter.release)
    return drafter
