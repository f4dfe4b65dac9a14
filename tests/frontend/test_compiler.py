"""``Function.compile()``: the graph, its scheduler and the code-movement pass.

Fake-backend tests check what is sent where; the tiny-model tests check that a compiled
program's greedy output equals the interpreted one's and that code movement raises the
prefix-cache hit rate the engine reports (``meta_info["cached_tokens"]``)."""

from __future__ import annotations

import threading
import time

import pytest

import plait.frontend as pl

EXAMPLES = "".join(f"Q: what is {i} plus {i}?\nA: {2 * i}\n\n" for i in range(12))


def length_reply(prompt: str, params) -> str:
    return f"[{len(prompt)}]"  # depends only on the prompt: order of requests is irrelevant


@pl.function
def question_first(s, question):
    s += "Question: " + question + "\n\nSolved examples:\n" + EXAMPLES
    s += "Answer:" + pl.gen("answer", max_tokens=4, stop="\n")


@pl.function
def branches(s, topic):
    s += pl.system("You are terse.")
    s += pl.user("Topic: " + topic)
    s += "Draft:" + pl.gen("draft", max_tokens=4)
    forks = s.fork(3)
    forks += lambda i: f"\nIdea {i}:" + pl.gen("idea", max_tokens=4)
    forks.join()
    s += "\nAgain: " + s["draft"] + pl.gen("final", max_tokens=4)
    with s.copy() as c:
        c += "More:" + pl.gen("more", max_tokens=3)


def test_compiled_run_sends_what_the_interpreter_sends(make_fake):
    interpreted, compiled = make_fake(length_reply), make_fake(length_reply)
    want = branches.run(topic="tides", backend=interpreted)
    got = branches.compile().run(topic="tides", backend=compiled)
    assert got.error() is None, got.error()
    assert got.text() == want.text()
    for name in ("draft", "idea", "final"):
        assert got[name] == want[name]
    assert sorted(compiled.prompts) == sorted(interpreted.prompts)


class InFlight:
    """A fake's reply that records how many gens were at the backend at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str, params) -> str:
        return "x"

    def wrap(self, backend) -> None:
        inner = backend.generate

        def generate(s, params):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.05)
            try:
                return inner(s, params)
            finally:
                with self.lock:
                    self.now -= 1

        backend.generate = generate


@pl.function
def reads_between_branches(s):
    forks = s.fork(2)
    forks[0] += "A:" + pl.gen("a", max_tokens=2)
    forks[0] += " again " + forks[0]["a"]
    forks[1] += "B:" + pl.gen("b", max_tokens=2)  # independent of a: need not wait for it
    forks.join()


def test_independent_gens_reach_the_backend_together(make_fake):
    """The interpreter's Python blocks on ``forks[0]["a"]`` before it queues branch 1's gen;
    the compiled graph queued everything up front, so ``a`` and ``b`` overlap."""
    results = {}
    for mode in ("interpreted", "compiled"):
        fake, flight = make_fake(), InFlight()
        flight.wrap(fake)
        program = reads_between_branches
        state = (
            program.compile().run(backend=fake) if mode == "compiled" else program.run(backend=fake)
        )
        assert state.error() is None
        results[mode] = flight.most
    assert results == {"interpreted": 1, "compiled": 2}


def test_code_movement_puts_the_examples_first(make_fake):
    fake = make_fake(length_reply)
    state = question_first.compile(code_movement=True).run(question="why?", backend=fake)
    assert state.error() is None
    moved = "\nSolved examples:\n" + EXAMPLES + "Question: why?\n" + "Answer:"
    assert fake.prompts == [moved]
    plain = question_first.compile().run(question="why?", backend=make_fake(length_reply))
    assert plain.text().startswith("Question: why?\n\nSolved examples:\n")


def test_code_movement_keeps_text_inside_its_role_and_before_its_gen(make_fake):
    @pl.function
    def chat(s, q):
        s += pl.system("Be brief.")
        s += pl.user("Q: " + q + "\nContext:\nthe sky is blue\n")
        s += pl.assistant("Answer " + q + ":" + pl.gen("a", max_tokens=2))

    fake = make_fake(length_reply)
    text = chat.compile(code_movement=True).run(q="sky?", backend=fake).text()
    want = chat.run(q="sky?", backend=make_fake(length_reply)).text()
    user = "Context:\nthe sky is blue\nQ: sky?\n"
    assert want.replace("Q: sky?\nContext:\nthe sky is blue\n", user) == text


def test_run_batch_prefills_the_moved_static_prefix_once(make_fake):
    fake = make_fake(length_reply)
    compiled = question_first.compile(code_movement=True)
    states = compiled.run_batch([{"question": f"q{i}"} for i in range(4)] + [("q4",)], backend=fake)
    assert all(s.error() is None for s in states) and len(fake.prompts) == 5
    assert fake.cached == ["\nSolved examples:\n" + EXAMPLES + "Question: "]
    assert all(p.startswith(fake.cached[0]) for p in fake.prompts)


def test_compile_refuses_what_cannot_be_a_graph(fake):
    @pl.function
    def fstring(s, q):
        s += f"Q: {q}" + pl.gen("a")

    @pl.function
    def reads_text(s):
        s += "x" + pl.gen("a")
        if "yes" in s.text():
            s += "y"

    with pytest.raises(ValueError, match="argument 'q' was used as a value"):
        fstring.compile()
    with pytest.raises(ValueError, match=r"s\.text\(\)"):
        reads_text.compile()
    with pytest.raises(ValueError, match="code_movement"):
        question_first.compile(code_movement="yes")
    compiled = question_first.compile()
    with pytest.raises(ValueError, match=r"missing argument\(s\) \['question'\]"):
        compiled.run(backend=fake)
    with pytest.raises(ValueError, match="not arguments"):
        compiled.run(question="a", topic="b", backend=fake)


def test_a_failed_gen_fails_the_run_without_hanging(make_fake):
    def reply(prompt, params):
        if "Draft:" in prompt and "Idea" not in prompt and "Again" not in prompt:
            raise RuntimeError("backend down")
        return "ok"

    state = branches.compile().run(topic="t", backend=make_fake(reply))
    assert isinstance(state.error(), RuntimeError)
    with pytest.raises(RuntimeError, match="backend down"):
        state["final"]


# ---- a real engine (a tiny random model with SmolLM2's tokenizer) ---------------------------
@pytest.fixture(scope="module")
def tiny_runtime(make_tiny_model):
    rt = pl.Runtime(model_path=str(make_tiny_model()), random_seed=0)
    yield rt
    rt.shutdown()


def test_compiled_greedy_output_equals_interpreted(tiny_runtime):
    batch = [{"topic": t} for t in ("tides", "owls")]
    want = branches.run_batch(batch, temperature=0, backend=tiny_runtime)
    got = branches.compile().run_batch(batch, temperature=0, backend=tiny_runtime)
    for w, g in zip(want, got):
        assert g.error() is None and w.error() is None
        assert g.text() == w.text()
        assert g["idea"] == w["idea"] and g["more"] == w["more"]


def _hit_rate(runtime, run) -> float:
    runtime.flush_cache()
    runtime.reset_stats()
    states = run()
    assert all(s.error() is None for s in states)
    stats = runtime.reset_stats()
    return stats.cached_tokens / stats.prompt_tokens


def test_code_movement_raises_the_prefix_cache_hit_rate(tiny_runtime):
    batch = [{"question": f"what is {i} times {i + 3}?"} for i in range(6)]
    interpreted = _hit_rate(
        tiny_runtime, lambda: question_first.run_batch(batch, temperature=0, backend=tiny_runtime)
    )
    moved = question_first.compile(code_movement=True)
    compiled = _hit_rate(
        tiny_runtime, lambda: moved.run_batch(batch, temperature=0, backend=tiny_runtime)
    )
    assert interpreted < 0.1, interpreted  # the question comes first: nearly nothing shared
    assert compiled > 0.7, compiled  # the examples come first: shared by every prompt
