"""Building an engine's runtime: everything ``plait.Engine`` stands on, in named steps.

``build_runtime`` resolves the model, sizes the KV pool, builds the model runner (or starts
the tensor-parallel ranks), the KV manager and the scheduler, then attaches the prefill or
decode side of disaggregated serving. It owns these steps and nothing after them: the
scheduler thread is ``engine_loop``'s, requests are the engine's.

What holds once ``build_runtime`` returns: every rank holds the same number of KV slots
(``Runtime.max_total_tokens``, a multiple of the page size, at least two pages); and when it
raises, no tensor-parallel rank it started is left running.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plait.core.backend_api import Backend, ModelSpec
from plait.core.engine_config import EngineConfig
from plait.core.kv_manager import KVManager
from plait.core.memory import ReqToTokenPool
from plait.core.kv_layout import largest_bytes_per_token
from plait.core.model_runner import build_model_runner
from plait.core.pp.stage import PPStage
from plait.core.request_output import RequestFinisher
from plait.core.scheduler import Scheduler, SchedulerConfig
from plait.core.spec.config import settings_of

if TYPE_CHECKING:
    from plait.compose import Checkpoint
    from plait.core.tp.runner import TPModelRunner
    from plait.disaggregation.decode import DecodeSide
    from plait.disaggregation.prefill import PrefillSide

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(kw_only=True)
class Runtime:
    """What an engine runs on. ``config`` has the backend's defaults filled in."""

    config: EngineConfig
    backend: Backend
    model_dir: Path
    hf_config: Any
    tokenizer: Any
    quantization: Any
    context_len: int
    max_total_tokens: int  # KV slots per rank
    eos_ids: set[int]
    scheduler: Scheduler
    tp_runner: TPModelRunner | None = None  # rank 0's runner when tp_size or pp_size > 1
    disagg: PrefillSide | DecodeSide | None = None


def build_runtime(cfg: EngineConfig, call_soon: Callable[[Callable[[], Any]], None]) -> Runtime:
    """Build the runtime for a validated ``cfg``. ``call_soon`` queues a function for the
    scheduler thread (the prefill side hands results back through it)."""
    # The composition root looks up the registries; the core only receives what it found.
    from plait import compose

    checkpoint = compose.open_checkpoint(compose.resolve_model_dir(cfg.model_path))
    quantization = cfg.quant_config(checkpoint.model_dir, checkpoint.gguf_source)
    backend = compose.get_backend(cfg.device, cfg.backend_options)
    # Everything from here runs torch on the caller's thread (pool allocation, weight
    # loading): under host_thread, so that thread never owns an OpenMP team (see
    # Backend.host_thread; one such team made every forward kernel sleep between calls).
    with backend.host_thread():
        return _build_on(
            backend, cfg.with_backend_defaults(backend), checkpoint, quantization, call_soon
        )


def size_kv_pool(hf: Any, cfg: EngineConfig, dtype: torch.dtype, loader: Any = None) -> int:
    """KV slots per rank: ``max_total_tokens``, else the KV budget (``kv_cache_bytes``) over
    one token's bytes in every layer, rounded down to whole pages. This is the one
    bytes-per-token rule, and the bytes are the model's to say: the layout ``loader``
    declares (``plait.core.kv_layout``; K and V per KV head when it declares none). A rank
    holds its shard: the budget is per rank, sized by the largest shard, so every rank gets
    the same number of slots."""
    from plait.core.tp.sharding import check_tp_size

    page_size = _page_size(cfg)
    if getattr(loader, "kv_layout", None) is None:  # the heads layout: refuse bad TP sizes
        check_tp_size(hf.num_attention_heads, hf.num_key_value_heads, cfg.tp_size)
    bytes_per_token = largest_bytes_per_token(loader, hf, cfg.tp_size, dtype)
    if cfg.pp_size > 1:  # a stage's pool holds its layers only: size it by the largest stage
        stage = PPStage(size=cfg.pp_size, num_layers=hf.num_hidden_layers)
        bytes_per_token = bytes_per_token // hf.num_hidden_layers * stage.largest_share()
    tokens = cfg.max_total_tokens or cfg.kv_cache_bytes() // bytes_per_token
    tokens -= tokens % page_size
    if tokens < page_size * 2:
        raise ValueError(
            f"max_total_tokens: a KV pool of {tokens} tokens (from "
            f"max_total_tokens, kv_cache_memory_gb or mem_fraction) is too "
            f"small; page_size={page_size} needs at least two pages"
        )
    return tokens


def scheduler_config(
    cfg: EngineConfig, context_len: int, rope_reprefill_length: int | None = None
) -> SchedulerConfig:
    """The scheduler's settings from the engine's. Speculative decoding runs without the
    overlap schedule (as SGLang's NGRAM does): drafts are cut from the tokens the previous
    step committed, so the next step cannot be planned before that one is processed."""
    spec = settings_of(cfg)
    if spec is not None and not cfg.disable_overlap_schedule:
        log.info("speculative decoding: the overlap schedule is off")
    return SchedulerConfig(
        max_running_requests=cfg.max_running_requests,
        chunked_prefill_size=cfg.chunked_prefill_size,
        max_prefill_tokens=cfg.max_prefill_tokens,
        schedule_policy=cfg.schedule_policy,
        context_len=context_len,
        enable_jump_forward=not cfg.disable_jump_forward,
        # A prefill server hands each request off after its first token; a decode planned
        # for it in the meantime would be wasted and race the hand-off, so prefill servers
        # run one batch at a time.
        overlap=not cfg.disable_overlap_schedule
        and cfg.disaggregation_mode != "prefill"
        and spec is None,
        max_loras_per_batch=cfg.max_loras_per_batch if cfg.lora_enabled else None,
        speculative=spec,
        rope_reprefill_length=rope_reprefill_length,
        enable_mixed_chunk=cfg.enable_mixed_chunk,
    )


def attach_disaggregation(
    rt: Runtime, call_soon: Callable[[Callable[[], Any]], None]
) -> PrefillSide | DecodeSide | None:
    """The prefill or decode side of disaggregated serving (None in ``null`` mode), wired
    to the scheduler: a prefill side takes over its hand-offs."""
    cfg, s = rt.config, rt.scheduler
    if cfg.disaggregation_mode == "null":
        return None
    kv_pool = s.runner.kv_pool
    # tensor parallelism: ranks 1..N-1 each registered their KV shard with their own transfer
    ranks = (
        [json.loads(raw) for raw in rt.tp_runner.ranks.published("kv")]
        if rt.tp_runner is not None
        else []
    )
    from plait.disaggregation.transports import create_transfer

    transfer = create_transfer(cfg.disaggregation_transfer_backend, cfg.disaggregation_host)
    if cfg.disaggregation_mode == "prefill":
        from plait.disaggregation.prefill import PrefillSide

        side = PrefillSide(
            transfer,
            kv_pool,
            s.kv.req_pool,
            cfg.disaggregation_host,
            cfg.disaggregation_bootstrap_port,
            cfg.disaggregation_transfer_timeout,
            call_soon=call_soon,
            finish=s.finish_handed_off,
            abort_room=s.abort_room,
            live_rooms=s.bootstrap_rooms,
            rank_controls=[r["control"] for r in ranks],
        )
        s.connect_hand_off(side)
        return side
    from plait.disaggregation.decode import DecodeSide

    return DecodeSide(
        transfer,
        s.kv,
        kv_pool,
        cfg.disaggregation_host,
        cfg.disaggregation_transfer_timeout,
        admit=s.add_prefilled,
        fail=s.finish_unscheduled,
        ranks=ranks,
    )


def attach_lora(
    runner: Any, cfg: EngineConfig, backend: Backend, hf: Any, dtype: torch.dtype
) -> None:
    """Wrap the runner's model for LoRA and load ``cfg.lora_paths`` (``plait.lora``)."""
    from plait.core.model_runner import ModelRunner
    from plait.lora.manager import build_lora_manager

    if not isinstance(runner, ModelRunner):
        raise ValueError(
            f"lora_paths: device {backend.name!r} runs its own model runner; LoRA adapters "
            "need the core's (CPU, CUDA, ROCm)"
        )
    op = None
    if backend.torch_device.type == "cuda":
        from plait.lora.triton_ops import apply_segmented

        op = apply_segmented
    runner.adapters = build_lora_manager(
        runner.model,
        hf,
        lora_paths=cfg.lora_paths,
        max_loras_per_batch=cfg.max_loras_per_batch,
        max_lora_rank=cfg.max_lora_rank,
        lora_target_modules=cfg.lora_target_modules,
        device=backend.torch_device,
        dtype=dtype,
        **({"op": op} if op is not None else {}),
    )


def warm_up(generate: Callable[..., Any], flush_cache: Callable[[], Any]) -> float:
    """Capture (compile, on the CPU) decode for batch 1 and 2 now, not on the first request:
    with dynamic shapes those two graphs serve every later size and length. Returns the
    seconds it took."""
    from tqdm import tqdm

    t = time.perf_counter()
    batches = ([[1, 2, 3]], [[1, 2, 3], [1, 2, 3, 4]])
    for ids in tqdm(
        batches, desc="decode graph warm-up", unit="graph", leave=False, disable=None
    ):  # None: a bar on a terminal, silent in logs and CI
        generate(
            input_ids=ids,
            sampling_params={"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
        )
    flush_cache()
    return time.perf_counter() - t


def eos_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    """The config's end-of-sequence ids and the tokenizer's."""
    ids = hf_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _context_len(cfg: EngineConfig, hf: Any) -> int:
    """The longest sequence served: ``context_length`` capped at ``max_position_embeddings``,
    except under dynamic NTK RoPE, which exists to stretch past it (its frequencies follow the
    sequence length): there the user's ``context_length`` stands."""
    native = int(hf.max_position_embeddings)
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if cfg.context_length and kind == "dynamic":
        return int(cfg.context_length)
    return min(cfg.context_length or native, native)


def _build_on(
    backend: Backend,
    cfg: EngineConfig,
    checkpoint: Checkpoint,
    quantization: Any,
    call_soon: Callable[[Callable[[], Any]], None],
) -> Runtime:
    model_dir, hf, tokenizer = checkpoint.model_dir, checkpoint.hf_config, checkpoint.tokenizer
    context_len = _context_len(cfg, hf)
    dtype = DTYPES[str(cfg.dtype)]
    if cfg.random_seed is not None:
        torch.manual_seed(cfg.random_seed)
    draft = _draft_checkpoint(cfg, checkpoint)  # refuses another tokenizer before loading
    tokens = size_kv_pool(hf, cfg, dtype, checkpoint.load_model)
    page_size = _page_size(cfg)
    req_pool = ReqToTokenPool(cfg.max_running_requests, context_len + 1, backend.torch_device)
    spec = ModelSpec(
        model_dir=model_dir,
        hf_config=hf,
        dtype=dtype,
        context_len=context_len,
        max_batch_size=cfg.max_running_requests,
        quantization=quantization,
        # pipeline stages run eagerly (pp.config refuses --enable-graph-capture with --pp)
        graph_capture=cfg.graph_capture(backend) and cfg.pp_size == 1,
        load_model=checkpoint.load_model,
        deterministic=cfg.enable_deterministic_inference,
    )
    tp_runner: TPModelRunner | None = None
    runner: Any  # a ModelRunner, or rank 0's TPModelRunner: the scheduler calls both alike
    if cfg.pp_size > 1:
        from plait.core.pp.config import check_loader
        from plait.core.pp.runner import start_pipeline_parallel

        architecture = (getattr(hf, "architectures", None) or [hf.model_type])[0]
        check_loader(checkpoint.load_model, architecture, cfg.pp_size)
        tp_runner, allocator = start_pipeline_parallel(
            backend, spec, tokens, page_size, req_pool, cfg.pp_size
        )
        runner = tp_runner
    elif cfg.tp_size == 1:
        runner, allocator = build_model_runner(backend, spec, tokens, page_size, req_pool)
    else:
        from plait.core.tp.runner import start_tensor_parallel

        tp_runner, allocator = start_tensor_parallel(
            backend,
            spec,
            tokens,
            page_size,
            req_pool,
            cfg.tp_size,
            kv_transfer=None
            if cfg.disaggregation_mode == "null"
            else {
                "backend": cfg.disaggregation_transfer_backend,
                "host": cfg.disaggregation_host,
                "mode": cfg.disaggregation_mode,
            },
        )
        runner = tp_runner
    try:
        if cfg.lora_enabled:
            attach_lora(runner, cfg, backend, hf, dtype)
        kv = KVManager.create(req_pool, allocator, enable_cache=not cfg.disable_radix_cache)
        eos = eos_ids(hf, tokenizer)
        scheduler = Scheduler(
            runner,
            kv,
            RequestFinisher(tokenizer, eos),
            scheduler_config(
                cfg,
                context_len,
                getattr(getattr(runner, "model", None), "rope_reprefill_length", None),
            ),
        )
        if draft is not None:
            from plait.core.spec.draft_setup import attach_draft_model

            attach_draft_model(scheduler, backend, cfg, draft, spec, tokens)
        rt = Runtime(
            config=cfg,
            backend=backend,
            model_dir=model_dir,
            hf_config=hf,
            tokenizer=tokenizer,
            quantization=quantization,
            context_len=context_len,
            max_total_tokens=tokens,
            eos_ids=eos,
            scheduler=scheduler,
            tp_runner=tp_runner,
        )
        rt.disagg = attach_disaggregation(rt, call_soon)
        return rt
    except BaseException:
        if tp_runner is not None:  # the other ranks started: stop them too
            tp_runner.ranks.stop()
        raise


def _draft_checkpoint(cfg: EngineConfig, target: Checkpoint) -> Checkpoint | None:
    """STANDALONE's draft checkpoint (config and tokenizer; weights load later), checked to
    share the target's tokenizer; None for any other algorithm."""
    if cfg.speculative_algorithm != "STANDALONE":
        return None
    from plait import compose
    from plait.core.spec.draft_setup import check_same_tokenizer

    draft = compose.open_checkpoint(compose.resolve_model_dir(cfg.speculative_draft_model_path))
    check_same_tokenizer(target, draft)
    return draft


def _page_size(cfg: EngineConfig) -> int:
    if cfg.page_size is None:
        raise ValueError("page_size is unset: fill the backend's defaults first")
    return cfg.page_size
