"""The ``plait`` command line: flags map onto engine options; one-offs run the real model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from plait.server.cli import build_parser
from plait.server.server_args import from_namespace


def test_serve_flags_map_to_engine_kwargs():
    ns = build_parser().parse_args(
        [
            "serve",
            "--model-path",
            "/m",
            "--device",
            "cpu",
            "--port",
            "31000",
            "--chunked-prefill-size",
            "64",
            "--schedule-policy",
            "fcfs",
            "--disable-radix-cache",
            "--page-size",
            "4",
            "--max-running-requests",
            "8",
            "--max-total-tokens",
            "4096",
            "--api-key",
            "k",
        ]
    )
    args = from_namespace(ns)
    assert (args.port, args.api_key) == (31000, "k")
    assert args.engine_kwargs("/m") == {
        "model_path": "/m",
        "device": "cpu",
        "page_size": 4,
        "max_total_tokens": 4096,
        "chunked_prefill_size": 64,
        "schedule_policy": "fcfs",
        "disable_radix_cache": True,
        "max_running_requests": 8,
    }
    assert args.to_dict()["api_key"] == "***"


def test_disable_overlap_schedule_reaches_the_engine():
    on = from_namespace(build_parser().parse_args(["serve"]))
    assert "disable_overlap_schedule" not in on.engine_kwargs("/m")  # the engine's default
    off = from_namespace(build_parser().parse_args(["serve", "--disable-overlap-schedule"]))
    assert off.engine_kwargs("/m")["disable_overlap_schedule"] is True


def test_unset_dtype_and_page_size_are_left_to_the_device_backend():
    args = from_namespace(build_parser().parse_args(["serve", "--device", "npu"]))
    kwargs = args.engine_kwargs("/m")
    assert "dtype" not in kwargs and "page_size" not in kwargs
    args = from_namespace(build_parser().parse_args(["serve", "--dtype", "bfloat16"]))
    assert args.engine_kwargs("/m")["dtype"] == "bfloat16"


def test_mem_fraction_and_max_total_tokens_are_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mem-fraction", "0.5", "--max-total-tokens", "9"])


def test_tp_flag_becomes_the_engines_tp_size():
    args = from_namespace(build_parser().parse_args(["serve", "--tp", "2"]))
    assert args.engine_kwargs("/m")["tp_size"] == 2
    # tp 1 passes nothing, so engines without tensor parallelism (the fake) still start
    assert "tp_size" not in from_namespace(build_parser().parse_args(["serve"])).engine_kwargs("/m")


def test_bad_model_path_exits_2_without_starting(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.server.cli",
            "serve",
            "--model-path",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "neither a model directory nor a .gguf file" in done.stderr


@pytest.mark.slow
def test_generate_and_chat_one_offs(real_model_path):
    common = ["--model-path", real_model_path, "--device", "cpu", "--max-new-tokens", "8"]
    gen = subprocess.run(
        [sys.executable, "-m", "plait.server.cli", "generate", "The capital of France is", *common],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The capital of France is Paris")
    chat = subprocess.run(
        [sys.executable, "-m", "plait.server.cli", "chat", *common],
        input="What is the capital of France?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout


def test_graph_capture_flags_reach_the_engine_and_exclude_each_other():
    args = from_namespace(build_parser().parse_args(["serve", "--disable-graph-capture"]))
    assert args.engine_kwargs("/m")["disable_graph_capture"] is True
    args = from_namespace(build_parser().parse_args(["serve", "--enable-graph-capture"]))
    assert args.engine_kwargs("/m")["enable_graph_capture"] is True
    kwargs = from_namespace(build_parser().parse_args(["serve"])).engine_kwargs("/m")
    assert "disable_graph_capture" not in kwargs and "enable_graph_capture" not in kwargs
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--disable-graph-capture", "--enable-graph-capture"])
