"""``plait.Engine``: the offline API. Loads a model on a backend, runs the scheduler on a
background thread, and turns requests into results, streams or awaitables.

Requests may come from many threads at once (the frontend's run_batch, a server); all of them
meet in one scheduler so they batch together. Bad input is rejected here, in the caller's
thread, before anything reaches the scheduler.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import torch

from plait.core.backend_api import Backend, ModelSpec
from plait.core.engine_config import EngineConfig
from plait.core.kv_manager import KVManager
from plait.core.memory import ReqToTokenPool
from plait.core.messages import GenerateReq, RequestLimits, check_rooms
from plait.core.model_runner import build_model_runner, head_dim_of
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampling_params import SamplingParams
from plait.core.scheduler import Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from plait.compose import Checkpoint

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    def __init__(self, model_path: str | Path | None = None, **kwargs: Any):
        self.config = cfg = EngineConfig(model_path=model_path, **kwargs)
        cfg.validate()
        self._tp_runner = None
        try:
            self._load(cfg)
        except BaseException:
            if self._tp_runner is not None:  # the other ranks started: stop them too
                self._tp_runner.ranks.stop()
            raise
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="plait-scheduler", daemon=True)
        self._thread.start()
        # Stop the scheduler thread before the interpreter tears modules down under it. A weak
        # reference, so an engine nobody holds can still be garbage collected.
        self._atexit = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._atexit)
        if self.scheduler.runner.metrics().get("graph_capture"):
            self._warm_up()

    # ----- construction -----

    def _load(self, cfg: EngineConfig) -> None:
        # The composition root looks up the registries; the core only receives what it found.
        from plait import compose

        self.model_dir = model_dir = compose.resolve_model_dir(cfg.model_path)
        checkpoint = compose.open_checkpoint(model_dir)
        self.quantization = cfg.quant_config(model_dir, checkpoint.gguf_source)
        self.backend = backend = compose.get_backend(cfg.device, cfg.backend_options)
        # Everything from here runs torch on the caller's thread (pool allocation, weight
        # loading): under host_thread, so that thread never owns an OpenMP team (see
        # Backend.host_thread; one such team made every forward kernel sleep between calls).
        with backend.host_thread():
            self._load_on(backend, cfg, checkpoint)

    def _load_on(self, backend: Backend, cfg: EngineConfig, checkpoint: Checkpoint) -> None:
        self.device_name = backend.name
        self.config = cfg = cfg.with_backend_defaults(backend)
        device = backend.torch_device
        self.hf_config = hf = checkpoint.hf_config
        self.tokenizer = checkpoint.tokenizer
        self.context_len = min(cfg.context_length or hf.max_position_embeddings,
                               hf.max_position_embeddings)
        dtype = _DTYPES[cfg.dtype]
        if cfg.random_seed is not None:
            torch.manual_seed(cfg.random_seed)
        from plait.core.tp.sharding import check_tp_size
        # A rank's KV pool holds its shard's heads: the budget is per rank, sized by the
        # largest shard, and every rank gets the same number of slots.
        kv_heads = check_tp_size(hf.num_attention_heads, hf.num_key_value_heads, cfg.tp_size)
        head_dim, layers = head_dim_of(hf), hf.num_hidden_layers
        per_token = 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        tokens = cfg.max_total_tokens or cfg.kv_cache_bytes() // per_token
        tokens -= tokens % cfg.page_size
        if tokens < cfg.page_size * 2:
            raise ValueError(f"max_total_tokens: a KV pool of {tokens} tokens (from "
                             f"max_total_tokens, kv_cache_memory_gb or mem_fraction) is too "
                             f"small; page_size={cfg.page_size} needs at least two pages")
        self.max_total_tokens = tokens
        req_pool = ReqToTokenPool(cfg.max_running_requests, self.context_len + 1, device)
        spec = ModelSpec(model_dir=checkpoint.model_dir, hf_config=hf, dtype=dtype,
                         context_len=self.context_len,
                         max_batch_size=cfg.max_running_requests,
                         quantization=self.quantization,
                         graph_capture=cfg.graph_capture(backend),
                         load_model=checkpoint.load_model)
        if cfg.tp_size == 1:
            runner, allocator = build_model_runner(backend, spec, tokens, cfg.page_size, req_pool)
        else:
            from plait.core.tp.runner import start_tensor_parallel
            runner, allocator = start_tensor_parallel(backend, spec, tokens, cfg.page_size,
                                                      req_pool, cfg.tp_size)
        self._tp_runner = runner if cfg.tp_size > 1 else None
        kv = KVManager.create(req_pool, allocator, enable_cache=not cfg.disable_radix_cache)
        self.eos_ids = _eos_ids(hf, self.tokenizer)
        self.vocab_size = hf.vocab_size
        self.scheduler = Scheduler(
            runner, kv, RequestFinisher(self.tokenizer, self.eos_ids),
            SchedulerConfig(max_running_requests=cfg.max_running_requests,
                            chunked_prefill_size=cfg.chunked_prefill_size,
                            max_prefill_tokens=cfg.max_prefill_tokens,
                            schedule_policy=cfg.schedule_policy, context_len=self.context_len,
                            enable_jump_forward=not cfg.disable_jump_forward,
                            # A prefill server hands each request off after its first
                            # token; a decode planned for it in the meantime would be wasted
                            # and race the hand-off, so prefill servers run one batch at a time.
                            overlap=not cfg.disable_overlap_schedule
                            and cfg.disaggregation_mode != "prefill"))
        self.grammar_compiler = None
        self._grammar_lock = threading.Lock()
        self.disagg = self._disaggregation(cfg, req_pool, kv)

    def _disaggregation(self, cfg: EngineConfig, req_pool: ReqToTokenPool,
                        kv: KVManager) -> Any:
        """The prefill or decode side of disaggregated serving (None in ``null`` mode)."""
        if cfg.disaggregation_mode == "null":
            return None
        kv_pool = self.scheduler.runner.kv_pool
        from plait.disaggregation.transports import create_transfer
        transfer = create_transfer(cfg.disaggregation_transfer_backend, cfg.disaggregation_host)
        s = self.scheduler
        if cfg.disaggregation_mode == "prefill":
            from plait.disaggregation.prefill import PrefillSide
            side = PrefillSide(transfer, kv_pool, req_pool, cfg.disaggregation_host,
                               cfg.disaggregation_bootstrap_port,
                               cfg.disaggregation_transfer_timeout,
                               call_soon=lambda fn: self._inbox.put((fn, None)),
                               finish=s.finish_handed_off, abort_room=s.abort_room)
            s.hand_off = side.hand_off
            return side
        from plait.disaggregation.decode import DecodeSide
        return DecodeSide(transfer, kv, kv_pool, cfg.disaggregation_host,
                          cfg.disaggregation_transfer_timeout, admit=s.add_prefilled,
                          fail=s.finish_unscheduled)

    def _warm_up(self) -> None:
        """Capture (compile, on the CPU) decode for batch 1 and 2 now, not on the first
        request: with dynamic shapes those two graphs serve every later size and length."""
        from tqdm import tqdm

        t = time.perf_counter()
        log.info("capturing decode graphs (batch 1 and 2)...")
        batches = ([[1, 2, 3]], [[1, 2, 3], [1, 2, 3, 4]])
        for ids in tqdm(batches, desc="decode graph warm-up", unit="graph", leave=False,
                        disable=None):  # None: a bar on a terminal, silent in logs and CI
            self.generate(input_ids=ids,
                          sampling_params={"max_new_tokens": 2, "temperature": 0,
                                           "ignore_eos": True})
        self.flush_cache()
        log.info("decode graphs captured in %.1f s", time.perf_counter() - t)

    # ----- the scheduler thread -----

    def _loop(self) -> None:
        # With the overlap schedule the forwards (and sampling) run on the executor's thread;
        # this one only plans batches, so it runs as a host thread.
        overlap = self.scheduler.executor.overlap
        try:
            with self.backend.host_thread() if overlap else contextlib.nullcontext():
                self._serve()
        finally:
            self.scheduler.close()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                busy = self.scheduler.has_work()
                # requests waiting for KV from elsewhere: poll often, but never spin
                waiting = self.disagg is not None and self.disagg.has_work()
                cmd = self._inbox.get(block=not busy, timeout=0.002 if waiting else 0.1)
                self._run_command(cmd)
                continue  # drain every pending command before the next forward
            except queue.Empty:
                pass
            if self.disagg is not None:
                self.disagg.poll()
            if self.scheduler.has_work():
                self.scheduler.step()

    def _run_command(self, cmd: tuple[Callable[[], Any], Future | None]) -> None:
        fn, fut = cmd
        try:
            result = fn()
            if fut is not None:
                fut.set_result(result)
        except Exception as exc:  # noqa: BLE001 - report to the caller, keep serving
            if fut is None:
                log.exception("engine command failed")
            else:
                fut.set_exception(exc)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread between steps and wait for its result."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return fut.result()

    # ----- requests -----

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(context_len=self.context_len, vocab_size=self.vocab_size,
                             max_total_tokens=self.max_total_tokens)

    def make_requests(self, msgs: list[GenerateReq]) -> list[Req]:
        """Tokenize, validate and expand ``n``: the one place messages become ``Req``s.
        Every message is checked before any ``Req`` exists, so a bad one beside good ones
        stops them all here, in the caller's thread. Raises ValueError naming the parameter."""
        check_rooms(msgs)
        checked = []
        for msg in msgs:
            msg = msg.tokenized(self.tokenizer.encode)
            msg.validate(self.limits)
            self._check_disaggregated(msg)
            checked.append((msg, self._compile_grammar(msg.sampling_params)))
        reqs = []
        for msg, grammar in checked:
            for one in msg.expand():
                sp = one.sampling_params
                req = Req(rid=one.rid, input_ids=list(one.input_ids), sampling=sp,
                          return_logprob=one.return_logprob,
                          logprob_start_len=one.logprob_start_len,
                          top_logprobs_num=one.top_logprobs_num, stream=one.stream,
                          bootstrap=one.bootstrap)
                if sp.seed is not None:
                    req.generator = torch.Generator().manual_seed(sp.seed)
                if grammar is not None:
                    req.grammar = grammar()
                reqs.append(req)
        return reqs

    def _check_disaggregated(self, msg: GenerateReq) -> None:
        """What a request must be in this engine's disaggregation mode (ValueError names the
        parameter). What a disaggregated request may ask for is ``GenerateReq.validate``'s."""
        mode = self.config.disaggregation_mode
        if mode == "null":
            if msg.bootstrap is not None:
                raise ValueError("bootstrap_room: this server is not in a disaggregation mode")
            return
        if msg.bootstrap is None:
            raise ValueError(f"bootstrap_room is required: this is a {mode} server (send "
                             "requests through SGLang's gateway in PD mode)")

    def _compile_grammar(self, sp: SamplingParams) -> Callable[[], Any] | None:
        """Compile (cached) in the caller's thread so a slow grammar never stalls decoding."""
        if sp.regex is None and sp.json_schema is None and sp.ebnf is None:
            return None
        from plait.core.grammar import GrammarCompiler, GrammarState
        with self._grammar_lock:
            if self.grammar_compiler is None:
                self.grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.vocab_size,
                    compile_timeout=self.config.grammar_compile_timeout)
        compiled = self.grammar_compiler.compile_params(sp)
        ends = self.eos_ids | set(sp.stop_token_ids)
        return lambda: GrammarState(compiled, self.vocab_size, ends)

    def submit(self, reqs: list[Req], on_output: Callable[[Req, bool], None]) -> None:
        """Hand validated requests to the scheduler; ``on_output`` runs on the scheduler
        thread after each step that changed a request (and once when it finishes)."""
        for req in reqs:
            req.on_output = on_output
        decode = self.config.disaggregation_mode == "decode"
        add = self.disagg.add if decode else self.scheduler.add_request
        self._inbox.put((lambda: [add(r) for r in reqs], None))

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | SamplingParams | None = None,
                 **request: Any) -> dict | list[dict] | Iterator[dict]:
        """SGLang's offline API. ``request`` holds the other ``GenerateReq`` fields
        (``input_ids``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``,
        ``stream``, ``rid``), each one value or one per prompt (see ``GenerateReq.batch``).
        One prompt (with n == 1) -> one output; a list (or n > 1) -> a list, prompt-major."""
        msgs, batched = GenerateReq.batch(text=prompt, sampling_params=sampling_params,
                                          **request)
        return self.generate_request(msgs, batched)

    def generate_request(self, msgs: list[GenerateReq],
                         batched: bool = True) -> dict | list[dict] | Iterator[dict]:
        """Run messages; with ``stream`` set (on all of them) an iterator of outputs."""
        stream = _one_stream_flag(msgs)
        reqs = self.make_requests(msgs)
        outputs: queue.Queue = queue.Queue()
        self.submit(reqs, lambda r, done: self._deliver(r, done, outputs.put))
        if stream:
            return self._stream(reqs, outputs)
        results = {}
        while len(results) < len(reqs):
            rid, finished, out = outputs.get()
            if finished:
                results[rid] = out
        ordered = [results[r.rid] for r in reqs]
        return ordered if batched or len(ordered) > 1 else ordered[0]

    def _stream(self, reqs: list[Req], outputs: queue.Queue) -> Iterator[dict]:
        remaining = {r.rid for r in reqs}
        try:
            while remaining:
                rid, finished, out = outputs.get()
                if finished:
                    remaining.discard(rid)
                yield out
        finally:
            for rid in remaining:  # the consumer stopped early: free the requests' KV
                self.abort(rid)

    def _deliver(self, req: Req, finished: bool, put: Callable[[tuple], None]) -> None:
        """Queue ``(rid, finished, output)``: a snapshot taken on the scheduler thread. The
        consumer must not read ``req`` itself, which may have finished (an abort, say) since
        this output was taken; a stream would then stop before its final output."""
        if finished or req.stream:
            put((req.rid, finished, self.output_of(req)))

    def output_of(self, req: Req) -> dict:
        text = req.text if req.finished else RequestFinisher.streamable_text(req)
        end = req.finished_time or req.first_token_time or req.created
        meta = {
            "id": req.rid, "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids), "cached_tokens": req.cached_tokens,
            "finish_reason": req.finish_reason, "e2e_latency": end - req.created,
        }
        if req.return_logprob:
            meta.update(input_token_logprobs=req.input_token_logprobs,
                        output_token_logprobs=req.output_token_logprobs,
                        input_top_logprobs=req.input_top_logprobs,
                        output_top_logprobs=req.output_top_logprobs)
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | SamplingParams | None = None,
                             **request: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """:meth:`generate` for asyncio: awaits the results, or (``stream=True``) returns an
        async iterator."""
        msgs, batched = GenerateReq.batch(text=prompt, sampling_params=sampling_params,
                                          **request)
        return await self.async_generate_request(msgs, batched)

    async def async_generate_request(self, msgs: list[GenerateReq], batched: bool = True
                                     ) -> dict | list[dict] | AsyncIterator[dict]:
        stream = _one_stream_flag(msgs)
        # Tokenizing and compiling a grammar take a while: never on the caller's event loop.
        reqs = await asyncio.to_thread(self.make_requests, msgs)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self.submit(reqs, lambda r, done: self._deliver(
            r, done, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)))
        if stream:
            return self._astream(reqs, outputs)
        results = {}
        while len(results) < len(reqs):
            rid, finished, out = await outputs.get()
            if finished:
                results[rid] = out
        ordered = [results[r.rid] for r in reqs]
        return ordered if batched or len(ordered) > 1 else ordered[0]

    async def _astream(self, reqs: list[Req], outputs: asyncio.Queue) -> AsyncIterator[dict]:
        remaining = {r.rid for r in reqs}
        try:
            while remaining:
                rid, finished, out = await outputs.get()
                if finished:
                    remaining.discard(rid)
                yield out
        finally:
            for rid in remaining:
                self.abort(rid)

    # ----- control -----

    def abort(self, rid: str) -> None:
        self._inbox.put((lambda: self.scheduler.abort(rid)
                         or (self.disagg is not None and self.disagg.abort(rid)), None))

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def get_server_info(self) -> dict:
        def info() -> dict:
            s = self.scheduler
            kv = s.kv.usage()
            return {
                "model_path": str(self.model_dir), "device": self.device_name,
                "max_total_tokens": self.max_total_tokens, "context_length": self.context_len,
                "page_size": self.config.page_size,
                "overlap_schedule": s.executor.overlap,
                "available_kv_tokens": kv.free, "cached_kv_tokens": kv.cached,
                "evictable_kv_tokens": kv.evictable,
                "num_running_reqs": len(s.running) + (1 if s.chunked else 0),
                "num_waiting_reqs": len(s.waiting),
                "disaggregation_mode": self.config.disaggregation_mode,
                **vars(s.stats), **getattr(self.disagg, "stats", {}),
                **s.runner.metrics(),
            }
        return self._call(info)

    def shutdown(self) -> None:
        """Stop the scheduler thread and, under tensor parallelism, every other rank.
        Idempotent."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.disagg is not None:
            self.disagg.close()
            self.disagg = None
        tp, self._tp_runner = self._tp_runner, None
        if tp is not None:
            if self._thread.is_alive():  # stuck mid-forward: no STOP broadcast, just kill
                tp.ranks.stop()
            else:
                tp.shutdown()
        atexit.unregister(self._atexit)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    ids = hf_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _one_stream_flag(msgs: list[GenerateReq]) -> bool:
    flags = {m.stream for m in msgs}
    if len(flags) > 1:
        raise ValueError("stream must be the same for every prompt of a request")
    return flags.pop() if flags else False


def _shutdown_if_alive(ref: "weakref.ref[Engine]") -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
