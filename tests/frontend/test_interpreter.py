"""The interpreter's semantics against a scripted backend: no model, runs in seconds."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import plait.frontend as pl


def test_text_and_gen_fill_state_in_order(fake):
    @pl.function
    def prog(s, name):
        s += "Hello " + name + "."
        s += " A:" + pl.gen("a", max_tokens=3) + "\n"
        s += "B:" + pl.gen("b")

    state = prog.run(name="Ann", backend=fake)
    assert state["a"] == "<0>" and state["b"] == "<1>"
    assert state.text() == "Hello Ann. A:<0>\nB:<1>"
    assert fake.prompts == ["Hello Ann. A:", "Hello Ann. A:<0>\nB:"]
    assert fake.params[0].max_new_tokens == 3
    assert fake.params[1].max_new_tokens == 128  # the run's default


def test_gen_params_override_run_defaults(fake):
    @pl.function
    def prog(s):
        s += pl.gen("x", temperature=0.5, stop="\n")

    prog.run(backend=fake, temperature=0, top_p=0.9, stop=["END"], max_new_tokens=7)
    p = fake.params[0]
    assert (p.temperature, p.top_p, p.max_new_tokens, p.stop) == (0.5, 0.9, 7, ["\n"])


def test_dtype_becomes_a_regex_and_stops(fake):
    @pl.function
    def prog(s):
        s += pl.gen_int("n") + pl.gen_string("w") + pl.gen("f", dtype=float)

    prog.run(backend=fake)
    assert fake.params[0].regex == pl.REGEX_INT and fake.params[0].stop == [" ", "\n"]
    assert fake.params[1].regex == pl.REGEX_STR
    assert fake.params[2].regex == pl.REGEX_FLOAT
    with pytest.raises(ValueError, match="dtype"):
        pl.gen("x", dtype=list)
    with pytest.raises(ValueError, match="regex"):
        pl.gen("x", regex="(unclosed")


def test_roles_use_the_chat_template_and_record_messages(fake):
    @pl.function
    def chat(s):
        s += pl.system("Be brief.")
        s += pl.user("Hi")
        s += pl.assistant(pl.gen("reply"))
        with s.user():
            s += "Again"
        s += pl.assistant_begin() + pl.gen("second") + pl.assistant_end()

    state = chat.run(backend=fake)
    assert state.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<0>"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "<1>"},
    ]
    assert state.text() == fake.chat_template.render(state.messages())
    assert fake.prompts[0].endswith("<|im_start|>assistant\n")


def test_nested_roles_are_an_error_on_the_state(fake):
    @pl.function
    def bad(s):
        s += pl.user_begin()
        s += pl.assistant("x")

    state = bad.run(backend=fake)
    assert isinstance(state.error(), ValueError)
    with pytest.raises(ValueError, match="nest"):
        state.text()


def test_program_reads_generated_values_for_control_flow(fake):
    fake.reply = lambda prompt, params: "3" if prompt.endswith("N:") else "ok"

    @pl.function
    def loop(s):
        s += "N:" + pl.gen("n")
        for i in range(int(s["n"])):
            s += f"\nstep {i}:" + pl.gen(f"step_{i}")

    state = loop.run(backend=fake)
    assert [state[f"step_{i}"] for i in range(3)] == ["ok"] * 3
    assert "step_3" not in state


def test_var_scope_captures_appended_text(fake):
    @pl.function
    def prog(s):
        s += "x="
        with s.var_scope("obj"):
            s += "{" + pl.gen("inner") + "}"

    assert prog.run(backend=fake)["obj"] == "{<0>}"


def test_select_appends_and_records_decision(fake):
    @pl.function
    def prog(s):
        s += "Pick:" + pl.select("c", ["a", "bbb", "cc"])
        s += pl.gen("x", choices=["yes", "no"])  # gen(choices=...) is select

    state = prog.run(backend=fake)
    assert state["c"] == "bbb" and state["x"] == "yes"
    assert state.text() == "Pick:bbbyes"
    assert state.get_meta_info("c")["normalized_prompt_logprobs"] == [1.0, 3.0, 2.0]


def test_fork_branches_run_concurrently_and_join_gathers_lists(make_fake):
    fake = make_fake(barrier=4)  # every gen waits until 4 are in flight together

    @pl.function
    def prog(s):
        s += "Context. "
        forks = s.fork(4)
        for i, f in enumerate(forks):
            f += f"Branch {i}:" + pl.gen("out")
        forks.join()

    state = prog.run(backend=fake)
    assert state.error() is None
    assert isinstance(state["out"], list) and len(state["out"]) == 4
    assert fake.cached == ["Context. "]  # the shared prefix was committed once, first
    assert sorted(p for p in fake.prompts) == [f"Context. Branch {i}:" for i in range(4)]
    assert state.text() == "Context. "


def test_fork_group_add_forms_and_concat_join(fake):
    @pl.function
    def prog(s):
        s += "P|"
        forks = s.fork(3)
        forks += lambda i: f"b{i}|"
        forks += ["x", "y", "z"]
        forks += "!"
        forks.join(mode="concate_and_append")
        s += "end"

    assert prog.run(backend=fake).text() == "P|b0|x!b1|y!b2|z!end"

    @pl.function
    def bad_mode(s):
        s.fork(2).join(mode="nope")

    assert "mode" in str(bad_mode.run(backend=fake).error())


def test_error_in_backend_surfaces_on_state_without_hanging(fake):
    def reply(prompt, params):
        raise RuntimeError("engine exploded")

    fake.reply = reply

    @pl.function
    def prog(s):
        s += "a" + pl.gen("x")
        s += "b" + pl.gen("y")
        s += s["x"]  # the program reads a value that will never exist

    start = time.time()
    state = prog.run(backend=fake)
    assert isinstance(state.error(), RuntimeError)
    with pytest.raises(RuntimeError, match="exploded"):
        state["y"]
    with pytest.raises(RuntimeError, match="exploded"):
        state.text()
    assert time.time() - start < 5


def test_error_in_fork_branch_propagates_through_join(fake):
    fake.reply = lambda prompt, params: 1 / 0 if "b1" in prompt else "ok"

    @pl.function
    def prog(s):
        forks = s.fork(2)
        forks += lambda i: f"b{i}" + pl.gen("g")
        forks.join()
        s += "after"

    state = prog.run(backend=fake)
    assert isinstance(state.error(), ZeroDivisionError)


def test_run_batch_keeps_order_and_isolates_errors(fake):
    fake.reply = lambda prompt, params: prompt.split("Q")[-1]

    @pl.function
    def prog(s, q):
        s += "Shared instructions, long enough to be worth caching once. " * 2
        if q == 5:  # while tracing, comparing the placeholder ends the trace here
            raise KeyError("bad question")
        s += "Q" + str(q) + pl.gen("a")

    states = prog.run_batch([{"q": i} for i in range(8)], num_threads=3, backend=fake)
    assert [s.error() is None for s in states] == [i != 5 for i in range(8)]
    assert [states[i]["a"] for i in (0, 7)] == ["0", "7"]
    with pytest.raises(KeyError):
        states[5]["a"]
    # the traced static prefix was prefilled before fanning out
    assert fake.cached == ["Shared instructions, long enough to be worth caching once. " * 2]


def test_run_batch_accepts_tuples_and_progress_bar(fake, capsys):
    @pl.function
    def prog(s, a, b="z"):
        s += a + b

    states = prog.run_batch([("x",), ("y", "w")], backend=fake, progress_bar=True)
    assert [st.text() for st in states] == ["xz", "yw"]


def test_trace_records_static_prefix_and_stops_at_dynamic_parts(fake):
    @pl.function
    def prog(s, question):
        s += pl.system("Sys")
        s += "Examples...\n"
        s += "Q: " + question + "\n"
        s += "A:" + pl.gen("answer")

    traced = prog.trace(backend=fake)
    assert traced.prefix == "<|im_start|>system\nSys<|im_end|>\nExamples...\nQ: "
    kinds = [type(n).__name__ for n in traced.nodes]
    assert kinds[-3:] == ["Constant", "Constant", "Gen"] and "Argument" in kinds

    @pl.function
    def fstring(s, question):
        s += "Static. "
        s += f"Q: {question}"

    traced = fstring.trace(backend=fake)
    assert traced.prefix == "Static. " and traced.stopped_by


def test_streaming_chunks_concatenate_to_final_value(make_fake):
    fake = make_fake(reply=lambda p, params: "abcdefghij")

    @pl.function
    def prog(s):
        s += "Q:" + pl.gen("a") + "\nR:" + pl.gen("b")

    state = prog.run(backend=fake, stream=True)
    chunks = list(state.text_iter("b"))
    assert len(chunks) > 1 and "".join(chunks) == state["b"] == "abcdefghij"
    assert "".join(prog.run(backend=fake, stream=True).text_iter()) == state.text()

    async def consume():
        st = prog.run(backend=fake, stream=True)
        return [c async for c in st.text_async_iter("a")], st

    chunks, st = asyncio.run(consume())
    assert "".join(chunks) == st["a"] == "abcdefghij"


def test_default_backend_and_missing_backend_error(fake):
    @pl.function
    def prog(s):
        s += "x" + pl.gen("y")

    pl.set_default_backend(None)
    with pytest.raises(ValueError, match="backend"):
        prog.run()
    pl.set_default_backend(fake)
    try:
        assert prog()["y"] == "<0>"  # calling the function runs it
    finally:
        pl.set_default_backend(None)


def test_bind_and_unknown_run_batch_keyword(fake):
    @pl.function
    def prog(s, a, b):
        s += a + b

    assert prog.bind(b="!").run(a="hi", backend=fake).text() == "hi!"
    with pytest.raises(ValueError, match="bind"):
        prog.bind(c=1)
    with pytest.raises(ValueError, match="unknown"):
        prog.run_batch([{"a": "x", "b": "y"}], backend=fake, colour="red")


def test_executor_threads_exit_after_run(fake):
    @pl.function
    def prog(s):
        forks = s.fork(3)
        forks += pl.gen("g")
        forks.join()

    before = threading.active_count()
    for _ in range(5):
        prog.run(backend=fake)
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
