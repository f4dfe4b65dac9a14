"""``join(mode="concate_and_append")``: the branches' new text appended to the parent.

Two ways, chosen as SGLang chooses (``interpreter.py``): with
``global_config.enable_parallel_encoding`` (the default) on a backend whose
``support_concate_and_append`` is true (``Runtime`` on an engine with the radix cache, one
token per page, no tensor parallelism), the engine joins the branches' KV caches
(``Engine.concat_and_append``): each branch's segment keeps the KV it was computed with,
nothing of it is prefilled again, and the parent's later requests are sent as token ids that
start with the joined sequence, so they find it cached. Otherwise the branches' text is
appended as text and a later request prefills it (the segments after the first, which is the
first branch's own cached path).

Positions (SGLang's parallel encoding; its server never shipped the operation, its frontend
defines it): every segment was computed after the fork point, so segment ``i``'s tokens keep
the positions ``p .. p + len(s_i) - 1`` (``p``: the parent's length at the fork); the tokens
after the join take their index in the joined sequence, ``p + len(s_1) + ... + len(s_k)``
onwards. The result is therefore not what prefilling the joined text would compute: that is
the point of parallel encoding, and why it is the parent's choice (SGLang's flag).
"""

from __future__ import annotations

from typing import Any

from plait.frontend.global_config import global_config


def concat_and_append(parent: Any, branches: list[Any]) -> None:
    """Append each branch's text after the fork, in order, to ``parent`` (an executor); over
    the KV cache when the backend can (see the module doc)."""
    for branch in branches:
        branch.sync()
        branch.raise_if_failed()
    segments = [b.text_[b.fork_start_text_pos :] for b in branches]
    backend = parent.backend
    if not (
        global_config.enable_parallel_encoding
        and getattr(backend, "support_concate_and_append", False)
    ):
        for segment in segments:
            parent._fill(segment)
        return
    if any(b.fork_start_text_pos != len(parent.text_) for b in branches):
        raise ValueError(
            "join(mode='concate_and_append'): the parent's text changed after the fork; "
            "its KV cannot be joined (set global_config.enable_parallel_encoding = False "
            "to append the text instead)"
        )
    joined = backend.concatenate_and_append(parent, branches)
    parent._fill("".join(segments))
    parent.kv_ids, parent.kv_text_len = joined, len(parent.text_)
