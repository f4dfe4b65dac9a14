"""``plait serve`` options: one dataclass, its argparse flags, and the ``plait.Engine`` kwargs
it maps to. Engine options are the SGLang names users already know."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class ServerArgs:
    model_path: str = "default"
    device: str = "auto"
    dtype: str | None = None  # None: the backend's default (float32 on CPU, bf16 on NPU)
    quantization: str | None = None  # None: gguf for a .gguf model path, else none
    quantization_activations: str = "float"
    host: str = "127.0.0.1"
    port: int = 30000
    tp: int = 1
    pp: int = 1  # pipeline-parallel ranks (docs/pipeline-parallel.md)
    chunked_prefill_size: int | None = None
    enable_mixed_chunk: bool = False  # a prefill chunk and the decodes in one forward
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False  # run each forward inline (SGLang's flag)
    disable_graph_capture: bool = False  # decode runs eagerly even where capture is default
    enable_graph_capture: bool = False  # capture where the device defaults to eager (CPU)
    enable_deterministic_inference: bool = False  # batch-invariant (docs/deterministic.md)
    page_size: int | None = None  # None: the backend's default
    # Speculative decoding (docs/speculative.md), SGLang's flags; None: the engine's defaults.
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_num_steps: int | None = None
    speculative_draft_model_path: str | None = None
    max_running_requests: int = 64
    mem_fraction: float | None = None
    max_total_tokens: int | None = None
    kv_cache_memory_gb: float | None = None
    context_length: int | None = None
    random_seed: int | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    log_level: str = "info"
    startup_timeout: float = 600.0
    grammar_compile_timeout: float | None = None  # engine default (10 s)
    tool_call_parser: str | None = None  # None: detected from the chat template
    reasoning_parser: str | None = None  # None: reasoning stays in the content
    # Reliability limits (docs/reliability.md): one client can neither exhaust the server nor
    # keep it from shutting down.
    max_request_body_bytes: int = 4 * 2**20  # larger bodies get 413 before parsing
    max_queued_requests: int = 256  # beyond running + this: 429 + Retry-After
    max_queue_time: float = 20.0  # predicted queue wait above this: 503 (0: off)
    request_timeout: float | None = None  # seconds per request, then abort (KV freed)
    shutdown_timeout: float = 30.0  # SIGTERM: wait this long for running requests
    # Connection limits (plait.server.connection_guard): slow or silent clients are cut.
    header_read_timeout: float = 10.0  # the request head must arrive within this, else 408
    body_read_timeout: float = 30.0  # the whole body within this after the head, else 408
    keep_alive_timeout: float = 5.0  # an idle kept-alive connection is closed after this
    stream_stall_timeout: float = 30.0  # a response blocked on a non-reading client: cut
    stream_interval: int = 1  # a stream's events every N tokens (SGLang's --stream-interval)
    max_header_bytes: int = 32 * 1024  # a larger request head gets 431
    max_header_count: int = 100  # more header fields get 431
    # Data parallelism: N workers behind SGLang's gateway (plait.server.data_parallel).
    dp: int = 1
    router_policy: str = "cache_aware"
    router_extra_args: str | None = None
    router_prometheus_port: int | None = None
    router_dp_worker_base_port: int | None = None  # --dp/--pd servers on base, base+1, ...
    # Prefill/decode disaggregation behind SGLang's gateway in PD mode (plait.disaggregation).
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    disaggregation_transfer_backend: str = "mooncake"
    disaggregation_transfer_timeout: float = 30.0
    pd: str | None = None  # "1P1D": start the pair + gateway
    disaggregation_bootstrap_base_port: int | None = None  # --pd: prefill i's is base + i
    # LoRA adapters (plait.lora, docs/lora.md), SGLang's flags
    lora_paths: list[str] | None = None  # name=path ...
    max_loras_per_batch: int = 8
    max_lora_rank: int | None = None
    lora_target_modules: list[str] | None = None
    # SGLang's gateway (plait.server.gateway) and gRPC workers (plait.server.grpc).
    gateway: str | None = None  # smg or sglang-router (0.3.2, HTTP only); see gateway_name
    grpc_mode: bool = False  # serve SGLang's scheduler service over gRPC instead of HTTP
    join: str | None = None  # a running smg gateway's URL: register there, leave on SIGTERM
    leave_gateway: str | None = None  # the gateway that lists this server: leave it on SIGTERM
    # Dotted "module:callable" that builds the engine in the scheduler process (tests use a
    # fake); None means plait.Engine.
    engine_factory: str | None = None

    def resolved_model_path(self) -> str:
        """A model directory: ``default`` (or empty) is SmolLM2-135M-Instruct, fetched on first
        use; a ``.gguf`` file is converted once into the model cache. Resolved here, once, so
        the HTTP process's tokenizer and the engine read the same files."""
        if self.model_path in ("", "default"):
            from plait.models.default import default_model_path

            return str(default_model_path())
        from plait.models.loader import resolve_model_dir

        return str(resolve_model_dir(self.model_path))

    def model_name(self, model_path: str) -> str:
        return self.served_model_name or Path(model_path).name

    def engine_kwargs(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for ``plait.Engine``; options left at None are not passed so the
        engine's own defaults apply. ``mem_fraction`` stays a fraction here (checked now, so a
        bad one stops the launch): the process that allocates the KV pool turns it into
        ``kv_cache_memory_gb`` (``scheduler_process.kv_budget_from_fraction``)."""
        if self.mem_fraction is not None:
            check_mem_fraction(self.mem_fraction)
        kwargs = dict(
            model_path=model_path,
            device=self.device,
            dtype=self.dtype,
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            chunked_prefill_size=self.chunked_prefill_size,
            enable_mixed_chunk=self.enable_mixed_chunk or None,
            schedule_policy=self.schedule_policy,
            disable_radix_cache=self.disable_radix_cache,
            disable_graph_capture=self.disable_graph_capture or None,
            enable_graph_capture=self.enable_graph_capture or None,
            enable_deterministic_inference=self.enable_deterministic_inference or None,
            max_running_requests=self.max_running_requests,
            mem_fraction=self.mem_fraction,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            context_length=self.context_length,
            random_seed=self.random_seed,
            grammar_compile_timeout=self.grammar_compile_timeout,
            disable_overlap_schedule=self.disable_overlap_schedule or None,
            speculative_algorithm=self.speculative_algorithm,
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
            speculative_num_steps=self.speculative_num_steps,
            speculative_draft_model_path=self.speculative_draft_model_path,
            tp_size=self.tp if self.tp != 1 else None,
            pp_size=self.pp if self.pp != 1 else None,
            quantization=self.quantization,
            quantization_activations=(
                None if self.quantization_activations == "float" else self.quantization_activations
            ),
        )
        if self.lora_paths or self.max_lora_rank is not None:
            kwargs.update(
                lora_paths=self.lora_paths,
                max_loras_per_batch=self.max_loras_per_batch,
                max_lora_rank=self.max_lora_rank,
                lora_target_modules=self.lora_target_modules,
            )
        if self.quantization is None and self.model_path.endswith(".gguf"):
            kwargs["quantization"] = "gguf"  # model_path arrives here resolved to a directory
        if self.disaggregation_mode != "null":
            kwargs.update(
                disaggregation_mode=self.disaggregation_mode,
                disaggregation_bootstrap_port=self.disaggregation_bootstrap_port,
                disaggregation_transfer_backend=self.disaggregation_transfer_backend,
                disaggregation_transfer_timeout=self.disaggregation_transfer_timeout,
                disaggregation_host=_reachable(self.host),
            )
        return {k: v for k, v in kwargs.items() if v is not None}

    def validate(self) -> None:
        """ValueError naming the flags of a combination ``plait serve`` cannot run, before any
        process starts (the launchers would otherwise report only a child's exit status).
        Engine options alone are the engine's to check; these are the combinations of serving
        modes, and the ``--device`` backend's limits when it is named (not ``auto``)."""
        if self.dp < 1:
            raise ValueError(f"--dp must be at least 1, got {self.dp}")
        self._check_limits()
        pd = f"--pd {self.pd}" if self.pd is not None else None
        if pd and (self.dp > 1 or self.disaggregation_mode != "null"):
            raise ValueError(
                "--pd starts its own servers: it cannot be combined with --dp or "
                "--disaggregation-mode"
            )
        disagg = pd or (
            f"--disaggregation-mode {self.disaggregation_mode}"
            if self.disaggregation_mode != "null"
            else None
        )
        self._check_pipeline(disagg)
        if self.enable_mixed_chunk and (disagg or self.speculative_algorithm):
            raise ValueError(
                f"--enable-mixed-chunk with {disagg or '--speculative-algorithm'}: a mixed "
                "forward needs a server that prefills and decodes one token a step"
            )
        if self.dp > 1 and self.tp > 1:
            raise ValueError(
                f"--dp {self.dp} with --tp {self.tp}: every worker's tensor-parallel "
                "ranks would take the same cores (CPU) or devices (rank r uses "
                "device r in each worker); use --dp or --tp"
            )
        self._check_gateway(disagg)
        self._check_pinned_ports()
        if self.dp > 1 and disagg:
            raise ValueError(
                f"--dp {self.dp} with {disagg}: the --dp gateway does not route "
                "prefill/decode pairs and its workers would share one bootstrap "
                "port; use --pd XPYD"
            )
        self._check_device()
        self._check_parsers()
        self._check_speculative()

    def _check_pinned_ports(self) -> None:
        """The launchers' port flags: refused (not ignored) without a launcher, and every
        pinned port a port number. Whether each is free is checked when it is handed out."""
        pins = {
            "--router-dp-worker-base-port": self.router_dp_worker_base_port,
            "--router-prometheus-port": self.router_prometheus_port,
            "--disaggregation-bootstrap-base-port": self.disaggregation_bootstrap_base_port,
        }
        for flag, port in pins.items():
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{flag} must be a port number (1-65535), got {port}")
        launcher = self.dp > 1 or self.pd is not None
        if not launcher and any(p is not None for p in pins.values()):
            given = [f for f, p in pins.items() if p is not None]
            raise ValueError(f"{', '.join(given)} only apply to --dp N (N > 1) or --pd XPYD")
        if self.disaggregation_bootstrap_base_port is not None and self.pd is None:
            raise ValueError("--disaggregation-bootstrap-base-port only applies to --pd XPYD")

    def _check_parsers(self) -> None:
        from plait.server.reasoning import REASONING_PARSERS
        from plait.server.tools.parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"--tool-call-parser must be one of {sorted(PARSERS)}, got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"--reasoning-parser must be one of {REASONING_PARSERS}, "
                f"got {self.reasoning_parser!r}"
            )

    def _check_limits(self) -> None:
        positive = (
            "header_read_timeout",
            "body_read_timeout",
            "keep_alive_timeout",
            "stream_stall_timeout",
            "stream_interval",
            "max_header_bytes",
            "max_header_count",
        )
        for name in (*positive, "max_queue_time"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name in positive):
                sign = "positive" if name in positive else "at least 0 (0: off)"
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be {sign}, got {value}")

    @property
    def gateway_name(self) -> str:
        """The gateway ``--dp``/``--pd`` start: ``--gateway``, else smg (SGLang's current
        gateway; sglang-router 0.3.2 stays available with ``--gateway sglang-router``)."""
        return self.gateway or "smg"

    def _check_gateway(self, disagg: str | None) -> None:
        launcher = self.dp > 1 or self.pd is not None
        if self.gateway not in (None, "smg", "sglang-router"):
            raise ValueError(f"--gateway must be smg or sglang-router, got {self.gateway!r}")
        if self.grpc_mode and disagg:
            raise ValueError(
                f"--grpc-mode with {disagg}: prefill/decode servers speak HTTP only; "
                "drop --grpc-mode"
            )
        if self.grpc_mode and self.gateway_name != "smg" and launcher:
            raise ValueError("--grpc-mode workers need --gateway smg (sglang-router speaks HTTP)")
        if self.grpc_mode and self.api_key:
            raise ValueError(
                "--grpc-mode with --api-key: a gRPC worker has no client authentication; "
                "keep it on a private network and set the key on the gateway"
            )
        if self.join is not None and (launcher or disagg):
            raise ValueError(
                "--join registers this one worker with a running gateway: it cannot be "
                "combined with --dp, --pd or --disaggregation-mode"
            )
        for flag, url in (("--join", self.join), ("--leave-gateway", self.leave_gateway)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{flag} must be the gateway's http(s):// URL, got {url!r}")

    def _check_pipeline(self, disagg: str | None) -> None:
        """--pp with another mode that would split or share its ranks, and the engine's
        own refusals (--tp, LoRA, speculative, quantization: ``plait.core.pp.config``)."""
        from plait.core.engine_config import EngineConfig
        from plait.core.pp.config import check_pipeline

        if self.pp < 1:
            raise ValueError(f"--pp must be at least 1, got {self.pp}")
        if self.pp == 1:
            return
        check_pipeline(
            EngineConfig(
                model_path=self.model_path,
                tp_size=self.tp,
                pp_size=self.pp,
                quantization=self.quantization,
                enable_graph_capture=self.enable_graph_capture,
                lora_paths=self.lora_paths,
                max_lora_rank=self.max_lora_rank,
                speculative_algorithm=self.speculative_algorithm,
            )
        )
        if disagg:
            raise ValueError(
                f"{disagg} with --pp {self.pp}: prefill/decode disaggregation does not "
                "support pipeline parallelism; use --pp 1"
            )
        if self.dp > 1:
            raise ValueError(
                f"--dp {self.dp} with --pp {self.pp}: every worker's pipeline ranks would "
                "take the same cores; use --dp or --pp"
            )

    def _check_speculative(self) -> None:
        from plait.core.engine_config import EngineConfig
        from plait.core.spec.config import check_speculative

        check_speculative(
            EngineConfig(
                tp_size=self.tp,
                pp_size=self.pp,
                page_size=self.page_size,
                disaggregation_mode="prefill" if self.pd else self.disaggregation_mode,
                speculative_algorithm=self.speculative_algorithm,
                speculative_num_draft_tokens=self.speculative_num_draft_tokens,
                speculative_num_steps=self.speculative_num_steps,
                speculative_draft_model_path=self.speculative_draft_model_path,
            )
        )

    def _check_device(self) -> None:
        from plait.backends.registry import backend_classes
        from plait.core.engine_config import EngineConfig

        backend = backend_classes().get(self.device)
        if backend is not None:  # auto, or an unknown name: the engine resolves and checks it
            EngineConfig(
                tp_size=self.tp,
                disable_graph_capture=self.disable_graph_capture,
                enable_graph_capture=self.enable_graph_capture,
                enable_deterministic_inference=self.enable_deterministic_inference,
            ).check_backend(backend)

    def to_argv(self) -> list[str]:
        """The ``plait serve`` flags that rebuild these arguments (the ``--dp`` launcher starts
        its workers with them). Flags are the field names with dashes; None is left out."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if (
                value is None
                or value is False
                or (f.name == "dp" and value == 1)
                or (f.name.startswith("disaggregation_") and value == getattr(ServerArgs, f.name))
            ):
                continue
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = None if self.api_key is None else "***"
        return d


def check_mem_fraction(fraction: Any) -> None:
    """ValueError naming ``--mem-fraction`` unless ``0 < fraction <= 1``."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"mem_fraction (--mem-fraction) must be in (0, 1], a share of the "
            f"device memory free at start; got {fraction!r}"
        )


def _reachable(host: str) -> str:
    """The address peers use for a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return host


def from_namespace(ns: argparse.Namespace) -> ServerArgs:
    names = {f.name for f in fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(ns).items() if k in names})
