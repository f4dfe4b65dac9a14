"""The control messages between a decode server and a prefill server, and their sockets.

Data moves through a :class:`~plait.disaggregation.transfer.KVTransfer`; these small JSON
messages say what to move and when it has landed. The prefill server binds a ZeroMQ PULL
socket on its bootstrap port (the ``BOOTSTRAP_PORT`` the gateway was given, and what it puts
in ``bootstrap_port``); each decode server binds one of its own for notifications.

  decode -> prefill  {"op": "target", "room", "session", "notify", "layout", "cached",
                      "slots", "aux"}
                      where to write the KV of ``room``'s prompt tokens after the first
                      ``cached`` (which the decode server's radix cache holds already):
                      ``slots``, one per token, in this layout; and, at address ``aux``, its
                      first token (int64); under tensor parallelism also ``ranks``, the
                      session and layout of its ranks 1..N-1 (``rank_agent``)
                     {"op": "cancel", "room"}: the decode side gave up; write nothing more
  prefill -> decode  {"op": "done", "room", "logprobs"?, "generator"?} after both writes
                      returned; with ``return_logprob``, the prompt's logprobs and the first
                      token's (``logprobs_to_json``), which only the prefill side computed;
                      with a seed, the sampler's state after the first token
                     {"op": "failed", "room", "message"}
                     {"op": "alive", "room": -1, "rooms"}: heartbeat, every ``timeout / 4``
                      seconds at most, naming the rooms whose decode side already sent a
                      target and whose request is queued or running here: the decode side
                      keeps waiting for them (``timeout`` bounds silence, not queueing)

Where SGLang's prefill registers with an HTTP bootstrap server that decode ranks query for the
rank's address, a Plait server's rank 0 speaks for all its ranks: the decode side's ``target``
lists its per-rank table, and prefill rank 0 has its own ranks write to the matching ones.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
import zmq

from plait.disaggregation.transfer import TransferError, contiguous_runs


@dataclass(frozen=True)
class KVLayout:
    """Where slot ``s`` of K/V buffer ``i`` is: ``bases[i] + s * slot_bytes``. The same model
    and dtype on both sides give the same number of buffers and ``slot_bytes``."""

    bases: tuple[int, ...]
    slot_bytes: int

    @classmethod
    def of(cls, buffers: list[torch.Tensor]) -> "KVLayout":
        sizes = {b[0].numel() * b.element_size() for b in buffers}
        if len(sizes) != 1 or not all(b.is_contiguous() for b in buffers):
            raise ValueError("KV buffers must be contiguous with one slot size")
        return cls(tuple(b.data_ptr() for b in buffers), sizes.pop())

    def writes(
        self, dst: "KVLayout", src_slots: list[int], dst_slots: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """Source addresses, destination addresses and lengths copying ``src_slots`` of every
        buffer here to ``dst_slots`` of the same buffer there."""
        if (len(self.bases), self.slot_bytes) != (len(dst.bases), dst.slot_bytes):
            raise TransferError(
                f"KV layouts differ: {len(self.bases)} buffers of "
                f"{self.slot_bytes} B/slot here, {len(dst.bases)} of "
                f"{dst.slot_bytes} there (same model and dtype needed)"
            )
        runs = contiguous_runs(src_slots, dst_slots)
        sb = self.slot_bytes
        src, dsts, lengths = [], [], []
        for s_base, d_base in zip(self.bases, dst.bases):
            for s, d, n in runs:
                src.append(s_base + s * sb)
                dsts.append(d_base + d * sb)
                lengths.append(n * sb)
        return src, dsts, lengths


def kv_buffers(kv_pool: Any) -> list[torch.Tensor]:
    """Every K and V buffer of a :class:`~plait.core.backend_api.KVPool`, layer by layer; a
    latent pool's latent buffers (its V buffers are views of them, sent once)."""
    latent = getattr(kv_pool, "latent_buffers", None)
    if latent is not None:
        return list(latent)
    return [b for pair in zip(kv_pool.k_buffers, kv_pool.v_buffers) for b in pair]


def layout_to_json(layout: KVLayout) -> dict[str, Any]:
    return asdict(layout)


def layout_from_json(d: dict[str, Any]) -> KVLayout:
    return KVLayout(tuple(int(b) for b in d["bases"]), int(d["slot_bytes"]))


_LOGPROB_FIELDS = (
    "input_token_logprobs",
    "input_top_logprobs",
    "output_token_logprobs",
    "output_top_logprobs",
)


def logprobs_to_json(req: Any) -> dict[str, Any]:
    """A prefilled request's logprobs (the prompt's and its first token's) as JSON. Floats
    survive JSON exactly (``repr`` round-trips), so the decode side returns the very values a
    unified server would have."""
    return {name: getattr(req, name) for name in _LOGPROB_FIELDS}


def logprobs_from_json(d: dict[str, Any], req: Any) -> None:
    """Give ``req`` the logprobs ``logprobs_to_json`` sent: entries back to
    ``(logprob, token_id, None)`` tuples, top lists back to lists of them (or None)."""

    def entry(e: list[Any]) -> tuple[Any, ...]:
        return tuple(e)

    def tops(t: list[list[Any]] | None) -> list[tuple[Any, ...]] | None:
        return None if t is None else [entry(e) for e in t]

    req.input_token_logprobs = [entry(e) for e in d["input_token_logprobs"]]
    req.input_top_logprobs = [tops(t) for t in d["input_top_logprobs"]]
    req.output_token_logprobs = [entry(e) for e in d["output_token_logprobs"]]
    req.output_top_logprobs = [tops(t) for t in d["output_top_logprobs"]]


def generator_to_json(generator: torch.Generator) -> str:
    """A seeded request's generator state after the first token was sampled: the decode side
    continues from it, so its samples are the ones a unified server draws next."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def generator_from_json(state: str, generator: torch.Generator) -> None:
    raw = bytearray(base64.b64decode(state))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


def decode_json(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for anything else."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def decode_msg(raw: bytes) -> dict[str, Any] | None:
    """A message, or None for anything malformed (a stray client must not kill the loop)."""
    msg = decode_json(raw)
    if (
        msg is None
        or msg.get("op") not in ("target", "cancel", "done", "failed", "alive")
        or not isinstance(msg.get("room"), int)
    ):
        return None
    if msg["op"] == "alive" and not (
        isinstance(msg.get("rooms"), list) and all(isinstance(r, int) for r in msg["rooms"])
    ):
        return None
    return msg


class Pushers:
    """One PUSH socket per peer address, created on first use; owned by one thread."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.sockets: dict[str, zmq.Socket] = {}

    def send(self, addr: str, msg: dict[str, Any]) -> None:
        sock = self.sockets.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(addr)
            self.sockets[addr] = sock
        try:
            sock.send(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:  # the peer is gone and its queue full: its timeout covers it
            pass

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


def pull_socket(ctx: zmq.Context, host: str, port: int | None) -> tuple[zmq.Socket, str]:
    """A bound PULL socket and the address peers connect to (``port=None``: any free one)."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    if port is None:
        port = sock.bind_to_random_port("tcp://*")
    else:
        sock.bind(f"tcp://*:{port}")
    return sock, f"tcp://{host}:{port}"
