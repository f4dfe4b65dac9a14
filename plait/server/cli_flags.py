"""The argparse flags of ``plait serve``, ``generate`` and ``chat``: each flag's default is the
:class:`~plait.server.server_args.ServerArgs` field of the same name, so the dataclass stays
the one place a default lives."""

from __future__ import annotations

import argparse

from plait.quant import ACTIVATIONS, METHODS
from plait.server.server_args import ServerArgs


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve``, ``generate`` and ``chat``."""
    d = ServerArgs()
    p.add_argument(
        "--model-path",
        default=d.model_path,
        help="model directory, or 'default' for SmolLM2-135M-Instruct",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, rocm, npu, tpu, ...")
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["float32", "float16", "bfloat16"],
        help="model and KV dtype (default: the device backend's)",
    )
    p.add_argument(
        "--quantization",
        default=d.quantization,
        choices=list(METHODS),
        help="weight-only quantization (default: gguf for a .gguf model path, "
        "which runs the file's Q4_0/Q4_1/Q8_0 blocks; else none)",
    )
    p.add_argument(
        "--quantization-activations",
        default=d.quantization_activations,
        choices=list(ACTIVATIONS),
        help="int8: quantized layers take int8 activations (per block of 32) and use "
        "int8 dot products, llama.cpp's arithmetic (CPU with AVX-512 VNNI; "
        "faster, logits shift by ~0.5 %%; prefills of 128+ rows stay float); "
        "float (default): model dtype",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=d.tp,
        help="tensor-parallel ranks (processes); on the CPU each gets its share of "
        "the cores (docs/tensor-parallel.md)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=d.pp,
        help="pipeline-parallel ranks (processes), each holding a run of the model's "
        "layers; Llama-family models, not with --tp (docs/pipeline-parallel.md)",
    )
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument(
        "--enable-mixed-chunk",
        action="store_true",
        help="carry a prefill chunk and the running decodes in one forward: decodes go "
        "first, the chunk takes what they leave of --chunked-prefill-size (docs/scheduling.md)",
    )
    p.add_argument("--schedule-policy", default=d.schedule_policy, choices=["lpm", "fcfs"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="run each forward inline instead of overlapping it with scheduling",
    )
    p.add_argument(
        "--speculative-algorithm",
        default=None,
        choices=["NGRAM", "STANDALONE"],
        help="speculative decoding: NGRAM drafts from the request's own text and the "
        "prefix cache, STANDALONE from a smaller draft model with the same tokenizer "
        "(--speculative-draft-model-path); verified in one pass (docs/speculative.md)",
    )
    p.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        default=None,
        help="tokens verified per request and pass, the last committed one included "
        "(default 8, or --speculative-num-steps + 1)",
    )
    p.add_argument(
        "--speculative-num-steps", type=int, default=None, help="the longest draft chain"
    )
    p.add_argument(
        "--speculative-draft-model-path",
        default=None,
        help="STANDALONE's draft model: a checkpoint with the target's tokenizer",
    )
    graph = p.add_mutually_exclusive_group()
    graph.add_argument(
        "--disable-graph-capture",
        action="store_true",
        help="run decode eagerly (no CUDA graphs / torch.compile)",
    )
    graph.add_argument(
        "--enable-graph-capture",
        action="store_true",
        help="capture decode where the device defaults to eager: on the CPU, "
        "torch.compile (minutes of compiling at start)",
    )
    p.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="batch-invariant kernels: a request's logprobs do not depend on what shares "
        "its batch, its chunking or cache hits (docs/deterministic.md; CPU, float32)",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=d.page_size,
        help="KV page size in tokens (default: the device backend's)",
    )
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    mem = p.add_mutually_exclusive_group()
    mem.add_argument(
        "--mem-fraction",
        type=float,
        default=None,
        help="KV cache budget as a fraction of the device memory free at start",
    )
    mem.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    mem.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV cache budget in GiB (engine default: 1)",
    )
    p.add_argument(
        "--context-length", type=int, default=None, help="cap the model's context window"
    )
    p.add_argument("--random-seed", type=int, default=None)
    lora = p.add_argument_group("LoRA adapters (docs/lora.md)")
    lora.add_argument("--lora-paths", nargs="+", default=None, metavar="NAME=PATH")
    lora.add_argument("--max-loras-per-batch", type=int, default=ServerArgs().max_loras_per_batch)
    lora.add_argument("--max-lora-rank", type=int, default=None)
    lora.add_argument("--lora-target-modules", nargs="+", default=None)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    d = ServerArgs()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id in the OpenAI API (default: the model directory name)",
    )
    p.add_argument(
        "--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"]
    )
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout)
    p.add_argument(
        "--grammar-compile-timeout",
        type=float,
        default=None,
        help="seconds a regex/JSON-schema/EBNF may take to compile (default 10)",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="how the model writes tool calls: hermes, qwen25, llama3, mistral, pythonic "
        "(default: detected from the chat template; hermes for a template without tools)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        help="split the model's reasoning into reasoning_content: qwen3, deepseek-r1, ... "
        "(SGLang's names; default: none, reasoning stays in the content)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=d.max_request_body_bytes,
        help="larger request bodies are refused with 413",
    )
    limits = p.add_argument_group("connection limits (slow or silent clients are cut)")
    for flag, kind, what in (
        ("--header-read-timeout", float, "seconds for the request head, else 408"),
        ("--body-read-timeout", float, "seconds for the whole body after the head, else 408"),
        ("--keep-alive-timeout", float, "seconds an idle kept-alive connection stays open"),
        (
            "--stream-stall-timeout",
            float,
            "seconds a response may wait on a client that "
            "stopped reading before the connection is cut (its requests aborted)",
        ),
        ("--max-header-bytes", int, "a larger request head is refused with 431"),
        ("--max-header-count", int, "more header fields are refused with 431"),
    ):
        name = flag[2:].replace("-", "_")
        limits.add_argument(flag, type=kind, default=getattr(d, name), help=what)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=d.stream_interval,
        help="a stream's events come every N tokens (and its first and last): fewer, larger "
        "events for many concurrent streams (SGLang's flag; default 1: every token)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="sequences allowed to wait beyond --max-running-requests; more get 429",
    )
    p.add_argument(
        "--max-queue-time",
        type=float,
        default=d.max_queue_time,
        help="seconds a new request may be predicted to wait from its arrival to a running "
        "place (the running sequences' remaining service time, the measured finish rate, the "
        "oldest wait); beyond it: 503 with Retry-After (0: off)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="abort a request (freeing its KV) after this many seconds",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        help="on SIGTERM, let running requests finish for up to this many seconds",
    )
    p.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--grpc-mode",
        action="store_true",
        help="serve SGLang's scheduler service over gRPC (token in, token out) for smg, "
        "which then tokenizes and parses tools/reasoning itself; with --dp, gRPC workers",
    )
    p.add_argument(
        "--join",
        default=None,
        metavar="GATEWAY_URL",
        help="register with a running smg gateway (its worker API) once healthy; on "
        "SIGTERM leave it, then drain",
    )
    p.add_argument(
        "--leave-gateway",
        default=None,
        metavar="GATEWAY_URL",
        help="an smg gateway that already lists this server (the --pd launcher's): on SIGTERM "
        "take this server out of its pool (its worker API), then drain",
    )
    add_disaggregation_args(p)
    dp = p.add_argument_group("data parallelism (SGLang's gateway, pip install 'plait[gateway]')")
    dp.add_argument(
        "--dp",
        type=int,
        default=d.dp,
        help="engine workers behind one gateway on --port; each gets "
        "its own process, port, KV cache and cores/N threads",
    )
    dp.add_argument(
        "--gateway",
        default=None,
        choices=["smg", "sglang-router"],
        help="the gateway --dp and --pd start: smg (SGLang Model Gateway 1.x, HTTP or "
        "gRPC workers; the default) or sglang-router 0.3.2 (HTTP workers only)",
    )
    dp.add_argument(
        "--router-policy",
        default=d.router_policy,
        choices=["cache_aware", "round_robin", "random", "power_of_two"],
        help="the gateway's load-balancing policy (with --dp)",
    )
    dp.add_argument(
        "--router-prometheus-port",
        type=int,
        default=None,
        help="the gateway's Prometheus /metrics port (default: a free port, logged)",
    )
    dp.add_argument(
        "--router-dp-worker-base-port",
        type=int,
        default=None,
        help="with --dp N: worker i listens on this port + i; with --pd XPYD: prefill "
        "server i on this + i, decode server j on this + X + j (default: free ports; a "
        "pinned port in use stops the launch)",
    )
    dp.add_argument(
        "--router-extra-args",
        default=None,
        help="more gateway flags (smg launch, or sglang_router.launch_router), quoted as one "
        "string, e.g. "
        "'--max-concurrent-requests 64 --queue-size 128'",
    )


def add_disaggregation_args(p: argparse.ArgumentParser) -> None:
    d = ServerArgs()
    g = p.add_argument_group(
        "prefill/decode disaggregation (SGLang's gateway in PD mode, pip install 'plait[pd]')"
    )
    g.add_argument(
        "--disaggregation-mode",
        default=d.disaggregation_mode,
        choices=["null", "prefill", "decode"],
        help="prefill: run prompts and send their KV; decode: receive KV and decode",
    )
    g.add_argument(
        "--disaggregation-bootstrap-port",
        type=int,
        default=d.disaggregation_bootstrap_port,
        help="prefill: the port decode servers reach it on (the gateway's '--prefill URL PORT')",
    )
    g.add_argument(
        "--disaggregation-transfer-backend",
        default=d.disaggregation_transfer_backend,
        choices=["mooncake", "fake"],
        help="how KV moves: Mooncake's transfer engine (TCP); fake works only "
        "within one process (tests)",
    )
    g.add_argument(
        "--disaggregation-transfer-timeout",
        type=float,
        default=d.disaggregation_transfer_timeout,
        help="seconds a request may wait for its KV before it fails (and its "
        "pre-allocated KV is freed)",
    )
    g.add_argument(
        "--pd",
        default=None,
        metavar="XPYD",
        help="start X prefill and Y decode servers and the gateway on --port in one "
        "command, e.g. 1P1D (the --router-* flags apply)",
    )
    g.add_argument(
        "--disaggregation-bootstrap-base-port",
        type=int,
        default=None,
        help="with --pd: prefill server i's bootstrap port is this + i (default: free ports)",
    )
