"""Jump-forward decoding: when the grammar forces the next characters (a JSON key, ``": "``),
append their tokens without running the model.

The known issue is token boundaries. The forced string is text, and its tokens depend on the
text around it: BPE merges across the seam with what came before (output ``{`` + forced
``"name"`` is canonically ``{"`` + ``name``), and the forced string's last piece may merge with
the free text the model writes next (forced ``": "`` then ``-5``: canonically ``":`` + `` -``...).
Tokenizing the forced string alone therefore gives ids the model would rarely have chosen.

SGLang re-tokenizes the tail of the decoded text together with the forced string and replaces
the old tail tokens with the new ones (rolling back KV for the changed positions). That yields
canonical tokens, but it rewrites tokens the model already chose, which plain decoding never
does, so the continuation can diverge.

Plait aims instead at "greedy output identical to decoding without jump-forward as often as
possible", so it never rewrites history and alternates two steps that are each safe:
1. Forced tokens: while the grammar allows exactly one token, take it. Any sampler would have
   picked it, so this is identical to plain decoding (e.g. ``"`` after the model's ``{``).
2. Stable pieces: pre-tokenize the end of the output with the forced string. If the seam is not
   a pre-tokenizer piece boundary (word / punctuation run / whitespace run), stop: the forced
   text would merge into the model's last piece. Otherwise take the canonical tokens of every
   forced piece but the last (BPE never merges across pieces, so they are final whatever
   follows; the last piece may still fuse with the free text). The seams are left to the
   model, which chooses there exactly as it would without jump-forward.
The cost is one ordinary decode step per ambiguous seam (e.g. the ``" "`` before a JSON value).

What is and is not guaranteed (greedy, measured with SmolLM2-135M):
- Step 1 is always identical to plain decoding.
- Step 2 is identical exactly when the model's own greedy tokens for the forced text are its
  canonical split. That holds when the model expects the text (the prompt shows the keys: the
  model copies them canonically and the outputs are token-for-token equal), and it fails when
  the constraint forces text the model did not intend. Asked to "describe a customer" under a
  schema with the key ``customerFirstName``, plain masked decoding spells it ``customer F i r
  st N am e " :`` (each piece is the best *allowed* token of a model that wanted to write
  prose), while step 2 appends ``customer First Name ":``. The contexts then differ, so the
  values may differ too. The "python" vs "go" after a forced ``": "`` is this case: plain
  decoding spelled the key ``f av or ite Pro gra mm i ng L ang ua ge " :`` and then chose
  "go"; the divergence starts inside the key, not at the seam. This is inherent to taking
  forced text without asking the model; no seam rule fixes it. Jump-forward's output is still
  valid, and often better: canonical tokens keep the model in distribution (above: 36 tokens
  and sensible values against 93 tokens of spelled-out keys).
- Exact identity for every prompt would need verification, as in speculative decoding: extend
  the jumped tokens with logits at every position, re-sample each position as plain decoding
  would (masks, penalties, the request's generator) and keep the prefix the model agrees with,
  freeing the KV of the rest. Sample-and-compare against a deterministic draft preserves the
  sampling distribution too. That is a scheduler change (per-position logits in the extend,
  partial KV rollback, emitting only verified tokens) and is not done.
"""

from __future__ import annotations

from plait.core.grammar import GrammarState

CONTEXT_TOKENS = 4  # output tokens decoded to give the pre-tokenizer its left context
MAX_JUMP_TOKENS = 256  # a recursive grammar can force text forever
MAX_JUMP_CHARS = 4096  # pre-tokenizing a longer forced string would only stall the step


def jump_forward_tokens(state: GrammarState, tokenizer, output_ids: list[int]) -> list[int]:
    """Token ids for the grammar's forced continuation, already accepted by ``state``.

    Returns [] when nothing can be jumped safely. The caller appends the ids to the request's
    output and extends (prefills) them in the next forward.
    """
    tail = list(output_ids[-CONTEXT_TOKENS:])
    accepted: list[int] = []
    while len(accepted) < MAX_JUMP_TOKENS:
        # Cut, the last piece is dropped by _stable_tokens like any possibly-unfinished piece.
        forced = state.jump_forward_string()[:MAX_JUMP_CHARS]
        if not forced:
            break
        before = len(accepted)
        while len(accepted) < MAX_JUMP_TOKENS:
            token = state.forced_token()
            if token is None or token in state.eos_token_ids or not state.accept_token(token):
                break
            accepted.append(token)
        if len(accepted) > before:
            continue  # the forced string changed
        context = (tail + accepted)[-CONTEXT_TOKENS:]
        for token in _stable_tokens(tokenizer, context, forced):
            # A rejected token leaves the matcher unchanged, so there is nothing to roll back.
            if len(accepted) >= MAX_JUMP_TOKENS or not state.accept_token(token):
                break
            accepted.append(token)
        if len(accepted) == before:
            break
    return accepted


def _stable_tokens(tokenizer, context: list[int], forced: str) -> list[int]:
    """The canonical tokens of ``forced`` that no neighbouring text can change (see above)."""
    tail_text = (
        tokenizer.decode(context, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if context
        else ""
    )
    if tail_text.endswith("\ufffd"):
        return []  # the output ends inside a multi-byte character
    seam = len(tail_text)
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is None:  # no pre-tokenizer to ask: compare encodings, drop the final token
        old = tokenizer.encode(tail_text, add_special_tokens=False) if tail_text else []
        ids = tokenizer.encode(tail_text + forced, add_special_tokens=False)
        return ids[len(old) : -1] if ids[: len(old)] == old else []
    starts = [start for _, (start, _) in pre.pre_tokenize_str(tail_text + forced)]
    if seam and seam not in starts:
        return []  # the forced text continues the model's last piece
    cut = starts[-1]  # the last piece may still fuse with the free text that follows
    if cut <= seam:
        return []
    # BPE never merges across pieces, so the forced pieces encode the same alone as in context.
    return tokenizer.encode(forced[: cut - seam], add_special_tokens=False)
