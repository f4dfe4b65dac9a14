"""STANDALONE speculative decoding: a draft model proposes, the target verifies. The output
with a draft is the output without one (greedy token for token, seeded sampling too) for a
batch of every request kind, after prefix-cache hits and with chunked prefill; the target as
its own draft has every draft accepted (so the draft really runs); a draft with another
tokenizer is refused; the server's flags reach the engine."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

import plait
from plait.core.spec.cost import PassCost
from plait.core.engine_config import EngineConfig
from plait.core.spec.draft_setup import check_same_tokenizer
from plait.server.cli import build_parser
from plait.server.server_args import from_namespace
from tests.conftest import TINY_BASE
from tests.core.test_overlap_schedule import comparable, kv_is_all_free, mixed_requests
from tests.core.test_speculative import run_all


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def standalone(target, draft, **kw) -> plait.Engine:
    return plait.Engine(
        target,
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=str(draft),
        **kw,
    )


def drafter_of(engine: plait.Engine):
    return engine.scheduler.spec.drafter


def plain_run(engine: plait.Engine) -> list:
    """The batch decoded by the same engine with its speculator detached: plain decoding
    (the overlap schedule is off under speculation, as in an engine without it), one engine
    start fewer than a second engine."""
    spec, engine.scheduler.spec = engine.scheduler.spec, None
    try:
        return [comparable(o) for o in run_all(engine)]
    finally:
        engine.scheduler.spec = spec


def test_a_small_draft_gives_the_targets_output(tiny, make_tiny_model):
    """A 1-layer draft (random, so it rarely agrees) with 3 steps: the first run prefills
    in chunks of 32, the second hits the prefix cache for every prompt."""
    draft = make_tiny_model("llama", num_hidden_layers=1)
    with standalone(tiny, draft, chunked_prefill_size=32, speculative_num_steps=3) as engine:
        first = run_all(engine)
        again = run_all(engine)
        drafted = engine.get_server_info()
        assert kv_is_all_free(engine)
        assert drafter_of(engine).held_tokens() == 0  # released with their requests
        plain = plain_run(engine)
    assert [comparable(o) for o in first] == plain
    assert [comparable(o) for o in again] == plain
    for o, (_, sp, _) in zip(again, mixed_requests()):
        assert len(o["output_ids"]) <= sp["max_new_tokens"]
        assert o["meta_info"]["cached_tokens"] > 0
    assert drafted["speculative_algorithm"] == "STANDALONE"
    assert drafted["spec_verify_passes"] > 0 and drafted["spec_draft_tokens"] > 0
    assert drafter_of(engine).forwards > 0


def test_the_target_as_its_own_draft_is_accepted(tiny):
    """The draft computes what the target computes: the greedy requests have (nearly) every
    draft accepted and commit up to 5 tokens per verify pass. (Sampled, penalised or
    constrained requests accept less: the draft proposes the raw model's argmax.)"""
    with standalone(tiny, tiny, speculative_num_draft_tokens=5) as engine:
        # no cost cap: the counts below are the draft's acceptance, not this machine's
        # pass times (the tiny model's are flat and, on a loaded machine, noise)
        engine.scheduler.output.observe_pass = None
        engine.scheduler.spec.cost = PassCost()
        out = run_all(engine)
        info = engine.get_server_info()
        assert kv_is_all_free(engine) and drafter_of(engine).held_tokens() == 0
        assert [comparable(o) for o in out] == plain_run(engine)
    assert info["spec_accepted_tokens"] > 0.8 * info["spec_draft_tokens"] > 100
    for o in out[-3:]:  # greedy, 40 tokens, no penalty or grammar
        meta = o["meta_info"]
        assert meta["spec_accept_token_num"] >= 0.95 * meta["spec_draft_token_num"] > 25
        assert meta["spec_verify_ct"] <= 10


def test_a_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    """Refused before any weight loads: the draft here is a config and a tokenizer only."""
    from transformers import AutoConfig

    other = tmp_path / "draft"
    config = AutoConfig.for_model("llama", **{**TINY_BASE, "vocab_size": 32000})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, other / name)
    with pytest.raises(ValueError, match="vocab_size 32000.*has 49152") as err:
        standalone(tiny, other)
    assert str(other) in str(err.value) and str(tiny) in str(err.value)


def test_a_draft_with_another_tokenizer_is_refused():
    def ckpt(name: str, vocab: dict[str, int]) -> SimpleNamespace:
        return SimpleNamespace(
            model_dir=name,
            hf_config=SimpleNamespace(vocab_size=8),
            tokenizer=SimpleNamespace(get_vocab=lambda: vocab),
        )

    same = ckpt("/draft", {"a": 0, "b": 1})
    check_same_tokenizer(ckpt("/target", {"a": 0, "b": 1}), same)
    with pytest.raises(ValueError, match="/draft has another tokenizer than the target /target"):
        check_same_tokenizer(ckpt("/target", {"a": 0, "b": 1}), ckpt("/draft", {"a": 1, "b": 0}))


def test_standalone_needs_a_draft_model_path():
    with pytest.raises(ValueError, match="STANDALONE' needs speculative_draft_model_path"):
        EngineConfig(speculative_algorithm="STANDALONE").validate()
    EngineConfig(speculative_algorithm="STANDALONE", speculative_draft_model_path="/d").validate()


def test_server_flags_reach_the_engine():
    ns = build_parser().parse_args(
        [
            "serve",
            "--speculative-algorithm",
            "STANDALONE",
            "--speculative-draft-model-path",
            "/draft",
            "--speculative-num-steps",
            "3",
            "--speculative-num-draft-tokens",
            "4",
        ]
    )
    args = from_namespace(ns)
    args.validate()
    kw = args.engine_kwargs("/m")
    assert (kw["speculative_algorithm"], kw["speculative_draft_model_path"]) == (
        "STANDALONE",
        "/draft",
    )
    assert (kw["speculative_num_steps"], kw["speculative_num_draft_tokens"]) == (3, 4)
    no_path = from_namespace(
        build_parser().parse_args(["serve", "--speculative-algorithm", "STANDALONE"])
    )
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        no_path.validate()
