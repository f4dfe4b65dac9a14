"""Speculative decoding's settings: SGLang's option names, checked once, resolved to what the
scheduler runs (:class:`SpecSettings`). ``NGRAM`` drafts from text the request has seen;
``STANDALONE`` from a draft model (``speculative_draft_model_path``, ``draft_model.py``).

Meanings (as SGLang's): ``speculative_num_draft_tokens`` is how many tokens one verify pass
computes for a request, the last committed token included; ``speculative_num_steps`` is the
longest draft chain. Plait drafts a single chain (no tree), so a pass verifies at most
``min(num_steps, num_draft_tokens - 1)`` drafts; giving both with
``num_draft_tokens > num_steps + 1`` asks for a tree and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("NGRAM", "STANDALONE")
DEFAULT_NUM_DRAFT_TOKENS = 8


@dataclass(frozen=True, kw_only=True)
class SpecSettings:
    """What the scheduler's speculation runs with."""

    max_drafts: int  # drafts per request and pass, at most
    min_match: int  # shortest suffix n-gram that proposes
    max_match: int  # longest suffix n-gram tried first


def _positive(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_speculative(cfg: Any) -> None:
    """ValueError naming the option for a speculative setting Plait cannot honour."""
    algo = cfg.speculative_algorithm
    if algo is None:
        for name in (
            "speculative_num_draft_tokens",
            "speculative_num_steps",
            "speculative_draft_model_path",
        ):
            if getattr(cfg, name) is not None:
                raise ValueError(f"{name} needs speculative_algorithm (NGRAM or STANDALONE)")
        return
    if algo not in ALGORITHMS:
        raise ValueError(f"speculative_algorithm must be one of {ALGORITHMS}, got {algo!r}")
    path = cfg.speculative_draft_model_path
    if algo == "STANDALONE" and not path:
        raise ValueError(
            "speculative_algorithm='STANDALONE' needs speculative_draft_model_path "
            "(--speculative-draft-model-path: the draft model's checkpoint)"
        )
    if algo == "NGRAM" and path is not None:
        raise ValueError("speculative_draft_model_path is for STANDALONE; NGRAM has no draft model")
    if getattr(cfg, "lora_enabled", False):
        raise ValueError(
            "speculative_algorithm with LoRA adapters (lora_paths / max_lora_rank) is not "
            "supported yet: the verify pass does not carry the adapters"
        )
    for name in ("speculative_num_draft_tokens", "speculative_num_steps"):
        if getattr(cfg, name) is not None:
            _positive(name, getattr(cfg, name))
    lo, hi = (
        cfg.speculative_ngram_min_match_window_size,
        cfg.speculative_ngram_max_match_window_size,
    )
    _positive("speculative_ngram_min_match_window_size", lo)
    _positive("speculative_ngram_max_match_window_size", hi)
    if lo > hi:
        raise ValueError(
            f"speculative_ngram_min_match_window_size={lo} exceeds "
            f"speculative_ngram_max_match_window_size={hi}"
        )
    n, steps = cfg.speculative_num_draft_tokens, cfg.speculative_num_steps
    if n is not None and steps is not None and n > steps + 1:
        raise ValueError(
            f"speculative_num_draft_tokens={n} > speculative_num_steps + 1 = {steps + 1} "
            "asks for a draft tree; Plait drafts one chain"
        )
    if n == 1:
        raise ValueError("speculative_num_draft_tokens must be at least 2 (one draft)")
    _check_combinations(cfg)


def _check_combinations(cfg: Any) -> None:
    if cfg.tp_size != 1:
        raise ValueError(
            f"speculative_algorithm with tp_size={cfg.tp_size}: speculative decoding "
            "does not support tensor parallelism yet"
        )
    if cfg.disaggregation_mode != "null":
        raise ValueError(
            f"speculative_algorithm with disaggregation_mode={cfg.disaggregation_mode!r}: "
            "not supported yet"
        )
    if cfg.page_size is not None and cfg.page_size != 1:
        raise ValueError(
            f"speculative_algorithm with page_size={cfg.page_size}: speculative decoding "
            "frees rejected drafts slot by slot and needs page_size 1"
        )


def settings_of(cfg: Any) -> SpecSettings | None:
    """The resolved settings of a checked config; None when speculation is off."""
    if cfg.speculative_algorithm is None:
        return None
    n, steps = cfg.speculative_num_draft_tokens, cfg.speculative_num_steps
    if n is None:
        n = DEFAULT_NUM_DRAFT_TOKENS if steps is None else steps + 1
    drafts = n - 1 if steps is None else min(steps, n - 1)
    return SpecSettings(
        max_drafts=drafts,
        min_match=cfg.speculative_ngram_min_match_window_size,
        max_match=cfg.speculative_ngram_max_match_window_size,
    )


def speculation_info(cfg: Any, stats: Any) -> dict[str, Any]:
    """``get_server_info``'s speculation fields: the algorithm and ``spec_accept_length``,
    tokens committed per request and verify pass (accepted drafts + 1) since the start."""
    rows = stats.spec_verify_rows
    return {
        "speculative_algorithm": cfg.speculative_algorithm,
        "spec_accept_length": (stats.spec_accepted_tokens + rows) / rows if rows else 0.0,
    }
