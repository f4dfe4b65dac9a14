"""``enable_deterministic_inference``: a request's logprobs are bit-identical alone and inside
batches of random others, at any position, with chunked prefill and prefix-cache hits
(docs/deterministic.md)."""

from __future__ import annotations

import random

import pytest
import torch

import plait

#: the request every scenario checks: long enough to be prefilled in several chunks
TARGET = [random.Random(1).randrange(3, 40000) for _ in range(90)]
GREEDY = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
SEEDED = dict(max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True)


def logprobs(out: dict) -> torch.Tensor:
    """The output tokens' logprobs as the float32 values the engine computed."""
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])


def run_in_batch(engine, target: list[int], others: list[list[int]], pos: int, sp: dict):
    """``target`` at index ``pos`` of one batch with ``others``: its output."""
    ids = others[:pos] + [target] + others[pos:]
    params = [dict(GREEDY, max_new_tokens=random.Random(len(o)).randrange(1, 9)) for o in ids]
    params[pos] = sp
    return engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)[pos]


def mismatches(engine, sizes=(1, 3, 17, 64)) -> list[str]:
    """The scenarios whose output differed from the request alone on a fresh cache."""
    rng = random.Random(0)
    bad = []

    def check(name: str, ref: dict, got: dict) -> None:
        if ref["output_ids"] != got["output_ids"] or not torch.equal(logprobs(ref), logprobs(got)):
            bad.append(name)

    engine.flush_cache()
    ref = run_in_batch(engine, TARGET, [], 0, GREEDY)
    engine.flush_cache()
    ref_seeded = run_in_batch(engine, TARGET, [], 0, SEEDED)
    for n in sizes:
        # some others share the target's first tokens (a shared prefix in the batch)
        others = [
            (TARGET[: rng.randrange(1, 80)] if rng.random() < 0.3 else [])
            + [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 150))]
            for _ in range(n)
        ]
        pos = rng.randrange(n + 1)
        engine.flush_cache()
        check(f"batch {n} at {pos}", ref, run_in_batch(engine, TARGET, others, pos, GREEDY))
        engine.flush_cache()
        check(f"seeded batch {n}", ref_seeded, run_in_batch(engine, TARGET, others, pos, SEEDED))
    # prefix-cache hits: part of the prompt cached by an earlier request, then all of it
    engine.flush_cache()
    engine.generate(input_ids=TARGET[:50], sampling_params=GREEDY)
    check("partial cache hit", ref, run_in_batch(engine, TARGET, [], 0, GREEDY))
    check("full cache hit", ref, run_in_batch(engine, TARGET, [], 0, GREEDY))
    # a second turn: its prompt holds the first turn's output, whose KV decode computed
    turn2 = TARGET + ref["output_ids"] + TARGET[:20]
    engine.flush_cache()
    ref2 = run_in_batch(engine, turn2, [], 0, GREEDY)
    engine.flush_cache()
    run_in_batch(engine, TARGET, [], 0, GREEDY)
    check("second turn over decoded KV", ref2, run_in_batch(engine, turn2, [], 0, GREEDY))
    return bad


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def test_logprobs_are_batch_invariant(tiny):
    with plait.Engine(tiny, enable_deterministic_inference=True, chunked_prefill_size=32) as engine:
        assert mismatches(engine) == []


def test_sliding_window_model_is_batch_invariant(make_tiny_model):
    path = make_tiny_model("mistral", sliding_window=24)
    with plait.Engine(path, enable_deterministic_inference=True, chunked_prefill_size=32) as engine:
        assert mismatches(engine, sizes=(3, 17)) == []


@pytest.mark.parametrize(
    "args, named",
    [
        (dict(tp_size=2), "tensor parallelism"),
        (dict(speculative_algorithm="NGRAM"), "speculative"),
        (dict(enable_graph_capture=True), "enable_graph_capture"),
        (dict(quantization="int8"), "quantized"),
        (dict(dtype="bfloat16"), "float32"),
        (dict(backend_options=dict(linear_layout="onednn")), "panel"),
    ],
)
def test_unsupported_combinations_are_refused(tiny, args, named):
    with pytest.raises(ValueError, match=named):
        plait.Engine(tiny, enable_deterministic_inference=True, **args)


@pytest.mark.slow
def test_smollm2_logprobs_are_batch_invariant(smollm_dir):
    with plait.Engine(
        smollm_dir, enable_deterministic_inference=True, chunked_prefill_size=64
    ) as engine:
        assert mismatches(engine, sizes=(3, 17, 64)) == []


def test_serve_flag_reaches_the_engine_and_other_devices_refuse_it():
    from plait.server.cli import build_parser
    from plait.server.server_args import from_namespace

    args = from_namespace(build_parser().parse_args(["serve", "--enable-deterministic-inference"]))
    assert args.engine_kwargs("/m")["enable_deterministic_inference"] is True
    default = from_namespace(build_parser().parse_args(["serve"])).engine_kwargs("/m")
    assert "enable_deterministic_inference" not in default
    npu = from_namespace(
        build_parser().parse_args(["serve", "--device", "npu", "--enable-deterministic-inference"])
    )
    with pytest.raises(ValueError, match="no batch-invariant kernels"):
        npu.validate()
