"""Engine settings, SGLang's ServerArgs names where they exist; validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.core.backend_api import Backend
from plait.core.schedule_policy import POLICIES
from plait.quant import ACTIVATIONS, QuantConfig, check_method

DISAGGREGATION_MODES = ("null", "prefill", "decode")
DEFAULT_KV_CACHE_GB = 1.0  # the KV budget when neither max_total_tokens nor a budget is set
TRANSFER_BACKENDS = ("mooncake", "fake")


@dataclass
class EngineConfig:
    model_path: str | Path | None = None  # None: the default SmolLM2-135M-Instruct
    device: str = "cpu"  # a backend name or "auto"
    # The backend's switches: its ``options_type`` (``CpuOptions`` on the CPU) or a dict of
    # that type's fields; None: its defaults. A backend with no switches refuses any.
    backend_options: Any = None
    dtype: str | None = None  # None: the backend's default_dtype
    page_size: int | None = None  # None: the backend's default_page_size
    # The KV pool's size: in tokens, or as a budget in GiB (DEFAULT_KV_CACHE_GB when neither
    # is set); giving both is a ValueError, like the server's exclusive flags.
    max_total_tokens: int | None = None
    kv_cache_memory_gb: float | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 8192
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    disable_jump_forward: bool = False  # grammar-forced text is extended in one step
    disable_overlap_schedule: bool = False  # run each forward inline instead of one batch ahead
    max_running_requests: int = 64
    context_length: int | None = None
    random_seed: int | None = None
    grammar_compile_timeout: float = 10.0  # seconds; a slower constraint is a ValueError
    tp_size: int = 1  # tensor-parallel ranks (processes), see tp/
    pp_size: int = 1  # pipeline-parallel ranks (processes), see pp/
    quantization: str | None = None  # plait.quant.METHODS; None: gguf for a .gguf path
    quantization_group_size: int = 32  # int4 only (multiple of 32; docs/benchmarks.md)
    quantization_symmetric: bool = False  # int4 only: (q - 8) * scale instead of q*scale+min
    quantization_activations: str = "float"  # plait.quant.ACTIVATIONS; int8: CPU with VNNI
    # Prefill/decode disaggregation (plait.disaggregation), SGLang's flag names.
    disaggregation_mode: str = "null"  # null | prefill | decode
    disaggregation_bootstrap_port: int = 8998  # prefill: where decode servers reach it
    disaggregation_transfer_backend: str = "mooncake"  # mooncake | fake (tests, one process)
    disaggregation_transfer_timeout: float = 30.0  # seconds a request may wait for its KV
    disaggregation_host: str = "127.0.0.1"  # address peers use to reach this engine
    # Decode graph capture (CUDA/HIP graphs; torch.compile on the CPU). Each backend has a
    # default (Backend.default_graph_capture: on for CUDA, off for the CPU, whose compile
    # takes minutes); disable_* forces eager, enable_* forces capture. Setting both is an error.
    disable_graph_capture: bool = False
    enable_graph_capture: bool = False
    # LoRA adapters (plait.lora, docs/lora.md), SGLang's names: ``["name=path", ...]``;
    # enabled when lora_paths or max_lora_rank is set. Unset rank and targets come from the
    # initial adapters.
    lora_paths: list[str] | dict[str, str] | None = None
    max_loras_per_batch: int = 8  # device slots: distinct adapters in one running batch
    max_lora_rank: int | None = None
    lora_target_modules: list[str] | None = None  # "all" or q_proj, k_proj, ... down_proj

    @property
    def lora_enabled(self) -> bool:
        return bool(self.lora_paths) or self.max_lora_rank is not None

    # Speculative decoding, SGLang's names (docs/speculative.md; checked by
    # plait.core.spec.config): NGRAM, or STANDALONE with a draft model.
    speculative_algorithm: str | None = None  # None: off
    speculative_num_draft_tokens: int | None = None  # tokens verified per request and pass
    speculative_num_steps: int | None = None  # the longest draft chain
    speculative_draft_model_path: str | None = None  # STANDALONE's draft model
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12
    # Batch-invariant kernels (SGLang's flag; docs/deterministic.md): a request's logprobs do
    # not depend on what shares its batch, its chunking or prefix-cache hits.
    enable_deterministic_inference: bool = False
    # A prefill chunk and the running decodes in one forward (SGLang's --enable-mixed-chunk;
    # plait.core.mixed, docs/scheduling.md).
    enable_mixed_chunk: bool = False

    def validate(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        positive("page_size", allow_none=True)
        positive("max_total_tokens", allow_none=True)
        positive("chunked_prefill_size", allow_none=True)
        positive("max_prefill_tokens")
        positive("max_running_requests")
        positive("context_length", allow_none=True)
        positive("tp_size")
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.schedule_policy not in POLICIES:
            raise ValueError(
                f"schedule_policy must be one of {POLICIES}, got {self.schedule_policy!r}"
            )
        if not self.grammar_compile_timeout > 0:
            raise ValueError(
                f"grammar_compile_timeout must be > 0, got {self.grammar_compile_timeout!r}"
            )
        if self.quantization is not None:
            check_method(self.quantization)
        positive("quantization_group_size")
        if self.quantization_activations not in ACTIVATIONS:
            raise ValueError(
                f"quantization_activations must be one of "
                f"{', '.join(ACTIVATIONS)}; got {self.quantization_activations!r}"
            )
        if self.quantization_group_size % 32:
            raise ValueError(
                f"quantization_group_size must be a multiple of 32, got "
                f"{self.quantization_group_size!r}"
            )
        if self.disaggregation_mode not in DISAGGREGATION_MODES:
            raise ValueError(
                f"disaggregation_mode must be one of {DISAGGREGATION_MODES}, got "
                f"{self.disaggregation_mode!r}"
            )
        if self.disaggregation_transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(
                f"disaggregation_transfer_backend must be one of "
                f"{TRANSFER_BACKENDS}, got {self.disaggregation_transfer_backend!r}"
            )
        if not 0 < self.disaggregation_bootstrap_port < 65536:
            raise ValueError(
                f"disaggregation_bootstrap_port must be a port number, got "
                f"{self.disaggregation_bootstrap_port!r}"
            )
        if (
            self.disaggregation_mode != "null"
            and self.disaggregation_transfer_backend == "fake"
            and self.tp_size != 1
        ):
            # the worker ranks' KV is in their own processes, which the fake cannot reach
            raise ValueError(
                "disaggregation_transfer_backend='fake' moves memory within one process: "
                "it cannot serve tensor-parallel ranks (tp_size must be 1; use 'mooncake')"
            )
        if not self.disaggregation_transfer_timeout > 0:
            raise ValueError(
                f"disaggregation_transfer_timeout must be > 0, got "
                f"{self.disaggregation_transfer_timeout!r}"
            )
        quantized = self.quantization not in (None, "none") or str(self.model_path or "").endswith(
            ".gguf"
        )
        if quantized and self.tp_size != 1:
            # refused here, before the rank processes start; the loader checks it again
            raise ValueError(
                f"quantization={self.quantization or 'gguf'!r} does not support "
                f"tensor parallelism yet (tp_size must be 1, got {self.tp_size})"
            )
        self._validate_lora()
        from plait.core.pp.config import check_pipeline

        check_pipeline(self)
        self._validate_deterministic()
        self._validate_mixed_chunk()
        if self.disable_graph_capture and self.enable_graph_capture:
            raise ValueError("disable_graph_capture and enable_graph_capture are both set")
        from plait.core.spec.config import check_speculative

        check_speculative(self)
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if self.max_total_tokens is not None and self.kv_cache_memory_gb is not None:
            # SGLang documents no order for its analogues (its code silently caps one by the
            # other); the pool's size has one source here, as with the server's flags.
            raise ValueError(
                f"max_total_tokens={self.max_total_tokens} and kv_cache_memory_gb="
                f"{self.kv_cache_memory_gb} both size the KV pool; give one"
            )

    def _validate_lora(self) -> None:
        from plait.lora.adapter import TARGETS, parse_lora_paths

        parse_lora_paths(self.lora_paths)
        m = self.max_loras_per_batch
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise ValueError(f"max_loras_per_batch must be a positive integer, got {m!r}")
        r = self.max_lora_rank
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
            raise ValueError(f"max_lora_rank must be a positive integer, got {r!r}")
        bad = sorted(set(self.lora_target_modules or ()) - {*TARGETS, "all"})
        if bad:
            raise ValueError(
                f"lora_target_modules: {bad} not supported (only all, {', '.join(TARGETS)})"
            )
        if not self.lora_enabled:
            return
        if self.tp_size != 1:
            raise ValueError(
                "lora_paths: LoRA adapters do not support tensor parallelism yet (tp_size must be 1)"
            )
        if self.disaggregation_mode != "null":
            raise ValueError(
                "lora_paths: LoRA adapters do not support prefill/decode disaggregation yet"
            )

    def _validate_mixed_chunk(self) -> None:
        """Refuse, by name, the combinations a mixed forward cannot serve."""
        if not self.enable_mixed_chunk:
            return
        flag = "enable_mixed_chunk (--enable-mixed-chunk)"
        if self.speculative_algorithm is not None:
            # running requests decode through verify passes, not one-token rows
            raise ValueError(f"{flag} does not support speculative decoding")
        if self.disaggregation_mode != "null":
            # a prefill server decodes nothing, a decode server prefills nothing
            raise ValueError(f"{flag} does not support prefill/decode disaggregation")

    def _validate_deterministic(self) -> None:
        if not self.enable_deterministic_inference:
            return
        flag = "enable_deterministic_inference (--enable-deterministic-inference)"
        if self.tp_size != 1:
            raise ValueError(f"{flag} does not support tensor parallelism yet (tp_size must be 1)")
        if self.speculative_algorithm is not None:
            raise ValueError(f"{flag} does not support speculative decoding yet")
        if self.lora_enabled:
            raise ValueError(f"{flag} does not support LoRA adapters yet")
        if self.quantization not in (None, "none") or str(self.model_path or "").endswith(".gguf"):
            raise ValueError(f"{flag} does not support quantized models yet")
        if self.enable_graph_capture:
            # the CPU's capture is torch.compile, whose fusions reorder the sums
            raise ValueError(f"{flag} does not support enable_graph_capture")

    def kv_cache_bytes(self) -> int:
        """The KV pool's budget when ``max_total_tokens`` is unset."""
        gb = DEFAULT_KV_CACHE_GB if self.kv_cache_memory_gb is None else self.kv_cache_memory_gb
        return int(gb * 2**30)

    def check_backend(self, backend: Backend | type[Backend]) -> None:
        """ValueError, naming the option (and its ``plait serve`` flag) and the device, for an
        option ``backend`` cannot honour; the engine calls it before it allocates anything or
        starts a rank, ``ServerArgs.validate`` before ``plait serve`` starts a process. Takes
        the class too: it reads only class attributes."""
        name, modes = backend.name, backend.decode_modes
        if self.tp_size > 1 and not backend.supports_tensor_parallel:
            raise ValueError(
                f"tp_size={self.tp_size} (--tp {self.tp_size}): device {name!r} "
                "does not support tensor parallelism (its backend runs its own "
                "model runner, not the core one the ranks shard); use --tp 1"
            )
        if self.pp_size > 1 and not backend.supports_tensor_parallel:
            raise ValueError(
                f"pp_size={self.pp_size} (--pp {self.pp_size}): device {name!r} does not "
                "support pipeline parallelism (its backend runs its own model runner, not "
                "the core one the stages split); use --pp 1"
            )
        if self.enable_deterministic_inference and not backend.supports_deterministic_inference:
            raise ValueError(
                "enable_deterministic_inference (--enable-deterministic-inference): "
                f"device {name!r} has no batch-invariant kernels yet"
            )
        if self.enable_graph_capture and "captured" not in modes:
            raise ValueError(
                f"enable_graph_capture (--enable-graph-capture): device {name!r} "
                "cannot capture decode; it always runs eagerly"
            )
        if self.disable_graph_capture and "eager" not in modes:
            raise ValueError(
                f"disable_graph_capture (--disable-graph-capture): device {name!r} "
                "has no eager decode; every step is a compiled program"
            )
        if ("captured" if backend.default_graph_capture else "eager") not in modes:
            raise ValueError(
                f"backend {name!r}: default_graph_capture="
                f"{backend.default_graph_capture} contradicts decode_modes "
                f"{sorted(modes)}"
            )

    def quant_config(self, model_dir: Path, gguf_source: Path | None = None) -> QuantConfig:
        """The resolved quantization: ``gguf`` when unset and ``model_path`` is a ``.gguf``
        file; ``gguf`` needs that file, or a directory converted from one (``gguf_source``,
        the file ``model_dir`` was converted from)."""
        path = str(self.model_path or "")
        method = self.quantization or ("gguf" if path.endswith(".gguf") else "none")
        gguf_file = None
        if method == "gguf":
            gguf_file = Path(path) if path.endswith(".gguf") else gguf_source
            if gguf_file is None:
                raise ValueError(
                    f"quantization='gguf' needs a .gguf model_path (or a directory "
                    f"converted from one), got {path or 'the default model'!r}"
                )
        if self.quantization_activations != "float" and method == "none":
            raise ValueError(
                f"quantization_activations={self.quantization_activations!r} "
                "needs a quantized model (--quantization int8/int4/gguf)"
            )
        return QuantConfig(
            method,
            self.quantization_group_size,
            self.quantization_symmetric,
            gguf_file,
            self.quantization_activations,
        )

    def graph_capture(self, backend: Backend) -> bool:
        """Whether decode is captured on ``backend``: the flags first, then its default."""
        if self.disable_graph_capture or self.enable_graph_capture:
            return self.enable_graph_capture
        return backend.default_graph_capture

    def with_backend_defaults(self, backend: Backend) -> "EngineConfig":
        """This config with the options the user left unset (None) taken from the chosen
        backend; an explicit value always wins. Validated again, so a backend's bad default
        is reported like a user's, and checked against what the backend supports."""
        filled = dataclasses.replace(
            self,
            dtype=self.dtype if self.dtype is not None else backend.default_dtype,
            page_size=self.page_size if self.page_size is not None else backend.default_page_size,
        )
        filled.validate()
        filled.check_backend(backend)
        return filled
