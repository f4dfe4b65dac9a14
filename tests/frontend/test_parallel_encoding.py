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
    s += "Summary:" + pl.gen("summary", max_tokens=3, ignore_eos=True)


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
