"""``plait serve`` refuses option combinations it cannot run at argument validation, naming the
flags, before any server, worker or rank starts (README "Refusals")."""

from __future__ import annotations

import logging

import pytest

from plait.server import cli
from plait.server.server_args import ServerArgs


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if ``plait serve`` gets as far as starting anything."""

    def started(*_a, **_k):
        raise AssertionError("a server, worker or launcher was started")

    for target in (
        "plait.server.http_server.run_server",
        "plait.server.pd_launcher.run_pd",
        "plait.server.data_parallel.run_data_parallel",
        "plait.server.grpc.server.run_grpc_server",
        "plait.server.data_parallel.spawn",
        "plait.server.pd_launcher.spawn",
    ):
        monkeypatch.setattr(target, started)


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--device", "tpu", "--tp", "2"], ["--tp 2", "'tpu'"]),
        (["--dp", "2", "--tp", "2"], ["--dp 2", "--tp 2"]),
        (["--dp", "2", "--disaggregation-mode", "prefill"], ["--dp 2", "--disaggregation-mode"]),
        (["--device", "npu", "--enable-graph-capture"], ["--enable-graph-capture", "'npu'"]),
        (["--device", "tpu", "--disable-graph-capture"], ["--disable-graph-capture", "'tpu'"]),
        (["--grpc-mode", "--api-key", "k"], ["--grpc-mode", "--api-key"]),
        (
            ["--grpc-mode", "--dp", "2", "--gateway", "sglang-router"],
            ["--grpc-mode", "--gateway smg"],
        ),
        (["--grpc-mode", "--pd", "1P1D"], ["--grpc-mode", "--pd 1P1D"]),
        (["--join", "http://127.0.0.1:1", "--dp", "2"], ["--join", "--dp"]),
        (["--join", "127.0.0.1:1"], ["--join", "http(s)://"]),
        (["--leave-gateway", "127.0.0.1:1"], ["--leave-gateway", "http(s)://"]),
    ],
)
def test_combination_is_refused_naming_its_flags(argv, names, nothing_starts, capsys):
    err = refused(argv, capsys)
    for name in names:
        assert name in err, err


@pytest.mark.parametrize(
    "fields",
    [
        dict(device="tpu", enable_graph_capture=True),  # decode on tpu is always compiled
        dict(device="npu", disable_graph_capture=True),  # and on npu always eager
        dict(device="cpu", tp=2, enable_graph_capture=True),
        dict(device="auto", tp=2),  # the engine checks the resolved device
        dict(pd="1P1D"),
        dict(dp=2),
        dict(disaggregation_mode="decode"),
        dict(dp=2, grpc_mode=True),
        dict(grpc_mode=True, join="http://127.0.0.1:1"),
        dict(pd="1P1D", gateway="smg"),
        dict(pd="1P1D", tp=2),  # each server runs its own ranks (test_pd_tp.py)
        dict(disaggregation_mode="prefill", tp=2),
    ],
)
def test_runnable_combinations_pass(fields):
    ServerArgs(**fields).validate()


@pytest.mark.parametrize(
    "launcher, fields",
    [
        ("plait.server.pd_launcher:run_pd", dict(pd="1P1D", pp=2)),
        ("plait.server.data_parallel:run_data_parallel", dict(dp=2, tp=2)),
    ],
)
def test_launchers_refuse_before_spawning(launcher, fields, monkeypatch, caplog):
    import importlib

    module, _, name = launcher.partition(":")
    module = importlib.import_module(module)
    monkeypatch.setattr(module, "spawn", lambda *a: pytest.fail("a process was started"))
    with caplog.at_level(logging.ERROR):
        assert getattr(module, name)(ServerArgs(**fields)) == 2
    assert ("--tp 2" if "tp" in fields else "--pp 2") in caplog.text
