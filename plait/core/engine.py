"""``plait.Engine``: the offline API. Loads a model on a backend, runs the scheduler on a
background thread, and turns requests into results, streams or awaitables.

Requests may come from many threads at once (the frontend's run_batch, a server); all of them
meet in one scheduler so they batch together. Bad input is rejected here, in the caller's
thread, before anything reaches the scheduler.
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import torch

from plait.core.backend_api import ModelSpec
from plait.core.engine_config import EngineConfig
from plait.core.memory import ReqToTokenPool
from plait.core.radix_cache import RadixCache
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampling_params import SamplingParams
from plait.core.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    def __init__(self, model_path: str | Path | None = None, **kwargs: Any):
        self.config = cfg = EngineConfig(model_path=model_path, **kwargs)
        cfg.validate()
        self._load(cfg)
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="plait-scheduler", daemon=True)
        self._thread.start()
        # Stop the scheduler thread before the interpreter tears modules down under it. A weak
        # reference, so an engine nobody holds can still be garbage collected.
        self._atexit = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._atexit)
        if getattr(self.scheduler.runner, "graph_runner", None) is not None:
            self._warm_up()

    # ----- construction -----

    def _load(self, cfg: EngineConfig) -> None:
        from plait.backends import registry
        from plait.models.loader import load_config, load_tokenizer, resolve_model_dir

        if cfg.model_path is None:
            from plait.models.default import default_model_path
            model_dir = default_model_path()
        else:
            model_dir = resolve_model_dir(cfg.model_path)
        self.model_dir = model_dir
        self.backend = backend = registry.get_backend(cfg.device)
        self.device_name = backend.name
        self.config = cfg = cfg.with_backend_defaults(backend)
        device = backend.torch_device
        self.hf_config = hf = load_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.context_len = min(cfg.context_length or hf.max_position_embeddings,
                               hf.max_position_embeddings)
        dtype = _DTYPES[cfg.dtype]
        if cfg.random_seed is not None:
            torch.manual_seed(cfg.random_seed)
        from plait.models.llama import head_dim_of
        head_dim = head_dim_of(hf)
        kv_heads, layers = hf.num_key_value_heads, hf.num_hidden_layers
        per_token = 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        tokens = cfg.max_total_tokens or int(cfg.kv_cache_memory_gb * 2**30) // per_token
        tokens -= tokens % cfg.page_size
        if tokens < cfg.page_size * 2:
            raise ValueError(f"max_total_tokens={tokens} is too small for page_size={cfg.page_size}")
        self.max_total_tokens = tokens
        kv_pool = backend.create_kv_pool(num_slots=tokens, num_layers=layers,
                                         num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                                         page_size=cfg.page_size)
        allocator = backend.create_allocator(num_slots=tokens, page_size=cfg.page_size)
        req_pool = ReqToTokenPool(cfg.max_running_requests, self.context_len + 1, device)
        tree = None if cfg.disable_radix_cache else RadixCache(allocator, cfg.page_size)
        runner = backend.create_model_runner(
            ModelSpec(model_dir, hf, dtype, self.context_len, cfg.max_running_requests,
                      graph_capture=cfg.graph_capture(backend)),
            kv_pool, req_pool)
        self.eos_ids = _eos_ids(hf, self.tokenizer)
        self.vocab_size = hf.vocab_size
        self.scheduler = Scheduler(
            runner, req_pool, allocator, tree, RequestFinisher(self.tokenizer, self.eos_ids),
            SchedulerConfig(max_running_requests=cfg.max_running_requests,
                            chunked_prefill_size=cfg.chunked_prefill_size,
                            max_prefill_tokens=cfg.max_prefill_tokens,
                            schedule_policy=cfg.schedule_policy, context_len=self.context_len,
                            enable_jump_forward=not cfg.disable_jump_forward))
        self.grammar_compiler = None
        self._grammar_lock = threading.Lock()

    def _warm_up(self) -> None:
        """Capture (compile, on the CPU) decode for batch 1 and 2 now, not on the first
        request: with dynamic shapes those two graphs serve every later size and length."""
        t = time.perf_counter()
        log.info("capturing decode graphs (batch 1 and 2)...")
        for n in (1, 2):
            self.generate(input_ids=[[1, 2, 3]] * n, sampling_params={"max_new_tokens": 2, "temperature": 0,
                                           "ignore_eos": True})
        self.flush_cache()
        log.info("decode graphs captured in %.1f s", time.perf_counter() - t)

    # ----- the scheduler thread -----

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                block = not self.scheduler.has_work()
                cmd = self._inbox.get(block=block, timeout=0.1 if block else None)
                self._run_command(cmd)
                continue  # drain every pending command before the next forward
            except queue.Empty:
                pass
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

    def make_requests(self, prompt: str | list[str] | None = None,
                      sampling_params: dict | list[dict] | SamplingParams | None = None,
                      input_ids: list[int] | list[list[int]] | None = None,
                      return_logprob: bool = False, logprob_start_len: int = -1,
                      top_logprobs_num: int = 0, rid: str | list[str] | None = None,
                      stream: bool = False) -> tuple[list[Req], bool]:
        """Validate and tokenize; returns the requests (n per prompt) and whether the input
        was a single prompt. Raises ValueError naming the bad parameter."""
        prompts, single = self._normalize_inputs(prompt, input_ids)
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError(f"sampling_params has {len(sps)} entries for {len(prompts)} prompts")
        rids = rid if isinstance(rid, list) else [rid] * len(prompts)
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be an integer >= -1, got {logprob_start_len!r}")
        if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= self.vocab_size:
            raise ValueError(f"top_logprobs_num must be an integer in [0, {self.vocab_size}], "
                             f"got {top_logprobs_num!r}")
        reqs = []
        for ids, sp_in, base in zip(prompts, sps, rids):
            sp = SamplingParams.from_dict(sp_in)
            if isinstance(sp_in, SamplingParams):
                sp.normalize()
            sp.validate(self.vocab_size)
            self._check_lengths(ids, sp)
            grammar = self._compile_grammar(sp)
            base = base or uuid.uuid4().hex
            for i in range(sp.n):
                req = Req(rid=base if sp.n == 1 else f"{base}-{i}", input_ids=list(ids),
                          sampling=sp, return_logprob=return_logprob,
                          logprob_start_len=logprob_start_len,
                          top_logprobs_num=top_logprobs_num, stream=stream)
                if sp.seed is not None:
                    req.generator = torch.Generator().manual_seed(sp.seed + i)
                if grammar is not None:
                    req.grammar = grammar()
                reqs.append(req)
        return reqs, single and reqs[0].sampling.n == 1

    def _normalize_inputs(self, prompt: Any, input_ids: Any) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("exactly one of prompt and input_ids must be given")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if single else prompt
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            return [self.tokenizer.encode(t) for t in texts], single
        single = isinstance(input_ids, list) and all(isinstance(t, int) for t in input_ids)
        lists = [input_ids] if single else input_ids
        if not isinstance(lists, list) or not all(
                isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in ids) for ids in lists):
            raise ValueError("input_ids must be a list of ints or a list of such lists")
        for ids in lists:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"input_ids contains token ids outside [0, {self.vocab_size}): "
                                 f"{bad[:5]}")
        return lists, single

    def _check_lengths(self, ids: list[int], sp: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.context_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is "
                             f"{self.context_len} (prompts are never truncated)")
        if len(ids) + sp.max_new_tokens > self.context_len:
            raise ValueError(f"max_new_tokens={sp.max_new_tokens} plus the prompt's {len(ids)} "
                             f"tokens exceeds the context length {self.context_len}")
        if len(ids) + 1 > self.max_total_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens but the KV pool holds only "
                             f"{self.max_total_tokens} (max_total_tokens)")

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
        self._inbox.put((lambda: [self.scheduler.add_request(r) for r in reqs], None))

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | SamplingParams | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 return_logprob: bool = False, logprob_start_len: int = -1,
                 top_logprobs_num: int = 0, stream: bool = False,
                 rid: str | list[str] | None = None) -> dict | list[dict] | Iterator[dict]:
        reqs, single = self.make_requests(prompt, sampling_params, input_ids, return_logprob,
                                          logprob_start_len, top_logprobs_num, rid, stream)
        outputs: queue.Queue = queue.Queue()
        self.submit(reqs, lambda r, done: self._deliver(r, done, outputs.put))
        if stream:
            return self._stream(reqs, outputs)
        results = {}
        while len(results) < len(reqs):
            req, out = outputs.get()
            if req.finished and out["meta_info"]["finish_reason"] is not None:
                results[req.rid] = out
        ordered = [results[r.rid] for r in reqs]
        return ordered[0] if single else ordered

    def _stream(self, reqs: list[Req], outputs: queue.Queue) -> Iterator[dict]:
        remaining = {r.rid for r in reqs}
        try:
            while remaining:
                req, out = outputs.get()
                if req.finished:
                    remaining.discard(req.rid)
                yield out
        finally:
            for rid in remaining:  # the consumer stopped early: free the requests' KV
                self.abort(rid)

    def _deliver(self, req: Req, finished: bool, put: Callable[[tuple], None]) -> None:
        if finished or req.stream:
            put((req, self.output_of(req)))

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

    async def async_generate(self, *args: Any, stream: bool = False,
                             **kwargs: Any) -> dict | list[dict] | AsyncIterator[dict]:
        # Tokenizing and compiling a grammar take a while: never on the caller's event loop.
        reqs, single = await asyncio.to_thread(
            functools.partial(self.make_requests, *args, stream=stream, **kwargs))
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self.submit(reqs, lambda r, done: self._deliver(
            r, done, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)))
        if stream:
            return self._astream(reqs, outputs)
        results = {}
        while len(results) < len(reqs):
            req, out = await outputs.get()
            if req.finished:
                results[req.rid] = out
        ordered = [results[r.rid] for r in reqs]
        return ordered[0] if single else ordered

    async def _astream(self, reqs: list[Req], outputs: asyncio.Queue) -> AsyncIterator[dict]:
        remaining = {r.rid for r in reqs}
        try:
            while remaining:
                req, out = await outputs.get()
                if req.finished:
                    remaining.discard(req.rid)
                yield out
        finally:
            for rid in remaining:
                self.abort(rid)

    # ----- control -----

    def abort(self, rid: str) -> None:
        self._inbox.put((lambda: self.scheduler.abort(rid), None))

    def flush_cache(self) -> bool:
        return self._call(self.scheduler.flush_cache)

    def get_server_info(self) -> dict:
        def info() -> dict:
            s = self.scheduler
            tree = s.tree
            graph = getattr(s.runner, "graph_runner", None)
            return {
                "model_path": str(self.model_dir), "device": self.device_name,
                "max_total_tokens": self.max_total_tokens, "context_length": self.context_len,
                "page_size": self.config.page_size,
                "available_kv_tokens": s.allocator.available_size(),
                "cached_kv_tokens": tree.total_size() if tree is not None else 0,
                "evictable_kv_tokens": tree.evictable_size() if tree is not None else 0,
                "num_running_reqs": len(s.running) + (1 if s.chunked else 0),
                "num_waiting_reqs": len(s.waiting),
                **vars(s.stats),
                "graph_capture": graph is not None,
                **(graph.stats() if graph is not None else {}),
            }
        return self._call(info)

    def shutdown(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
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


def _shutdown_if_alive(ref: "weakref.ref[Engine]") -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
