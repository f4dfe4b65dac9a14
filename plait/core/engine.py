"""``plait.Engine``: the offline API, a facade. It builds its runtime (``engine_builder``),
runs the scheduler on a background thread (``engine_loop``), and turns requests into
results, streams or awaitables.

Requests may come from many threads at once (the frontend's run_batch, a server); all of them
meet in one scheduler so they batch together. Bad input is rejected here, in the caller's
thread, before anything reaches the scheduler.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import queue
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from plait.core.spec.config import speculation_info
from plait.core.delivery import Delivery, one_stream_flag
from plait.core.engine_builder import build_runtime, warm_up
from plait.core.engine_config import EngineConfig
from plait.core.engine_loop import EngineLoop
from plait.core.engine_lora import LoraControl
from plait.core.intake import RequestIntake
from plait.core.messages import GenerateReq, RequestLimits
from plait.core.request import Req
from plait.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from plait.disaggregation.decode import DecodeSide

log = logging.getLogger(__name__)


class Engine:
    """One model on one backend (``tp_size`` ranks), serving every caller's requests through
    one scheduler. Its attributes are those of the runtime it built
    (``engine_builder.Runtime``)."""

    def __init__(self, model_path: str | Path | None = None, **kwargs: Any):
        cfg = EngineConfig(model_path=model_path, **kwargs)
        cfg.validate()
        self._loop = EngineLoop()
        rt = build_runtime(cfg, call_soon=self._loop.call_soon)
        self.runtime, self.config, self.backend = rt, rt.config, rt.backend
        self.model_dir, self.hf_config, self.tokenizer = rt.model_dir, rt.hf_config, rt.tokenizer
        self.quantization, self.device_name = rt.quantization, rt.backend.name
        self.context_len, self.max_total_tokens = rt.context_len, rt.max_total_tokens
        self.eos_ids, self.vocab_size = rt.eos_ids, rt.hf_config.vocab_size
        self.scheduler, self.disagg, self._tp_runner = rt.scheduler, rt.disagg, rt.tp_runner
        manager = getattr(self.scheduler.runner, "adapters", None)  # plait.lora's, or None
        self._intake = RequestIntake(
            tokenizer=rt.tokenizer,
            context_len=rt.context_len,
            vocab_size=self.vocab_size,
            max_total_tokens=rt.max_total_tokens,
            eos_ids=rt.eos_ids,
            disaggregation_mode=rt.config.disaggregation_mode,
            grammar_compile_timeout=rt.config.grammar_compile_timeout,
            lora_namespace=None if manager is None else manager.uid,
            rope_regime_length=getattr(
                getattr(self.scheduler.runner, "model", None), "rope_regime_length", None
            ),
        )
        self._call = self._loop.call
        self.lora = LoraControl(manager, self.scheduler, self._call)
        self._loop.start(self.scheduler, self.disagg, self.backend)
        # Stop the scheduler thread before the interpreter tears modules down under it. A weak
        # reference, so an engine nobody holds can still be garbage collected.
        self._atexit = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._atexit)
        if self.scheduler.runner.metrics().get("graph_capture"):
            log.info("capturing decode graphs (batch 1 and 2)...")
            log.info("decode graphs captured in %.1f s", warm_up(self.generate, self.flush_cache))

    # ----- requests -----

    @property
    def limits(self) -> RequestLimits:
        return self._intake.limits

    def make_requests(self, msgs: list[GenerateReq]) -> list[Req]:
        """Tokenize, validate and expand ``n`` (see ``RequestIntake``): in the caller's
        thread, a ValueError naming the parameter before anything reaches the scheduler."""
        return self._intake.make_requests(msgs)

    def submit(self, reqs: list[Req], on_output: Callable[[Req, bool], None]) -> None:
        """Hand validated requests to the scheduler; ``on_output`` runs on the scheduler
        thread once when a request finishes, and after each step that changed it for a request
        that streams or needs per-step work (stop strings, logprobs, a grammar: see
        ``plait.core.decode_traits``); a plain request is not reported in between."""
        for req in reqs:
            req.on_output = on_output
        decode = self.config.disaggregation_mode == "decode"
        add = self.lora.guard(
            cast("DecodeSide", self.disagg).add if decode else self.scheduler.add_request
        )
        self._loop.call_soon(lambda: [add(r) for r in reqs])

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | SamplingParams | None = None,
        **request: Any,
    ) -> dict | list[dict] | Iterator[dict]:
        """SGLang's offline API. ``request`` holds the other ``GenerateReq`` fields
        (``input_ids``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``,
        ``stream``, ``rid``), each one value or one per prompt (see ``GenerateReq.batch``).
        One prompt (with n == 1) -> one output; a list (or n > 1) -> a list, prompt-major."""
        msgs, batched = GenerateReq.batch(text=prompt, sampling_params=sampling_params, **request)
        return self.generate_request(msgs, batched)

    def generate_request(
        self, msgs: list[GenerateReq], batched: bool = True
    ) -> dict | list[dict] | Iterator[dict]:
        """Run messages; with ``stream`` set (on all of them) an iterator of outputs."""
        stream = one_stream_flag(msgs)
        outputs: queue.Queue = queue.Queue()
        d = Delivery(self.make_requests(msgs), outputs.put, self.abort)
        self.submit(d.reqs, d.on_output)
        if stream:
            return d.stream(outputs.get)
        while not d.done:
            d.take(outputs.get())
        return d.results(batched)

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | SamplingParams | None = None,
        **request: Any,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """:meth:`generate` for asyncio: awaits the results, or (``stream=True``) returns an
        async iterator."""
        msgs, batched = GenerateReq.batch(text=prompt, sampling_params=sampling_params, **request)
        return await self.async_generate_request(msgs, batched)

    async def async_generate_request(
        self, msgs: list[GenerateReq], batched: bool = True
    ) -> dict | list[dict] | AsyncIterator[dict]:
        stream = one_stream_flag(msgs)
        # Tokenizing and compiling a grammar take a while: never on the caller's event loop.
        reqs = await asyncio.to_thread(self.make_requests, msgs)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        d = Delivery(
            reqs, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item), self.abort
        )
        self.submit(reqs, d.on_output)
        if stream:
            return d.astream(outputs.get)
        while not d.done:
            d.take(await outputs.get())
        return d.results(batched)

    # ----- control -----

    def abort(self, rid: str) -> None:
        self._loop.call_soon(
            lambda: (
                self.scheduler.abort(rid) or (self.disagg is not None and self.disagg.abort(rid))
            )
        )

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def concat_and_append(self, prefix: list[int], branches: list[list[int]]) -> list[int]:
        """Cache ``prefix`` followed by each branch's tokens after it, reusing the KV the
        branches computed (they must be cached; nothing is prefilled). Returns the joined ids;
        a request starting with them finds them all cached. See docs/frontend.md."""
        return self._call(lambda: self.scheduler.concat_and_append(prefix, branches))

    # ----- LoRA adapters (plait.lora; docs/lora.md) -----

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        self.lora.load(lora_name, lora_path)

    def unload_lora_adapter(self, lora_name: str) -> None:
        """Refused (ValueError naming it) while a request uses the adapter."""
        self.lora.unload(lora_name)

    def lora_adapters(self) -> list[str]:
        return self.lora.names()

    def get_server_info(self) -> dict:
        def info() -> dict:
            s = self.scheduler
            kv = s.kv.usage()
            return {
                "model_path": str(self.model_dir),
                "device": self.device_name,
                "max_total_tokens": self.max_total_tokens,
                "context_length": self.context_len,
                "page_size": self.config.page_size,
                "overlap_schedule": s.executor.overlap,
                "available_kv_tokens": kv.free,
                "cached_kv_tokens": kv.cached,
                "evictable_kv_tokens": kv.evictable,
                "num_running_reqs": len(s.running) + (1 if s.chunked else 0),
                "num_waiting_reqs": len(s.waiting),
                "disaggregation_mode": self.config.disaggregation_mode,
                **vars(s.stats),
                **speculation_info(self.config, s.stats),
                **getattr(self.disagg, "stats", {}),
                **s.runner.metrics(),
                **self.lora.info(),
            }

        return self._call(info)

    def shutdown(self) -> None:
        """Stop the scheduler thread and, under tensor parallelism, every other rank.
        Idempotent."""
        stopped = self._loop.stop(timeout=5)
        if self.disagg is not None:
            self.disagg.close()
            self.disagg = None
        tp, self._tp_runner = self._tp_runner, None
        if tp is not None:
            if stopped:
                tp.shutdown()
            else:  # stuck mid-forward: no STOP broadcast, just kill
                tp.ranks.stop()
        atexit.unregister(self._atexit)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def fatal_error(engine: Any) -> str | None:
    """Why ``engine`` can serve no more request, for good (its tensor- or pipeline-parallel
    group is broken: a rank died), or None. A server that sees one must stop, so that a
    supervisor restarts it, rather than fail every later request while ``/health`` says 200."""
    tp = getattr(engine, "_tp_runner", None)
    return tp.broken if tp is not None else None


def _shutdown_if_alive(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
