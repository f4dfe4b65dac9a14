"""The gateway command lines the launchers build, and the --join URL, without processes."""

from __future__ import annotations

import pytest

from plait.server.cli import build_parser
from plait.server.data_parallel import worker_command
from plait.server.gateway import DP_FAILOVER_DEFAULTS, dp_command, require_gateway
from plait.server.children import LaunchError
from plait.server.join import advertised_url
from plait.server.server_args import ServerArgs, from_namespace


def parse(*argv: str) -> ServerArgs:
    return from_namespace(build_parser().parse_args(["serve", *argv]))


def test_dp_starts_smg_by_default_and_sglang_router_on_request():
    smg = dp_command(parse("--dp", "2"), ["http://w"], 9)
    assert smg[1:4] == ["-m", "smg", "launch"] and "--model-path" not in smg
    old = dp_command(parse("--dp", "2", "--gateway", "sglang-router"), ["http://w"], 9)
    assert old[1:3] == ["-m", "sglang_router.launch_router"]
    assert old[-len(DP_FAILOVER_DEFAULTS) :] == list(DP_FAILOVER_DEFAULTS)
    assert parse("--pd", "1P1D").gateway_name == "smg"  # SGLang's current gateway for both


def test_grpc_mode_gives_smg_the_tokenizer_and_the_workers_the_flag():
    args = parse("--dp", "2", "--grpc-mode", "--model-path", "/m", "--router-extra-args", "--x 1")
    cmd = dp_command(args, ["grpc://127.0.0.1:1"], 9)
    assert cmd[cmd.index("--model-path") + 1] == "/m" and "grpc://127.0.0.1:1" in cmd
    assert cmd[-2:] == ["--x", "1"]  # the user's flags come last and win
    timeouts = [cmd[i + 1] for i, f in enumerate(cmd) if f == "--health-check-timeout-secs"]
    assert timeouts[-1] == "10"
    worker = worker_command(args, 1234)
    assert "--grpc-mode" in worker and "--dp" not in worker and "--router-extra-args" not in worker


def test_a_missing_gateway_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LaunchError, match=r"plait\[gateway\].*pip install smg"):
        require_gateway("smg", "--dp")


def test_join_advertises_the_bind_address_and_scheme():
    assert advertised_url("127.0.0.1", 5, True) == "grpc://127.0.0.1:5"
    assert advertised_url("127.0.0.1", 5, False) == "http://127.0.0.1:5"
    assert not advertised_url("0.0.0.0", 5, False).startswith("http://0.0.0.0")
