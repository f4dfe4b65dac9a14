"""Speculative sampling keeps the model's distribution: a chi-square test of the verified
tokens against a tiny random model's own next-token distributions, drafts that the model
often rejects included."""

from __future__ import annotations

import pytest
import torch

from plait.core.forward_batch import ExtendItem
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampler import filter_probs
from plait.core.sampling_params import SamplingParams
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats
from plait.core.spec.config import SpecSettings
from plait.core.spec.verify import Speculator

TOP_K = 6
SAMPLES = 3000


class _KeepAllKV:
    """The verify step's KV bookkeeping, recorded instead of done (one request at a time)."""

    cache = None

    def trim(self, req: Req, n: int) -> None:
        req.kv_len = n


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (over the support)."""
    support = probs > 0
    n = counts.sum()
    expected = probs[support] * n
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))


@pytest.fixture(scope="module")
def rows_and_tokenizer(make_tiny_model):
    """The tiny model's logits at the last three positions of a prompt, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(300, 340))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -3:].float()
    return ids, logits, AutoTokenizer.from_pretrained(path)


def test_verified_tokens_follow_the_models_distribution(rows_and_tokenizer):
    ids, logits, tokenizer = rows_and_tokenizer
    probs = [filter_probs(row, 1.0, TOP_K, 1.0, 0.0) for row in logits]
    # draft the second most likely token first (rejected often), then the most likely
    drafts = [int(probs[0].argsort(descending=True)[1]), int(probs[1].argmax())]
    spec = Speculator(
        SpecSettings(max_drafts=2, min_match=1, max_match=2),
        _KeepAllKV(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        SchedulerStats(),
        SchedulerConfig(context_len=4096),
        RequestFinisher(tokenizer, {2}),
        after_append=lambda req: None,
        end=lambda req, reason: pytest.fail(f"request ended: {reason}"),
    )
    first = torch.zeros(logits.shape[1])
    second = torch.zeros(logits.shape[1])
    for seed in range(SAMPLES):
        sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=TOP_K, ignore_eos=True)
        req = Req(rid=str(seed), input_ids=ids[:-1], sampling=sp)
        req.generator = torch.Generator().manual_seed(seed)
        req.kv_len = len(ids) + 2  # as planned: the last token and the drafts
        item = ExtendItem(
            req=req,
            start=len(ids) - 1,
            length=3,
            slots=torch.zeros(3, dtype=torch.int64),
            logit_from=len(ids) - 1,
            tokens=[ids[-1], *drafts],
        )
        req.output_ids.append(ids[-1])  # the last committed token: the verify pass's input
        spec._verify(item, drafts, logits.clone())
        out = req.output_ids[1:]
        first[out[0]] += 1
        if out[0] == drafts[0]:
            second[out[1]] += 1
    accepted = int(first[drafts[0]])
    assert 0.1 * SAMPLES < accepted < 0.9 * SAMPLES  # both paths taken many times
    assert _p_value(first, probs[0]) > 1e-3
    assert _p_value(second, probs[1]) > 1e-3
    # the test has power: the same counts against the uniform distribution on the support fail
    uniform = (probs[0] > 0).float() / int((probs[0] > 0).sum())
    assert _p_value(first, uniform) < 1e-6
