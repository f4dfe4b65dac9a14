"""The prefill server's side: run the prompt, then push its KV and first token to the decode
server that asked for them.

A request in prefill mode is scheduled like any other (radix cache, chunking, batching); once
its first token is sampled the scheduler hands it to :meth:`PrefillSide.hand_off` instead of
the running batch. It keeps its row and slots (locked, so never evicted) until the transfer
has ended; then the scheduler thread releases them and finishes the request: one output token
and ``length`` when the KV landed, an ``error`` when not (no decode target within the timeout,
a failed write), an ``abort`` on ``cancel`` from the decode side. A ``cancel`` that comes
while the prompt is still queued or running stops it in the scheduler (``abort_room``) and is
remembered until the timeout, so a hand-off after it ends at once instead of waiting.

Threads: ``hand_off``/``abort``/``poll_timeouts`` run on the scheduler thread; a receiver
thread reads the bootstrap socket; one worker thread does the writes (so a slow peer never
stalls a forward pass) and sends the notifications. ``self.lock`` guards the four tables.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import zmq

from plait.core.finish_reason import FinishReason
from plait.core.request import Req
from plait.disaggregation.bootstrap import (
    KVLayout,
    Pushers,
    decode_msg,
    generator_to_json,
    kv_buffers,
    layout_from_json,
    logprobs_to_json,
    pull_socket,
)
from plait.disaggregation.rank_agent import RankWriters
from plait.disaggregation.transfer import KVTransfer, TransferError

log = logging.getLogger(__name__)


@dataclass
class _Ready:
    """A prefilled request waiting for (or in) its transfer."""

    req: Req
    slots: list[int]
    deadline: float
    cancelled: bool = False
    sending: bool = False  # given to the worker: it alone ends the request from then on


@dataclass
class _Target:
    msg: dict[str, Any]
    deadline: float = field(default=0.0)


class PrefillSide:
    def __init__(
        self,
        transfer: KVTransfer,
        kv_pool: Any,
        req_pool: Any,
        host: str,
        port: int,
        timeout: float,
        call_soon: Callable[[Callable[[], None]], None],
        finish: Callable[[Req, FinishReason], None],
        abort_room: Callable[[int], object],
        live_rooms: Callable[[], frozenset[int]] = frozenset,
        rank_controls: list[str] | None = None,
    ):
        self.transfer = transfer
        self.req_pool = req_pool
        self.timeout = timeout
        self.call_soon = call_soon  # run on the scheduler thread
        self.finish = finish  # Scheduler.finish_handed_off
        self.abort_room = abort_room  # abort the not yet handed-off request of a room
        self.live_rooms = live_rooms  # rooms of the requests the scheduler holds
        # Its snapshot, taken on the scheduler thread at every poll and read by the receiver
        # (one attribute swap: atomic). A room stays in it while its request queues or runs.
        self.live: frozenset[int] = frozenset()
        self.beat_every = min(1.0, timeout / 4)
        buffers = kv_buffers(kv_pool)
        self.layout = KVLayout.of(buffers)
        for b in buffers:
            transfer.register(b.data_ptr(), b.numel() * b.element_size())
        # the first token of row r is written from here (a source must be registered)
        self.tokens = torch.zeros(req_pool.size, dtype=torch.int64)
        transfer.register(self.tokens.data_ptr(), self.tokens.numel() * 8)
        # tensor-parallel ranks 1..N-1 write their own shards (used by the worker thread only)
        self.ranks = RankWriters(rank_controls or [])
        self.lock = threading.Lock()
        self.ready: dict[int, _Ready] = {}
        self.targets: dict[int, _Target] = {}
        self.rooms: dict[str, int] = {}  # rid -> room, for aborts
        self.cancelled: dict[int, float] = {}  # room -> deadline: cancelled before hand-off
        self.ctx = zmq.Context()
        self.sock, self.address = pull_socket(self.ctx, host, port)
        self.stopped = threading.Event()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="plait-kv-send")
        self.pushers = Pushers(self.ctx)  # used by the worker thread only
        self.beat_pushers = Pushers(self.ctx)  # used by the receiver thread only
        self.receiver = threading.Thread(target=self._receive, name="plait-bootstrap", daemon=True)
        self.receiver.start()
        log.info("prefill bootstrap on %s (KV via %s)", self.address, transfer.session_id)

    # ----- scheduler thread -----

    def hand_off(self, req: Req) -> None:
        room = req.bootstrap.room
        n = len(req.input_ids)
        slots = self.req_pool.req_to_token[req.req_pool_idx, :n].tolist()
        self.tokens[req.req_pool_idx] = req.output_ids[0]
        with self.lock:
            ready = _Ready(req, slots, time.monotonic() + self.timeout)
            self.ready[room] = ready
            self.rooms[req.rid] = room
            target = self.targets.pop(room, None)
            ready.cancelled = self.cancelled.pop(room, None) is not None
        if ready.cancelled:
            self.call_soon(lambda: self._finish_unless_sending(room, _CANCELLED))
        elif target is not None:
            self.worker.submit(self._send, room, ready, target.msg)

    def has_work(self) -> bool:
        return bool(self.ready)

    def poll(self) -> None:
        """Fail handed-off requests whose decode server never asked for them; note which
        rooms the scheduler still holds (for the heartbeat)."""
        self.live = self.live_rooms()
        now = time.monotonic()
        with self.lock:
            late = [
                (room, r)
                for room, r in self.ready.items()
                if r.deadline < now and not r.cancelled and room not in self.targets
            ]
            for _room, r in late:
                r.cancelled = True
            stale = [room for room, t in self.targets.items() if t.deadline < now]
            for room in stale:
                del self.targets[room]
            for room in [room for room, d in self.cancelled.items() if d < now]:
                del self.cancelled[room]
        for room, r in late:
            if self._pop(room) is not None:
                self.finish(
                    r.req,
                    FinishReason.error(
                        f"no decode server asked for the KV of bootstrap room {room} within "
                        f"{self.timeout:.0f}s"
                    ),
                )

    def abort(self, rid: str) -> bool:
        with self.lock:
            room = self.rooms.get(rid)
            ready = self.ready.get(room) if room is not None else None
            if ready is None:
                return False
            ready.cancelled = True
        self._finish_unless_sending(room, "aborted")
        return True

    # ----- internals -----

    def _pop(self, room: int) -> _Ready | None:
        with self.lock:
            ready = self.ready.pop(room, None)
            if ready is not None:
                self.rooms.pop(ready.req.rid, None)
            return ready

    def _finish_unless_sending(self, room: int, why: str) -> None:
        """A cancelled request not yet submitted to the worker ends now; one in the worker
        ends when its write returns (its slots may still be read until then)."""
        with self.lock:
            ready = self.ready.get(room)
            sending = ready is not None and ready.sending
        if ready is not None and not sending and self._pop(room) is not None:
            self.finish(ready.req, FinishReason.abort(why))

    def _cancel(self, room: int) -> None:
        """Scheduler thread: end ``room``'s request, handed off or not."""
        with self.lock:
            ready = self.ready.get(room)
            if ready is not None:
                ready.cancelled = True
            else:
                self.cancelled[room] = time.monotonic() + self.timeout
        if ready is not None:
            self._finish_unless_sending(room, _CANCELLED)
        else:
            self.abort_room(room)

    def _beat(self) -> None:
        """Receiver thread: tell each waiting decode server which of its rooms are queued or
        running here, and keep their targets. On this thread, not the scheduler's, so a long
        forward pass does not silence it: only a dead (or wedged) process does."""
        now = time.monotonic()
        live = self.live
        by_peer: dict[str, list[int]] = {}
        with self.lock:
            for room, target in self.targets.items():
                if room in live and isinstance(target.msg.get("notify"), str):
                    target.deadline = now + self.timeout
                    by_peer.setdefault(target.msg["notify"], []).append(room)
        for notify, rooms in by_peer.items():
            self.beat_pushers.send(notify, {"op": "alive", "room": -1, "rooms": rooms})

    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self.stopped.is_set():
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self.beat_every
            if not poller.poll(100):
                continue
            msg = decode_msg(self.sock.recv())
            if msg is None:
                log.warning("ignored a malformed bootstrap message")
                continue
            room = msg["room"]
            if msg["op"] not in ("cancel", "target"):
                continue  # a decode side's op sent here by mistake
            if msg["op"] == "cancel":
                with self.lock:
                    target = self.targets.pop(room, None)
                if target is not None:  # not handed off yet, so nothing will be written:
                    self.worker.submit(  # the decode side may free its slots now
                        self.pushers.send,
                        target.msg["notify"],
                        {"op": "failed", "room": room, "message": _CANCELLED},
                    )
                self.call_soon(lambda room=room: self._cancel(room))
            elif msg["op"] == "target":
                with self.lock:
                    ready = self.ready.get(room)
                    if ready is None:
                        self.targets[room] = _Target(msg, time.monotonic() + self.timeout)
                if ready is not None:
                    self.worker.submit(self._send, room, ready, msg)

    def _send(self, room: int, ready: _Ready, msg: dict[str, Any]) -> None:
        """Worker thread: write the KV and the token, notify the decode server, and have the
        scheduler thread release the request."""
        with self.lock:
            ready.sending = True
        started = time.perf_counter()
        try:
            if ready.cancelled:
                raise TransferError("cancelled")
            dst_slots, cached = msg["slots"], msg.get("cached", 0)
            if not isinstance(cached, int) or not 0 <= cached < len(ready.slots):
                raise TransferError(f"the decode server's cached prefix {cached!r} is not valid")
            if len(dst_slots) != len(ready.slots) - cached:
                raise TransferError(
                    f"the decode server allocated {len(dst_slots)} slots after a "
                    f"{cached}-token cached prefix of a {len(ready.slots)}-token prompt "
                    "(different prompts?)"
                )
            self.ranks.check(msg.get("ranks", []))  # the same --tp on both sides
            # only the tokens the decode server's radix cache does not hold move
            src_slots = ready.slots[cached:]
            src, dst, lengths = self.layout.writes(
                layout_from_json(msg["layout"]), src_slots, dst_slots
            )
            row = ready.req.req_pool_idx
            src.append(self.tokens.data_ptr() + 8 * row)
            dst.append(int(msg["aux"]))
            lengths.append(8)
            self.ranks.start(msg.get("ranks", []), src_slots, dst_slots)
            try:  # the other ranks write their shards meanwhile
                self.transfer.write(msg["session"], src, dst, lengths)
            finally:
                nbytes = sum(lengths) + self.ranks.wait(self.timeout)
            done = {
                "op": "done",
                "room": room,
                "bytes": nbytes,
                "seconds": time.perf_counter() - started,
            }
            if ready.req.return_logprob:
                done["logprobs"] = logprobs_to_json(ready.req)
            if ready.req.generator is not None:
                done["generator"] = generator_to_json(ready.req.generator)
            self.pushers.send(msg["notify"], done)
            reason = FinishReason.length(1)
        except (TransferError, KeyError, TypeError, ValueError) as e:
            log.warning("KV transfer of room %s failed: %s", room, e)
            if isinstance(msg.get("notify"), str):
                self.pushers.send(
                    msg["notify"], {"op": "failed", "room": room, "message": f"prefill: {e}"}
                )
            reason = (
                FinishReason.error(f"KV transfer failed: {e}")
                if not ready.cancelled
                else FinishReason.abort("aborted")
            )

        def done() -> None:
            if self._pop(room) is not None:
                # The prompt's logprobs went to the decode half, which returns them. SGLang's
                # gateways put the prefill half's input_token_logprobs before the decode
                # half's, so this half reports none: the client sees them once.
                ready.req.input_token_logprobs = []
                ready.req.input_top_logprobs = []
                self.finish(ready.req, reason)

        self.call_soon(done)

    def close(self) -> None:
        self.stopped.set()
        self.receiver.join(timeout=2)
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.pushers.close()
        self.beat_pushers.close()
        self.ranks.close()
        self.sock.close()
        self.ctx.term()


_CANCELLED = "the decode server cancelled the transfer"
