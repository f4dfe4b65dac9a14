"""Mooncake's transfer engine (``pip install 'plait[pd]'``) as a :class:`KVTransfer`.

It runs in P2P-handshake mode (no metadata server: the session id is ``host:rpc_port`` and
peers exchange segment descriptors on first contact) over the ``tcp`` protocol, the transport
that works everywhere; SGLang uses the same engine over RDMA in production, which is the
``protocol`` argument away. A write is a series of ``batch_transfer_sync_write`` calls of at
most ``BATCH`` entries: the TCP transport's queue rejects larger batches ("lane queue-full"),
and a prompt whose slots are scattered (radix-cache hits) makes one entry per run per buffer.
"""

from __future__ import annotations

from plait.disaggregation.transfer import KVTransfer, TransferError

BATCH = 64


class MooncakeTransfer(KVTransfer):
    def __init__(self, host: str, protocol: str = "tcp", device_name: str = ""):
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise ValueError(
                "disaggregation_transfer_backend: mooncake is not installed "
                "(pip install 'plait[pd]'; it needs Debian's libibverbs1)"
            ) from e
        self.engine = TransferEngine()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(
                f"Mooncake's transfer engine failed to start on {host} ({protocol}): status {rc}"
            )
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"

    def register(self, ptr: int, nbytes: int) -> None:
        rc = self.engine.register_memory(ptr, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake could not register {nbytes} bytes at {ptr:#x}: {rc}")

    def write(self, peer: str, src: list[int], dst: list[int], lengths: list[int]) -> None:
        for i in range(0, len(src), BATCH):
            rc = self.engine.batch_transfer_sync_write(
                peer, src[i : i + BATCH], dst[i : i + BATCH], lengths[i : i + BATCH]
            )
            if rc != 0:
                raise TransferError(f"Mooncake write to {peer} failed (status {rc})")
