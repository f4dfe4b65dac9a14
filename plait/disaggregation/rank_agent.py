"""Prefill/decode disaggregation under tensor parallelism: each rank moves its own KV shard.

A tensor-parallel engine's KV heads are split over its ranks, and ranks 1..N-1 hold theirs in
their own processes (``plait.core.tp.worker``), out of rank 0's reach. So every worker rank
runs a :class:`RankAgent`: its own :class:`~plait.disaggregation.transfer.KVTransfer` with its
KV buffers registered, published to rank 0 (``facts``) before the rank reports ready. Rank 0
puts its workers' sessions and layouts in the table it sends (SGLang's design: one entry per
rank; prefill rank ``i`` writes to decode rank ``i``, so both servers need the same ``--tp``):

- a decode server's ``target`` carries ``ranks``: ``[{"session", "layout"}, ...]`` for its
  ranks 1..N-1 (rank 0's are the message's own ``session`` and ``layout``);
- a prefill server's rank 0 writes its own shard and asks each worker rank, through the
  agent's control socket (ZeroMQ REQ/REP on 127.0.0.1: the ranks share a machine), to write
  the same slots of its shard to the matching decode rank: :class:`RankWriters`.

Slot numbers are the same on every rank (rank 0 allocates; the workers' ``req_to_token`` rows
come with each batch), so one slot list serves every shard. The first token is written by
rank 0 alone. A worker's write needs no forward pass: it reads slots the scheduler holds
locked until the transfer ends, while the rank's forwards write other slots.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from plait.disaggregation.bootstrap import (
    KVLayout,
    decode_json,
    encode,
    kv_buffers,
    layout_from_json,
    layout_to_json,
)
from plait.disaggregation.transfer import TransferError
from plait.disaggregation.transports import create_transfer

log = logging.getLogger(__name__)

CONTROL_HOST = "127.0.0.1"


class RankAgent:
    """A worker rank's transfer (and, on a prefill server, its control socket's thread)."""

    def __init__(self, kv_pool: Any, *, backend: str, host: str, mode: str):
        self.transfer = create_transfer(backend, host)
        buffers = kv_buffers(kv_pool)
        self.layout = KVLayout.of(buffers)
        for b in buffers:
            self.transfer.register(b.data_ptr(), b.numel() * b.element_size())
        self.control: str | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        if mode == "prefill":
            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.REP)
            self.sock.setsockopt(zmq.LINGER, 0)
            port = self.sock.bind_to_random_port(f"tcp://{CONTROL_HOST}")
            self.control = f"tcp://{CONTROL_HOST}:{port}"
            self.thread = threading.Thread(target=self._serve, name="plait-kv-rank", daemon=True)
            self.thread.start()

    def facts(self) -> dict[str, Any]:
        """What rank 0 needs: where the decode side writes (``session``, ``layout``) and,
        on a prefill server, where to ask for writes (``control``)."""
        return {
            "session": self.transfer.session_id,
            "layout": layout_to_json(self.layout),
            "control": self.control,
        }

    def _serve(self) -> None:
        """Each request: copy ``src`` slots of this shard to the peer's ``dst`` slots; reply
        with the bytes written or the error (one reply per request, as REP needs)."""
        while not self.stopped.is_set():
            if not self.sock.poll(100):
                continue
            msg = decode_json(self.sock.recv())
            try:
                if msg is None:
                    raise TransferError("malformed write request")
                src, dst, lengths = self.layout.writes(
                    layout_from_json(msg["layout"]), msg["src"], msg["dst"]
                )
                self.transfer.write(msg["session"], src, dst, lengths)
                reply: dict[str, Any] = {"ok": True, "bytes": sum(lengths)}
            except (TransferError, KeyError, TypeError, ValueError) as e:
                reply = {"ok": False, "error": str(e)}
            self.sock.send(encode(reply))

    def close(self) -> None:
        if self.thread is not None:
            self.stopped.set()
            self.thread.join(timeout=2)
            self.sock.close()
            self.ctx.term()


class RankWriters:
    """Rank 0's side of the prefill server's workers: one REQ socket per worker rank's
    control address. Used by one thread (the prefill side's sender)."""

    def __init__(self, controls: list[str]):
        self.controls = controls
        self.ctx = zmq.Context()
        self.sockets = [self._connect(c) for c in controls]

    def _connect(self, addr: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addr)
        return sock

    def check(self, ranks: Any) -> None:
        """TransferError unless ``ranks`` (a target's rank table) pairs one decode rank with
        each worker rank here."""
        if not isinstance(ranks, list) or not all(isinstance(r, dict) for r in ranks):
            raise TransferError(f"the decode server's rank table is malformed: {ranks!r}")
        if len(ranks) != len(self.sockets):
            raise TransferError(
                f"the decode server runs {len(ranks) + 1} tensor-parallel ranks and this "
                f"prefill server {len(self.sockets) + 1}: prefill/decode disaggregation needs "
                "the same --tp on both sides"
            )

    def start(self, ranks: list[dict[str, Any]], src: list[int], dst: list[int]) -> None:
        """Ask worker rank ``i + 1`` to write its shard to ``ranks[i]`` (the decode server's
        rank ``i + 1``); :meth:`wait` collects the answers."""
        self.check(ranks)
        for sock, rank in zip(self.sockets, ranks):
            sock.send(encode({**rank, "src": src, "dst": dst}))

    def wait(self, timeout: float) -> int:
        """Bytes the worker ranks wrote; TransferError naming a rank that failed or did not
        answer within ``timeout`` seconds (its socket is replaced: a REQ socket waiting for a
        reply can send nothing else)."""
        deadline = time.monotonic() + timeout
        total, errors = 0, []
        for i, sock in enumerate(self.sockets):
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(left_ms):
                sock.close()
                self.sockets[i] = self._connect(self.controls[i])
                errors.append(f"rank {i + 1} did not answer within {timeout:.0f}s")
                continue
            reply = decode_json(sock.recv()) or {}
            if reply.get("ok"):
                total += int(reply.get("bytes", 0))
            else:
                errors.append(f"rank {i + 1}: {reply.get('error', 'malformed reply')}")
        if errors:
            raise TransferError("; ".join(errors))
        return total

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.ctx.term()
