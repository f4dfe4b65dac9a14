"""Choosing a :class:`~plait.disaggregation.transfer.KVTransfer` by name
(``--disaggregation-transfer-backend``); a new transport is one more branch here."""

from __future__ import annotations

from plait.disaggregation.transfer import FakeTransfer, KVTransfer


def create_transfer(backend: str, host: str) -> KVTransfer:
    """The transport ``--disaggregation-transfer-backend`` names, listening on ``host``."""
    if backend == "mooncake":
        from plait.disaggregation.mooncake import MooncakeTransfer  # needs plait[pd]

        return MooncakeTransfer(host)
    if backend == "fake":
        return FakeTransfer()
    raise ValueError(
        f"disaggregation_transfer_backend must be 'mooncake' or 'fake', got {backend!r}"
    )
