"""DeepSeek (multi-head latent attention) on the NPU backend (``npu/mla_attention.py``), run by
the real NPU backend class on CPU tensors with a torch_npu stand-in written from the op's
documentation (never run on Ascend hardware): decode through FIA's MLA mode gives the CPU
backend's tokens, and the torch fallback over the split latent pool gives transformers'."""

import pytest
import torch

import plait
from plait.backends.npu.mla_attention import AscendMLAAttention, SplitLatentKVPool
from plait.core.forward_batch import ForwardBatch
from plait.testing.register import temporarily_registered
from tests.backends.npu_standin import NpuStandIn, torch_npu_standin

PROMPTS = [[5, 17, 300, 42, 9000, 77, 12, 13, 14], [5, 17, 300, 42, 9000, 77, 1000]]
GREEDY = {"max_new_tokens": 5, "temperature": 0}
#: DeepSeek-V2/V3's attention sizes, the ones FIA's MLA mode takes, on a tiny model
FIA_SIZES = dict(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=32)


def fia_calls(standin, op: str) -> int:
    return sum(1 for name, _ in standin.calls if name == op)


def test_decode_through_fia_mla_matches_the_cpu_backend(monkeypatch, tmp_path, smollm_dir):
    """float16, block size 16, chunks of 8: every decode step and every extend (at most 16 new
    tokens) of every layer goes through FIA's MLA mode, and the tokens equal the CPU backend's
    torch MLA at float16 with the same plain Linears, batched, chunked and after a prefix-cache
    hit (bfloat16's 8-bit mantissa lets the stand-in's
    float32 softmax and the CPU's bfloat16 one part after a few tokens on this random model)."""
    from tests.models.deepseek_tiny import write_tiny_deepseek

    path = write_tiny_deepseek("v3", tmp_path / "v3", smollm_dir, **FIA_SIZES)
    prompts = [PROMPTS[0] * 2 + [99, 98], PROMPTS[1]]  # 20 tokens: one full block of 16
    cpu_opts = {"prepack_weights": False, "native_decode": False, "greedy_head": False}
    with plait.Engine(
        path, device="cpu", dtype="float16", max_total_tokens=1024, backend_options=cpu_opts
    ) as engine:
        want = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]
    standin = torch_npu_standin()
    monkeypatch.setattr(NpuStandIn, "standin", standin)
    with temporarily_registered(NpuStandIn) as name:
        with plait.Engine(
            path,
            device=name,
            dtype="float16",
            page_size=16,
            max_total_tokens=1024,
            chunked_prefill_size=8,
        ) as engine:
            attn = engine.scheduler.runner.attn
            assert isinstance(attn, AscendMLAAttention) and attn.use_fia
            assert isinstance(attn.kv_pool, SplitLatentKVPool)
            for _ in range(2):  # the second round hits the prefix cache
                outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
                assert [o["output_ids"] for o in outs] == want
            assert outs[0]["meta_info"]["cached_tokens"] == 16
    for op in ("fia_mla", "fia_mla_extend"):  # every one of the 3 layers, each step
        assert fia_calls(standin, op) > 0 and fia_calls(standin, op) % 3 == 0
    assert fia_calls(standin, "fia") == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_configurations_fia_does_not_take_run_the_torch_form(
    monkeypatch, tmp_path, smollm_dir, dtype
):
    """The tiny model's own sizes (latent 16, 4 heads) are outside FIA's MLA mode: the torch
    absorbed form reads the split pool; at float32 its tokens are transformers', batched,
    chunked and after a prefix-cache hit."""
    from tests.conftest import hf_greedy
    from tests.models.deepseek_tiny import hf_model, write_tiny_deepseek

    path = write_tiny_deepseek("v2", tmp_path / "v2", smollm_dir)
    standin = torch_npu_standin()
    monkeypatch.setattr(NpuStandIn, "standin", standin)
    with temporarily_registered(NpuStandIn) as name:
        with plait.Engine(
            path,
            device=name,
            dtype=dtype,
            page_size=4,
            max_total_tokens=1024,
            chunked_prefill_size=4,
        ) as engine:
            attn = engine.scheduler.runner.attn
            assert isinstance(attn, AscendMLAAttention) and not attn.use_fia
            outs = []
            for _ in range(2):
                outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
            assert outs[0]["meta_info"]["cached_tokens"] == len(PROMPTS[0]) - 1
    assert fia_calls(standin, "fia_mla") == fia_calls(standin, "fia_mla_extend") == 0
    if dtype == "float32":
        assert [o["output_ids"] for o in outs] == hf_greedy(hf_model(path), PROMPTS, 5)


def test_split_pool_fields_and_transfer_buffers():
    """c and k_rope in two contiguous buffers per layer; what slot copies and disaggregation
    move is both of them, and nothing offers the combined row."""
    from plait.core.kv_layout import latent_layout
    from plait.disaggregation.bootstrap import kv_buffers

    pool = SplitLatentKVPool(
        latent_layout(num_layers=2, kv_lora_rank=8, rope_dim=4), 16, torch.float32, "cpu", 4
    )
    pool.set_latent(1, torch.tensor([3]), torch.arange(12.0).unsqueeze(0))
    assert pool.nope_buffers[1][3, 0].tolist() == list(range(8))
    assert pool.rope_buffers[1][3, 0].tolist() == [8.0, 9.0, 10.0, 11.0]
    sent = kv_buffers(pool)
    assert [tuple(b.shape) for b in sent] == [(20, 1, 8), (20, 1, 4)] * 2
    assert all(b.is_contiguous() for b in sent)
    assert not hasattr(pool, "latent_buffers")


def _batch(
    seq_lens: list[int], extend_lens: list[int], page_size: int, num_pages: int, gen
) -> ForwardBatch:
    """A batch whose requests own scattered pages (a random page order), so reading the wrong
    block or offset cannot pass by accident; decode when every request adds one token."""
    pages = (torch.randperm(num_pages, generator=gen) + 1).tolist()  # page 0 is padding
    req_to_token = torch.zeros(len(seq_lens) + 1, num_pages * page_size, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        mine = [pages.pop() for _ in range(-(-n // page_size))]
        for i in range(n):
            req_to_token[b + 1, i] = mine[i // page_size] * page_size + i % page_size
    prefix_lens = [n - e for n, e in zip(seq_lens, extend_lens)]
    req_rows = torch.arange(1, len(seq_lens) + 1)
    t_rows = torch.repeat_interleave(req_rows, torch.tensor(extend_lens))
    positions = torch.cat([torch.arange(p, n) for p, n in zip(prefix_lens, seq_lens)])
    return ForwardBatch(
        is_decode=set(extend_lens) == {1},
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=positions,
        out_cache_loc=req_to_token[t_rows, positions].long(),
        req_pool_indices=req_rows,
        seq_lens=torch.tensor(seq_lens),
        prefix_lens=torch.tensor(prefix_lens),
        extend_lens=torch.tensor(extend_lens),
        req_to_token=req_to_token,
        logits_rows=torch.arange(len(positions)),
        seq_lens_cpu=seq_lens,
        prefix_lens_cpu=prefix_lens,
        extend_lens_cpu=extend_lens,
    )


@pytest.mark.parametrize("extend", [False, True], ids=["decode", "extend"])
@pytest.mark.parametrize("page_size", [16, 128])
def test_fia_mla_equals_the_torch_form(page_size, extend):
    """Attention outputs, not just tokens: FIA's MLA mode (stand-in) over the split pool
    against Plait's CPU MLA attention over the core's combined pool, with the same rows, at
    float16, for requests spanning many scattered blocks, one block, and a partial one;
    decode, and extend of up to 16 new tokens after a cached prefix (or none)."""
    from plait.backends.cpu.mla_attention import TorchMLAAttention
    from plait.core.kv_layout import latent_layout
    from plait.core.mla import LatentKVPool

    gen = torch.Generator().manual_seed(page_size)
    num_pages, heads, scale = 12 if page_size == 128 else 40, 32, 0.07
    layout = latent_layout(num_layers=2, kv_lora_rank=512, rope_dim=64)
    slots = num_pages * page_size
    split = SplitLatentKVPool(layout, slots, torch.float16, "cpu", page_size)
    whole = LatentKVPool(layout, slots, torch.float16, "cpu", page_size)
    every = torch.arange(slots + page_size)
    for layer in range(2):
        rows = torch.randn(len(every), 576, generator=gen) * (1 + layer)
        split.set_latent(layer, every, rows)
        whole.set_latent(layer, every, rows)
    seq_lens = [5 * page_size + 3, page_size, 7]
    extend_lens = [16, 1, 7] if extend else [1, 1, 1]
    batch = _batch(seq_lens, extend_lens, page_size, num_pages, gen)
    q = torch.randn(sum(extend_lens), heads, 576, generator=gen).half()
    standin = torch_npu_standin()
    npu = AscendMLAAttention(split, heads, scale, torch_npu=standin)
    ref = TorchMLAAttention(whole, heads, scale)
    assert npu.use_fia
    for attn in (npu, ref):
        attn.init_forward_metadata(batch)
    if extend:
        got, want = npu.forward_extend(q, 1, batch), ref.forward_extend(q, 1, batch)
    else:
        got, want = npu.forward_decode(q, 1, batch), ref.forward_decode(q, 1, batch)
    assert fia_calls(standin, "fia_mla_extend" if extend else "fia_mla") == 1
    assert got.shape == (sum(extend_lens), heads, 512)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
