"""``--pd`` and the gateway's bootstrap fields, without a model."""

from __future__ import annotations

import pytest

from plait.core.messages import Bootstrap
from plait.server.cli import build_parser
from plait.server.pd_launcher import parse_pd, router_command, server_command
from plait.server.protocol import APIError, GenerateRequest
from plait.server.server_args import from_namespace


def test_pd_spec_is_counts_of_prefill_and_decode_servers():
    assert parse_pd("1P1D") == (1, 1) and parse_pd("2p3d") == (2, 3)
    for bad in ("", "1P", "0P1D", "P1D", "1D1P"):
        with pytest.raises(ValueError, match="^pd must"):
            parse_pd(bad)


def test_servers_and_gateway_get_the_pd_flags():
    args = from_namespace(
        build_parser().parse_args(
            ["serve", "--pd", "1P1D", "--disaggregation-transfer-timeout", "5", "--port", "9000"]
        )
    )
    cmd = server_command(args, "prefill", 1234, 4321)
    assert cmd[cmd.index("--disaggregation-mode") + 1] == "prefill"
    assert cmd[cmd.index("--disaggregation-bootstrap-port") + 1] == "4321"
    assert cmd[cmd.index("--disaggregation-transfer-timeout") + 1] == "5.0"
    assert "--pd" not in cmd and cmd[cmd.index("--port") + 1] == "1234"
    again = from_namespace(build_parser().parse_args(cmd[cmd.index("serve") :]))
    assert again.disaggregation_mode == "prefill" and again.pd is None
    # each server leaves smg's pool on its own SIGTERM (sglang-router 0.3.2 has no worker API)
    assert again.leave_gateway == "http://127.0.0.1:9000"
    old = from_namespace(
        build_parser().parse_args(["serve", "--pd", "1P1D", "--gateway", "sglang-router"])
    )
    assert "--leave-gateway" not in server_command(old, "decode", 1234, 4321)
    r = router_command(args, [("http://p", 4321)], ["http://d"], 9999)
    assert r[r.index("--pd-disaggregation") + 1 : r.index("--pd-disaggregation") + 6] == [
        "--prefill",
        "http://p",
        "4321",
        "--decode",
        "http://d",
    ]


def test_bootstrap_fields_come_together_or_not_at_all():
    assert GenerateRequest(text="x").bootstrap() is None
    full = GenerateRequest(text="x", bootstrap_host="h", bootstrap_port=8998, bootstrap_room=7)
    assert full.bootstrap() == Bootstrap("h", 8998, 7)
    with pytest.raises(APIError, match="go together"):
        GenerateRequest(text="x", bootstrap_room=7).bootstrap()
    with pytest.raises(APIError, match="bootstrap_port"):
        GenerateRequest(
            text="x", bootstrap_host="h", bootstrap_port=70000, bootstrap_room=1
        ).bootstrap()


def test_pd_cannot_be_combined_with_dp():
    from plait.server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--pd", "1P1D", "--dp", "2"])
