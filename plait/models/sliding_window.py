"""Which layers of a checkpoint attend through a sliding window, and how wide it is.

The rule (transformers' ``sliding_window_overlay``): with window ``W`` the query at position
``p`` sees the keys at positions ``p - W + 1 .. p`` (W keys, itself included), so
``key > p - W`` on top of the causal ``key <= p``. Every attention path applies exactly this,
in absolute positions, so a prefix-cache hit or a chunked prefill changes nothing: the KV of
tokens that fell out of the window stays in the pool and is merely not read.

Per architecture, as transformers builds its layers:
- Mistral and Phi-3: every layer uses ``config.sliding_window`` (None: full attention).
- Gemma 2 and Gemma 3: layer ``i`` uses ``config.sliding_window`` when
  ``config.layer_types[i]`` is ``"sliding_attention"`` (alternating, for Gemma 3 from its
  ``sliding_window_pattern``).
- Qwen2 (and Qwen3): layer ``i`` uses ``config.sliding_window`` when ``config.layer_types[i]`` is
  ``"sliding_attention"``, which transformers derives from ``use_sliding_window`` and
  ``max_window_layers`` (layers ``i >= max_window_layers``); never without
  ``use_sliding_window``.
- Llama: full attention (its config has no window).

A window at least as long as the context is full attention for every position the engine can
serve, so it is reported as None: such a model runs exactly as before on every backend.
"""

from __future__ import annotations

from typing import Any


def layer_windows(config: Any, context_len: int) -> tuple[int | None, ...]:
    """Layer ``i``'s sliding window for a model served with contexts of up to
    ``context_len`` tokens (None: full attention there). ValueError for a window below 1."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    model_type = getattr(config, "model_type", "")
    if model_type in ("mistral", "phi3"):
        windows = [window] * n
    elif model_type in ("qwen2", "qwen3"):
        windows = _qwen2_windows(config, window, n)
    elif model_type in ("gemma2", "gemma3_text"):
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        windows = [window if t == "sliding_attention" else None for t in types]
    else:
        windows = [None] * n
    if any(w is not None and int(w) < 1 for w in windows):
        raise ValueError(f"sliding_window={window} must be at least 1 (or null)")
    return tuple(None if w is None or int(w) >= context_len else int(w) for w in windows)


def _qwen2_windows(config: Any, window: int | None, n: int) -> list[int | None]:
    if not getattr(config, "use_sliding_window", False) or window is None:
        return [None] * n
    types = getattr(config, "layer_types", None)
    if not types:  # configs from before transformers wrote layer_types
        first = getattr(config, "max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return [window if t == "sliding_attention" else None for t in types]
