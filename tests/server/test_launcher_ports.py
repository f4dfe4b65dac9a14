"""Port flags of the ``--dp``/``--pd`` launchers: every process they start listens where the
user pinned it (``--router-dp-worker-base-port``, ``--router-prometheus-port``,
``--disaggregation-bootstrap-base-port``), and a pinned port that cannot be had stops the
launch with a clear error instead of being swapped for another. The processes themselves are
checked on the module fixtures that already start them: ``test_data_parallel.dp_fake``
(``--dp 2``) and ``tests/disaggregation/test_pd_gateway.pd`` (``--pd 1P1D``, slow)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from plait.server.children import PortBook, port_free
from plait.server.cli import main
from tests.server.conftest import FAKE, free_port
from tests.server.test_data_parallel import child_pids


def free_range(count: int) -> int:
    """A base port with ``count`` consecutive ports free now."""
    for _ in range(200):
        base = free_port()
        if base + count < 65536 and all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` or one of its descendants listens on (from /proc)."""
    inodes: set[str] = set()
    for p in [pid, *descendants(pid)]:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


# ----------------------------------------------------------------------------- unit level
def test_a_pinned_range_is_used_exactly_or_refused_naming_the_flag():
    base = free_range(3)
    book = PortBook(base + 5)
    assert book.take_range(base, 3, "--router-dp-worker-base-port") == [base, base + 1, base + 2]
    assert base + 3 not in book.take_range(None, 4, "--x")  # free ones, never a promised one
    with pytest.raises(ValueError, match="--router-dp-worker-base-port .*already"):
        book.take_range(base + 2, 2, "--router-dp-worker-base-port")
    with pytest.raises(ValueError, match="--flag 65535: 2 ports from it run past 65535"):
        PortBook().take_range(65535, 2, "--flag")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {taken} is in use"):
            PortBook().take_range(taken, 1, "--disaggregation-bootstrap-base-port")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--router-dp-worker-base-port", "9000"], "only apply to --dp N"),
        (["--router-prometheus-port", "9000"], "only apply to --dp N"),
        (["--dp", "2", "--disaggregation-bootstrap-base-port", "9000"], "only applies to --pd"),
        (["--dp", "2", "--router-dp-worker-base-port", "70000"], "must be a port number"),
    ],
)
def test_port_flags_without_their_launcher_are_refused_not_ignored(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_pinned_worker_port_in_use_stops_the_launch_before_any_child(tiny_model_dir, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        argv = ["serve", *FAKE, "--model-path", str(tiny_model_dir), "--dp", "2"]
        code = main([*argv, "--router-dp-worker-base-port", str(taken - 1)])
    assert code == 2
    assert f"--router-dp-worker-base-port {taken - 1}: port {taken} is in use" in caplog.text
