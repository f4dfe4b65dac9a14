"""The decode server's side: pre-allocate KV for a request, ask its prefill server to fill it,
and admit it to the running batch when the KV and the first token have landed.

States of a request here (all on the scheduler thread, in :meth:`DecodeSide.poll`)::

    queued    waiting for a row and free slots for the prompt (KVManager.admit_for_transfer:
              the longest prefix of the prompt in this server's radix cache is reused, only
              the rest is allocated and asked for)
    inflight  slots allocated and sent to the prefill server as a "target" (with ``cached``,
              the prefix length it need not send); waiting for
              "done" (-> Scheduler.add_prefilled) or "failed"/the deadline (-> an error,
              KVManager.transfer_failed)
    draining  aborted while inflight: the client already has its answer, but the slots stay
              held until the prefill side answers or the deadline passes, so a write still in
              flight can never land in KV that another request owns

The prompt is never computed here: a request whose KV cannot arrive fails with an error that
says why, within ``timeout`` seconds of silence (a dead prefill server never answers; its
requests fail at their deadline and free their KV; every other request keeps decoding). A
busy prefill server is told from a dead one by its heartbeat: each "alive" naming a room
moves that room's deadline ``timeout`` seconds on, however long it queues there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from plait.core.finish_reason import FinishReason
from plait.core.kv_manager import KVManager
from plait.core.request import Req
from plait.disaggregation.bootstrap import (
    KVLayout,
    Pushers,
    decode_msg,
    generator_from_json,
    kv_buffers,
    layout_to_json,
    logprobs_from_json,
    pull_socket,
)
from plait.disaggregation.transfer import KVTransfer

log = logging.getLogger(__name__)


@dataclass
class _Inflight:
    req: Req
    slots: torch.Tensor
    prefill: str  # the prefill server's bootstrap address
    deadline: float
    aborted: bool = False


class DecodeSide:
    def __init__(
        self,
        transfer: KVTransfer,
        kv: KVManager,
        kv_pool: Any,
        host: str,
        timeout: float,
        admit: Callable[[Req, int], None],
        fail: Callable[[Req, FinishReason], None],
        ranks: list[dict[str, Any]] | None = None,
    ):
        self.transfer = transfer
        self.kv = kv
        self.timeout = timeout
        self.admit = admit  # Scheduler.add_prefilled
        self.fail = fail  # finish a request that never started (not admitted anywhere)
        # tensor-parallel ranks 1..N-1: where a prefill server's matching ranks write
        self.ranks = [{"session": r["session"], "layout": r["layout"]} for r in ranks or []]
        buffers = kv_buffers(kv_pool)
        self.layout = KVLayout.of(buffers)
        for b in buffers:
            transfer.register(b.data_ptr(), b.numel() * b.element_size())
        # row r's first token lands here
        self.tokens = torch.zeros(kv.req_pool.size, dtype=torch.int64)
        transfer.register(self.tokens.data_ptr(), self.tokens.numel() * 8)
        self.ctx = zmq.Context()
        self.sock, self.notify = pull_socket(self.ctx, host, None)
        self.pushers = Pushers(self.ctx)
        self.queued: list[Req] = []
        self.inflight: dict[int, _Inflight] = {}
        self.stats = {
            "kv_transfers": 0,
            "kv_bytes_received": 0,
            "kv_tokens_received": 0,  # prompt tokens whose KV came from a prefill server
            "kv_tokens_reused": 0,  # prompt tokens whose KV this server's radix cache held
            "kv_transfer_seconds": 0.0,
            "kv_transfer_failures": 0,
        }
        log.info("decode notifications on %s (KV via %s)", self.notify, transfer.session_id)

    def add(self, req: Req) -> None:
        self.queued.append(req)

    def has_work(self) -> bool:
        return bool(self.queued or self.inflight)

    def poll(self) -> None:
        self._start_transfers()
        while True:
            try:
                raw = self.sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode_msg(raw)
            if msg is not None:
                self._on_message(msg)
        now = time.monotonic()
        for room, it in list(self.inflight.items()):
            if it.deadline < now:
                self._end(
                    room,
                    f"no KV from the prefill server {it.prefill} and no heartbeat for "
                    f"{self.timeout:.0f}s (is it alive?)",
                    cancel=True,
                )

    def abort(self, rid: str) -> bool:
        for req in self.queued:
            if req.rid == rid:
                self.queued.remove(req)
                self.fail(req, FinishReason.abort("aborted"))
                return True
        for room, it in self.inflight.items():
            if it.req.rid == rid and not it.aborted:
                it.aborted = True
                self.pushers.send(it.prefill, {"op": "cancel", "room": room})
                self.fail(it.req, FinishReason.abort("aborted"))
                return True
        return False

    # ----- internals -----

    def _start_transfers(self) -> None:
        while self.queued:
            req = self.queued[0]
            if req.bootstrap.room in self.inflight:  # a room pairs one request at a time
                self.queued.pop(0)
                self.fail(
                    req,
                    FinishReason.error(
                        f"bootstrap_room {req.bootstrap.room} is already in use on this server"
                    ),
                )
                continue
            admitted = self.kv.admit_for_transfer(req, len(req.input_ids))
            if admitted is None:
                return  # wait for running requests to free KV
            slots, cached = admitted
            self.queued.pop(0)
            b = req.bootstrap
            prefill = f"tcp://{b.host}:{b.port}"
            self.inflight[b.room] = _Inflight(req, slots, prefill, time.monotonic() + self.timeout)
            self.pushers.send(
                prefill,
                {
                    "op": "target",
                    "room": b.room,
                    "session": self.transfer.session_id,
                    "notify": self.notify,
                    "layout": layout_to_json(self.layout),
                    "ranks": self.ranks,
                    "cached": cached,
                    "slots": slots.tolist(),
                    "aux": self.tokens.data_ptr() + 8 * req.req_pool_idx,
                },
            )

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg["op"] == "alive":  # the prefill server holds these rooms' requests: wait on
            deadline = time.monotonic() + self.timeout
            for r in msg["rooms"]:
                if (alive := self.inflight.get(r)) is not None:
                    alive.deadline = deadline
            return
        room = msg["room"]
        it = self.inflight.get(room)
        if it is None:
            return  # already timed out
        if msg["op"] == "failed":
            self._end(room, str(msg.get("message", "the prefill server failed")), cancel=False)
        elif msg["op"] == "done":
            del self.inflight[room]
            if it.aborted:
                self.kv.transfer_failed(it.req, it.slots)
                return
            self.stats["kv_transfers"] += 1
            self.stats["kv_bytes_received"] += int(msg.get("bytes", 0))
            self.stats["kv_tokens_received"] += len(it.slots)
            self.stats["kv_tokens_reused"] += len(it.req.input_ids) - len(it.slots)
            self.stats["kv_transfer_seconds"] += float(msg.get("seconds", 0.0))
            if it.req.return_logprob:
                if not isinstance(msg.get("logprobs"), dict):
                    self._fail_landed(it, "the prefill server sent no logprobs")
                    return
                logprobs_from_json(msg["logprobs"], it.req)
            if it.req.generator is not None and isinstance(msg.get("generator"), str):
                generator_from_json(msg["generator"], it.req.generator)
            self.kv.transfer_done(it.req, len(it.req.input_ids))
            self.admit(it.req, int(self.tokens[it.req.req_pool_idx]))

    def _fail_landed(self, it: _Inflight, message: str) -> None:
        """The KV landed but the request cannot go on (nothing more will be written)."""
        self.kv.transfer_failed(it.req, it.slots)
        self.stats["kv_transfer_failures"] += 1
        self.fail(it.req, FinishReason.error(message))

    def _end(self, room: int, message: str, cancel: bool) -> None:
        it = self.inflight.pop(room)
        if cancel:
            self.pushers.send(it.prefill, {"op": "cancel", "room": room})
        self.kv.transfer_failed(it.req, it.slots)
        if not it.aborted:
            self.stats["kv_transfer_failures"] += 1
            log.warning("request %s failed: %s", it.req.rid, message)
            self.fail(it.req, FinishReason.error(message))

    def close(self) -> None:
        self.pushers.close()
        self.sock.close()
        self.ctx.term()
