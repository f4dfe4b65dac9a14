"""After each sampled token: advance the grammar, detokenize, decide whether the request is
done, and hand its output to whoever waits for it."""

from __future__ import annotations

import time
from typing import Any

from plait.core.detokenizer import IncrementalDetokenizer, find_stop, stop_holdback
from plait.core.finish_reason import FinishReason
from plait.core.request import Req


class RequestFinisher:
    def __init__(self, tokenizer: Any, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def append_token(
        self, req: Req, token: int, context_len: int, grammar_accepted: bool = False
    ) -> None:
        sp = req.sampling
        req.output_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        if req.grammar is not None and not grammar_accepted:
            req.grammar.accept_token(token)
        n_out = len(req.output_ids)
        if n_out >= sp.min_new_tokens:
            if not sp.ignore_eos and token in self.eos_ids:
                req.finish(FinishReason.stop(token))
            elif token in sp.stop_token_ids:
                req.finish(FinishReason.stop(token))
            elif req.grammar is not None and req.grammar.is_terminated():
                req.finish(FinishReason.stop(None))
        if req.finished:
            self.finalize_text(req)
            return
        checked = len(req.text)
        if (req.stream and not req.detokenize_later) or sp.stop:
            # else the text is read only once finished (finalize_text)
            self._detokenize(req)
        if sp.stop and n_out >= sp.min_new_tokens:
            text = req.detok.text
            hit = find_stop(text, sp.stop, checked)
            if hit is not None:
                i, s = hit
                req.text = text[: i + len(s)] if sp.no_stop_trim else text[:i]
                req.finish(FinishReason.stop(s))
                return
        if n_out >= sp.max_new_tokens:
            req.finish(FinishReason.length(sp.max_new_tokens))
        elif len(req.input_ids) + n_out >= context_len:
            req.finish(FinishReason.length(n_out))
        if req.finished:
            self.finalize_text(req)

    def _detokenize(self, req: Req) -> None:
        if req.detok is None:
            sp = req.sampling
            req.detok = IncrementalDetokenizer(
                self.tokenizer, sp.skip_special_tokens, sp.spaces_between_special_tokens
            )
        req.detok.update(req.output_ids)
        req.text = req.detok.text

    def finalize_text(self, req: Req) -> None:
        """Final text: trims a matched stop token (unless no_stop_trim), flushes partial
        characters. A stop-string match has already set ``req.text``."""
        reason = req.reason
        if reason is not None and reason.stopped_on_string:
            return
        ids = req.output_ids
        if reason is not None and reason.stopped_on_token and not req.sampling.no_stop_trim:
            ids = ids[:-1]
        if req.detok is None:  # never detokenized while it ran (it neither streams nor stops
            sp = req.sampling  # on strings): its text in one decode
            req.detok = IncrementalDetokenizer(
                self.tokenizer, sp.skip_special_tokens, sp.spaces_between_special_tokens
            )
            req.detok.decode_whole(ids)
        else:
            req.detok.update(ids)
            req.detok.flush(ids)
        req.text = req.detok.text

    def finish_now(self, req: Req, reason: FinishReason) -> None:
        """End ``req`` outside token processing (abort, error, hand-off): final text, then
        its last output. Its KV is the caller's to release."""
        req.finish(reason)
        self.finalize_text(req)
        self.emit(req)

    def emit(self, req: Req) -> None:
        if req.on_output is not None:
            req.on_output(req, req.finished)

    @staticmethod
    def streamable_text(req: Req) -> str:
        """Text that can be shown now: all of it when finished, otherwise minus any tail that
        may still turn out to be the start of a stop string."""
        if req.finished or not req.sampling.stop:
            return req.text
        return req.text[: len(req.text) - stop_holdback(req.text, req.sampling.stop)]
