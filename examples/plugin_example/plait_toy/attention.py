"""The toy device's attention: the CPU reference, with call counters for tests."""

from __future__ import annotations

import collections

from plait.backends.cpu.attention import TorchAttentionBackend

CALLS: collections.Counter = collections.Counter()


class ToyAttentionBackend(TorchAttentionBackend):
    def forward_extend(self, q, layer_id, batch):
        CALLS["extend"] += 1
        return super().forward_extend(q, layer_id, batch)

    def forward_decode(self, q, layer_id, batch):
        CALLS["decode"] += 1
        return super().forward_decode(q, layer_id, batch)
