"""``join(mode="concate_and_append")`` over KV (SGLang's parallel encoding): the branches'
segments are appended to the parent by reusing their KV, not by prefilling their text."""

from __future__ import annotations

import pytest

import plait.frontend as pl
from plait.frontend.global_config import global_config

CONTEXT = "".join(f"Fact {i}: {i} is {'even' if i % 2 == 0 else 'odd'}.\n" for i in range(16))


@pl.function
def parallel(s):
    s += CONTEXT
    forks = s.fork(3)
    forks += lambda i: f"Part {i}:" + pl.gen("part", max_tokens=6, ignore_eos=True) + "\n"
    forks.join(mode="concate_and_append")
    s += "Summary:" + pl.gen("summary", max_tokens=3, ignore_eos=True, return_logprob=True)


@pytest.fixture
def encoding():
    """Set ``enable_parallel_encoding`` for one test; restored after."""
    saved = global_config.enable_parallel_encoding
    yield lambda on: setattr(global_config, "enable_parallel_encoding", on)
    global_config.enable_parallel_encoding = saved


@pytest.fixture(scope="module")
def tiny_runtime(make_tiny_model):
    rt = pl.Runtime(model_path=str(make_tiny_model()), random_seed=0)
    yield rt
    rt.shutdown()


def _run(runtime):
    assert runtime.flush_cache()
    state = parallel.run(temperature=0, backend=runtime)
    assert state.error() is None, state.error()
    meta = state.get_meta_info("summary")
    return state.text(), meta["prompt_tokens"] - meta["cached_tokens"]


def test_joined_segments_are_not_prefilled_again(tiny_runtime, encoding):
    encoding(False)
    text_mode, computed_text = _run(tiny_runtime)
    encoding(True)
    assert tiny_runtime.support_concate_and_append
    kv_mode, computed_kv = _run(tiny_runtime)
    before_summary = text_mode[: text_mode.rindex("Summary:")]
    assert kv_mode.startswith(before_summary)  # the same branches, in the same order
    tail = len(tiny_runtime.encode_tail("Summary:"))
    segments = before_summary[len(CONTEXT) :].split("\n")[:3]
    later = sum(len(tiny_runtime.encode_tail(seg + "\n")) for seg in segments[1:])
    assert computed_kv == tail  # only the text after the join
    assert computed_text >= tail + later - 2  # branches 2 and 3 prefilled again


def test_the_parent_must_not_grow_between_fork_and_join(make_fake, encoding):
    class Joining(make_fake):  # type: ignore[misc, valid-type]
        support_concate_and_append = True

        def concatenate_and_append(self, s, branches):
            raise AssertionError("must not be reached")

    @pl.function
    def grows(s):
        s += "ctx "
        forks = s.fork(2)
        forks += pl.gen("x", max_tokens=2)
        s += "more"
        forks.join(mode="concate_and_append")

    encoding(True)
    state = grows.run(backend=Joining())
    assert "changed after the fork" in str(state.error())
    encoding(False)  # the text path has no such constraint
    assert grows.run(backend=Joining()).error() is None


def test_joined_kv_is_parallel_encoding_by_the_transformers_oracle(make_tiny_model, encoding):
    """The parent's tokens after the join equal transformers' greedy tokens on the joined
    sequence with each segment at its branch's positions, attending to the prefix and itself
    only, and the tail after all of them (float32, docs/frontend.md's positions)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_model()
    encoding(True)
    rt = pl.Runtime(model_path=str(path), random_seed=0, dtype="float32")
    try:
        state = parallel.run(temperature=0, backend=rt)
        assert state.error() is None, state.error()
        joined = state.stream_executor.kv_ids
        text = state.text()
        prefix = rt.tokenizer.encode(CONTEXT)
        segments = text[len(CONTEXT) : text.rindex("Summary:")].split("\n")[:3]
        branches = [rt.tokenizer.encode(CONTEXT + seg + "\n") for seg in segments]
        assert joined == prefix + [t for b in branches for t in b[len(prefix) :]]
        tail = rt.encode_tail("Summary:")
        summary = [e[1] for e in state.get_meta_info("summary")["output_token_logprobs"]]
    finally:
        rt.shutdown()
    p, lens = len(prefix), [len(b) - len(prefix) for b in branches]
    ids, positions, groups = list(prefix), list(range(p)), [0] * p  # group 0: the prefix
    for i, (b, n) in enumerate(zip(branches, lens), start=1):
        ids += b[p:]
        positions += range(p, p + n)
        groups += [i] * n
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    after = p + sum(lens)
    want = []
    seq = ids + tail
    for _ in range(3):
        n_tail = len(seq) - len(ids)
        pos = positions + list(range(after, after + n_tail))
        grp = groups + [-1] * n_tail  # -1: after the join, sees everything before it
        allowed = torch.zeros(len(seq), len(seq), dtype=torch.bool)
        for q in range(len(seq)):
            for k in range(q + 1):
                allowed[q, k] = grp[q] == -1 or grp[k] in (0, grp[q])
        mask = torch.zeros(1, 1, len(seq), len(seq))
        mask[0, 0][~allowed] = torch.finfo(torch.float32).min
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([seq]), attention_mask=mask, position_ids=torch.tensor([pos])
            ).logits
        token = int(logits[0, -1].argmax())
        want.append(token)
        seq = seq + [token]
    assert summary == want
