"""The device-neutral DecodeGraphRunner's padding and static buffers, on the CPU with
EagerCapture (a capture that replays by rerunning), so everything but the CUDA graph API itself
is checked here."""

import pytest
import torch

from plait.backends.cpu.plugin import CpuBackend
from plait.core.graph_runner import DecodeGraphRunner, EagerCapture, _first_rows
from plait.testing import graph_kit

CPU = torch.device("cpu")


class CountingCapture(EagerCapture):
    def __init__(self):
        self.captured = 0

    def capture(self, step):
        self.captured += 1
        return super().capture(step)


class CpuWithGraphs(CpuBackend):
    """The CPU reference with the device-neutral runner over a given capture."""

    name = "cpu-graphs"

    def __init__(self, capture):
        super().__init__()
        self.capture = capture

    def create_graph_runner(self, model, max_batch_size):
        return DecodeGraphRunner(model, max_batch_size, self.torch_device, self.capture)


@pytest.mark.parametrize("page_size", [1, 16])
def test_replay_with_padding_equals_eager(page_size):
    capture = CountingCapture()
    assert graph_kit.check_graph_replay(CpuWithGraphs(capture), page_size=page_size)
    # batch sizes 3, 1, 8, 7 pad to 4, 1, 8, 8: one capture per padded size
    assert capture.captured == 3


def test_padded_sizes_cover_every_batch_up_to_the_max():
    runner = DecodeGraphRunner(None, 20, CPU, EagerCapture())
    assert runner.batch_sizes == (1, 2, 4, 8, 12, 16, 20)
    assert [runner.padded_size(n) for n in (1, 3, 5, 13, 17, 20)] == [1, 4, 8, 16, 20, 20]


def _batch(is_decode=True, n=2, table=None):
    from plait.core.forward_batch import ForwardBatch

    ones = torch.ones(n, dtype=torch.int64)
    return ForwardBatch(
        is_decode=is_decode,
        input_ids=ones,
        positions=ones,
        out_cache_loc=ones,
        req_pool_indices=ones,
        seq_lens=ones,
        prefix_lens=ones,
        extend_lens=ones,
        req_to_token=torch.zeros(4, 8, dtype=torch.int32) if table is None else table,
        logits_rows=torch.arange(n),
        seq_lens_cpu=[1] * n,
        prefix_lens_cpu=[1] * n,
        extend_lens_cpu=[1] * n,
    )


def test_only_decode_batches_within_the_max_are_replayed():
    runner = DecodeGraphRunner(None, 4, CPU, EagerCapture())
    assert runner.can_run(_batch()) and not runner.can_run(_batch(is_decode=False))
    assert not runner.can_run(_batch(n=5))
    with pytest.raises(ValueError, match="not replayable"):
        runner.replay(_batch(is_decode=False), lambda b: None)


def test_a_new_req_to_token_table_is_refused():
    runner = DecodeGraphRunner(None, 4, CPU, EagerCapture())
    runner.replay(_batch(), lambda b: b.input_ids * 2)
    with pytest.raises(ValueError, match="req_to_token changed"):
        runner.replay(_batch(table=torch.zeros(4, 8, dtype=torch.int32)), lambda b: None)


def test_padded_rows_use_slot_0_row_0_and_length_1():
    seen = {}
    runner = DecodeGraphRunner(None, 4, CPU, EagerCapture())
    b = _batch(n=3)
    b.out_cache_loc, b.req_pool_indices = torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3])
    b.seq_lens = torch.tensor([9, 9, 9])
    out = runner.replay(
        b,
        lambda s: (
            seen.update(
                loc=s.out_cache_loc.clone(), req=s.req_pool_indices.clone(), seq=s.seq_lens.clone()
            )
            or s.seq_lens * 1
        ),
    )
    assert seen["loc"].tolist() == [5, 6, 7, 0]
    assert seen["req"].tolist() == [1, 2, 3, 0]
    assert seen["seq"].tolist() == [9, 9, 9, 1]
    assert out.tolist() == [9, 9, 9]


def test_outputs_are_cut_to_the_real_rows_in_any_container():
    x = torch.arange(8).view(4, 2)
    out = _first_rows({"logits": x, "extra": (x, 1), "scalar": torch.tensor(3)}, 3, 4)
    assert out["logits"].shape == (3, 2) and out["extra"][0].shape == (3, 2)
    assert out["extra"][1] == 1 and out["scalar"].item() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA (or ROCm) GPU")
def test_cuda_graph_capture_replays():
    from plait.backends.cuda.graph_capture import TorchCudaGraphCapture

    x = torch.zeros(4, device="cuda")
    replay = TorchCudaGraphCapture().capture(lambda: x * 2 + 1)
    x.fill_(3)
    assert replay().tolist() == [7.0] * 4
