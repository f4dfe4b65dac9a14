"""A stand-in for ``plait.Engine`` with the same serving API, for fast server tests.

It "generates" by echoing the prompt's tokens (output token i = prompt token i mod len), one
token every ``FAKE_ENGINE_TOKEN_DELAY`` seconds (a request whose rid starts with ``echo-once``
stops after one echo, with finish reason ``stop``), with fixed logprobs, and keeps honest KV
accounting (a request holds prompt + output slots until it finishes or is aborted), so the
HTTP layer can be tested end to end -- processes, ZMQ, streaming, aborts -- in seconds.

Also here: ``make_tiny_model_dir``, a char-level byte tokenizer with a chat template and a
config.json, so these tests need no model download.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from plait.core.messages import GenerateReq

CONTEXT_LENGTH = 512
TOTAL_KV_TOKENS = 4096
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def make_tiny_model_dir(path: Path) -> Path:
    """A model directory holding only a tokenizer (256 byte tokens + 2 specials) and config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    (path / "config.json").write_text(
        json.dumps(
            {
                "max_position_embeddings": CONTEXT_LENGTH,
                "vocab_size": len(fast),
                "model_type": "llama",
            }
        )
    )
    return path


class FakeEngine:
    def __init__(self, model_path: str, **kwargs: Any):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
        self.kwargs = kwargs
        self.delay = float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", "0.01"))
        self.used: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.lock = threading.Lock()

    def get_server_info(self) -> dict[str, Any]:
        with self.lock:
            used = sum(self.used.values())
            running = len(self.used)
        return {
            "max_total_tokens": TOTAL_KV_TOKENS,
            "available_kv_tokens": TOTAL_KV_TOKENS - used,
            "evictable_kv_tokens": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": 0,
            "context_length": CONTEXT_LENGTH,
        }

    def flush_cache(self) -> bool:
        return True

    def abort(self, rid: str) -> None:
        with self.lock:
            self.aborted.add(rid)

    def shutdown(self) -> None:
        pass

    async def async_generate_request(
        self, msgs: list[GenerateReq]
    ) -> AsyncIterator[dict[str, Any]]:
        (msg,) = msgs  # the server sends one sample per message
        if msg.sampling_params.regex == "(?P<boom>":  # an error only the engine catches
            raise ValueError("regex: the grammar backend rejected it")
        return self._run(
            msg.input_ids,
            msg.sampling_params.max_new_tokens,
            msg.return_logprob,
            msg.logprob_start_len,
            msg.top_logprobs_num,
            msg.rid,
        )

    async def _run(
        self, ids: list[int], max_new_tokens: int, want_lp: bool, start: int, top: int, rid: str
    ) -> AsyncIterator[dict[str, Any]]:
        out: list[int] = []
        with self.lock:
            self.used[rid] = len(ids)
        try:
            while True:
                with self.lock:
                    aborted = rid in self.aborted
                finish = None
                if aborted:
                    finish = {"type": "abort", "message": "aborted"}
                elif rid.startswith("engine-error") and len(out) == 2:
                    # what the scheduler reports for a row whose sampling failed
                    finish = {"type": "error", "message": "invalid distribution"}
                elif rid.startswith("echo-once") and len(out) == len(ids):
                    # the whole prompt echoed once, ending as a model's own stop would
                    finish = {"type": "stop", "matched": self.tokenizer.token_to_id("<|im_end|>")}
                elif len(out) >= max_new_tokens:
                    finish = {"type": "length", "length": len(out)}
                yield self._chunk(ids, out, want_lp, start, top, rid, finish)
                if finish is not None:
                    return
                await asyncio.sleep(self.delay)
                out.append(ids[len(out) % len(ids)])
                with self.lock:
                    self.used[rid] = len(ids) + len(out)
        finally:
            with self.lock:
                self.used.pop(rid, None)
                self.aborted.discard(rid)

    def _chunk(
        self,
        ids: list[int],
        out: list[int],
        want_lp: bool,
        start: int,
        top: int,
        rid: str,
        finish: dict | None,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": rid,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "finish_reason": finish,
            "e2e_latency": 0.0,
        }
        if want_lp:
            first = len(ids) if start < 0 else start
            meta["input_token_logprobs"] = [
                (None if i == 0 else -1.0, t, None) for i, t in enumerate(ids) if i >= first
            ]
            meta["output_token_logprobs"] = [(-0.5, t, None) for t in out]
            tops = [[(-0.5 - 0.1 * j, (t + j) % 256, None) for j in range(top)] for t in out]
            meta["output_top_logprobs"] = tops
            meta["input_top_logprobs"] = [None] * len(meta["input_token_logprobs"])
        # like the real detokenizer, hold back a character whose bytes are not all out yet
        text = self.tokenizer.decode(out).rstrip("\ufffd")
        return {"text": text, "output_ids": list(out), "meta_info": meta}
