"""The scheduler's knobs and counters, as plain data every scheduler module reads.

``SchedulerConfig`` is fixed when the engine starts. ``SchedulerStats`` only grows: each
field is a running total the engine reports through ``get_server_info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.core.spec.config import SpecSettings


@dataclass
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int | None = None  # None: prompts are prefilled whole
    max_prefill_tokens: int = 8192  # token budget of one prefill batch
    schedule_policy: str = "lpm"
    context_len: int = 8192
    enable_jump_forward: bool = True  # grammar-forced text in one extend step
    init_new_token_ratio: float = 0.7  # share of max_new_tokens reserved per request
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    overlap: bool = True  # run forwards on a worker, one batch ahead
    # distinct LoRA adapters the running batch may hold (the adapter pool's slots); None: no
    # adapters enabled
    max_loras_per_batch: int | None = None
    speculative: SpecSettings | None = None  # NGRAM speculation (plait.core.spec); None: off
    # the model's RoPE switch length where a sequence crossing it is prefilled again whole
    # (Phi-3 longrope, as transformers' generate recomputes its cache there); None: never
    rope_reprefill_length: int | None = None
    # a prefill (chunk) and the running decodes in one forward (plait.core.mixed)
    enable_mixed_chunk: bool = False


@dataclass
class SchedulerStats:
    prefill_tokens: int = 0  # tokens actually computed in extend steps
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    retractions: int = 0
    jump_forward_tokens: int = 0  # grammar-forced output tokens that skipped a decode step
    # Mixed chunk (plait.core.mixed): forwards that carried a prefill and decodes together,
    # and the decode rows they carried (also counted in forward_passes / generated_tokens).
    mixed_forward_passes: int = 0
    mixed_decode_rows: int = 0
    # Speculative decoding (plait.core.spec): verify passes run, request rows in them, drafts
    # verified and accepted. Tokens per request and verify pass: spec_accept_length.
    spec_verify_passes: int = 0
    spec_verify_rows: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # Seconds spent per phase, summed over all steps (divide by forward_passes for a step):
    schedule_seconds: float = 0.0  # scheduler thread: admission, retraction, building batches
    forward_seconds: float = 0.0  # executor: the model's forward
    sample_seconds: float = 0.0  # executor: logits processing and sampling
    process_seconds: float = 0.0  # scheduler thread: appending tokens, finishing, outputs
    wait_seconds: float = 0.0  # scheduler thread blocked on a result it must process
