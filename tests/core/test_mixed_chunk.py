"""Mixed prefill and decode in one forward (``enable_mixed_chunk``, plait.core.mixed): the
same greedy tokens as without it and as transformers float32, forwards that really mixed
(``mixed_forward_passes``), each within ``chunked_prefill_size``, and the combinations it
cannot serve refused by name.

Staggered arrival without threads: ``max_running_requests=3`` with six prompts of different
output lengths, so queued prompts are admitted (and chunk-prefilled) while earlier ones are
still decoding.
"""

from __future__ import annotations

import pytest

import plait
from plait.core.engine_config import EngineConfig
from tests.models.hf_parity import build_tiny, hf_tokens

SHARED = list(range(300, 340))  # a 40-token prefix two prompts share
PROMPTS = [
    list(range(1000, 1005)),
    SHARED + [7, 8],
    list(range(2000, 2070)),  # long: five chunks of 16
    SHARED + list(range(3000, 3030)),
    [5, 6, 7],
    list(range(4000, 4050)),
]
NEWS = [24, 20, 12, 10, 16, 8]
CHUNK = 16
ENGINE = dict(max_total_tokens=4096, chunked_prefill_size=CHUNK, max_running_requests=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_dir):
    return build_tiny(tmp_path_factory.mktemp("mixed"), "llama", smollm_dir)


def greedy(news: list[int]) -> list[dict]:
    return [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in news]


def run_twice(engine: plait.Engine) -> list[list[int]]:
    """The staggered batch, then again from the prefix cache (same tokens, cache hit)."""
    first = engine.generate(input_ids=PROMPTS, sampling_params=greedy(NEWS))
    again = engine.generate(input_ids=PROMPTS, sampling_params=greedy(NEWS))
    got = [o["output_ids"] for o in first]
    assert [o["output_ids"] for o in again] == got, "a prefix-cache hit changed the tokens"
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again[1:4])
    return got


def test_mixed_chunk_matches_transformers_and_unmixed(tiny):
    want = [w[:n] for w, n in zip(hf_tokens(tiny, PROMPTS, max(NEWS)), NEWS)]
    with plait.Engine(str(tiny), **ENGINE) as engine:
        assert run_twice(engine) == want
        assert engine.get_server_info()["mixed_forward_passes"] == 0
    with plait.Engine(str(tiny), enable_mixed_chunk=True, **ENGINE) as engine:
        tokens: list[int] = []
        runner = engine.scheduler.runner
        prepare = runner.prepare_extend

        def recording(items):  # every extend's token count, decode rows included
            tokens.append(sum(it.length for it in items))
            return prepare(items)

        runner.prepare_extend = recording
        assert run_twice(engine) == want
        info = engine.get_server_info()
    assert info["mixed_forward_passes"] > 0 and info["mixed_decode_rows"] > 0
    assert max(tokens) <= CHUNK, "a mixed forward went past chunked_prefill_size"


def test_mixed_chunk_inline_schedule_matches(tiny):
    """Overlap off: the decode rows read real tokens, no placeholders."""
    want = [w[:n] for w, n in zip(hf_tokens(tiny, PROMPTS, max(NEWS)), NEWS)]
    with plait.Engine(
        str(tiny), enable_mixed_chunk=True, disable_overlap_schedule=True, **ENGINE
    ) as engine:
        assert run_twice(engine) == want
        assert engine.get_server_info()["mixed_forward_passes"] > 0


def requests_with_state() -> tuple[list[dict], dict]:
    """Six requests: a regex, logprobs with top-3, a stop token, and plain greedy ones."""
    params = greedy(NEWS)
    params[0] = {**params[0], "regex": "(ab|cd)+[0-9]{3}"}
    params[2] = {**params[2], "stop_token_ids": [0]}
    params[4] = {**params[4], "regex": "[a-z]+"}
    return params, {"return_logprob": [False, True, False, True, False, False]}


def test_mixed_chunk_with_grammar_logprobs_and_stops(tiny):
    params, extra = requests_with_state()
    runs = []
    for mixed in (False, True):
        with plait.Engine(str(tiny), enable_mixed_chunk=mixed, **ENGINE) as engine:
            outs = engine.generate(
                input_ids=PROMPTS, sampling_params=params, top_logprobs_num=3, **extra
            )
            runs.append((outs, engine.get_server_info()["mixed_forward_passes"]))
    (plain, _), (mixed_outs, passes) = runs
    assert passes > 0
    for a, b in zip(plain, mixed_outs):
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        for key in ("output_token_logprobs", "input_token_logprobs"):
            la, lb = a["meta_info"].get(key), b["meta_info"].get(key)
            assert (la is None) == (lb is None)
            for x, y in zip(la or [], lb or []):
                assert x[1] == y[1] and (x[0] is None) == (y[0] is None)
                assert x[0] is None or abs(x[0] - y[0]) < 1e-3
    assert all(c in "abcd0123456789" for c in mixed_outs[0]["text"])


@pytest.mark.parametrize(
    "setting, word",
    [
        ({"speculative_algorithm": "NGRAM"}, "speculative"),
        ({"disaggregation_mode": "prefill"}, "disaggregation"),
    ],
)
def test_mixed_chunk_refuses_what_it_cannot_serve(setting, word):
    with pytest.raises(ValueError, match=f"enable_mixed_chunk.*{word}"):
        EngineConfig(enable_mixed_chunk=True, **setting).validate()


def test_server_flag_reaches_the_engine():
    from plait.server.cli import build_parser
    from plait.server.server_args import from_namespace

    argv = ["serve", "--enable-mixed-chunk", "--chunked-prefill-size", "64"]
    args = from_namespace(build_parser().parse_args(argv))
    assert args.engine_kwargs("/m")["enable_mixed_chunk"] is True
    off = from_namespace(build_parser().parse_args(["serve"]))
    assert "enable_mixed_chunk" not in off.engine_kwargs("/m")


@pytest.mark.parametrize(
    "flags", [["--pd", "1P1D"], ["--speculative-algorithm", "NGRAM"]], ids=["pd", "spec"]
)
def test_serve_refuses_mixed_chunk_with_what_it_cannot_serve(flags):
    from plait.server.cli import build_parser
    from plait.server.server_args import from_namespace

    args = from_namespace(build_parser().parse_args(["serve", "--enable-mixed-chunk", *flags]))
    with pytest.raises(ValueError, match="--enable-mixed-chunk"):
        args.validate()


def test_decodes_that_fill_the_budget_hold_the_prompt_back_without_a_hang(tiny):
    """Budget 3, up to 3 decodes: some steps leave the prompt nothing (a plain decode, no
    empty chunk), others one or two tokens; every request still ends with the right tokens."""
    want = [w[:n] for w, n in zip(hf_tokens(tiny, PROMPTS[:4], max(NEWS)), NEWS)]
    kwargs = {**ENGINE, "chunked_prefill_size": 3}
    with plait.Engine(str(tiny), enable_mixed_chunk=True, **kwargs) as engine:
        lengths: list[list[int]] = []
        runner = engine.scheduler.runner
        prepare = runner.prepare_extend

        def recording(items):
            lengths.append([it.length for it in items])
            return prepare(items)

        runner.prepare_extend = recording
        outs = engine.generate(input_ids=PROMPTS[:4], sampling_params=greedy(NEWS[:4]))
        assert [o["output_ids"] for o in outs] == want
        assert engine.get_server_info()["mixed_forward_passes"] > 0
    assert all(n > 0 for step in lengths for n in step), "an empty chunk was planned"
    assert max(sum(step) for step in lengths) <= 3
