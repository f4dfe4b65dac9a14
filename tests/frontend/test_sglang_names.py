"""SGLang's public names in Plait: every name of ``sglang.__all__`` is exported by ``plait``
or listed, with its reason, in docs/frontend.md; and the names SGLang programs lean on
(``global_config``, ``token_usage``, ``get_model_name``, ``run_batch(generator_style=True)``,
``separate_reasoning``, ``__version__``) do what SGLang's do. Fast: fake backends only."""

from __future__ import annotations

import importlib.metadata
import re
import threading
import types
from pathlib import Path
from typing import Any

import pytest

import plait
import plait.frontend as pl
from plait.frontend.backends import endpoint as endpoint_mod
from plait.frontend.backends.native import NativeBackend
from plait.frontend.chat_template import chatml

REPO = Path(__file__).resolve().parents[2]


def _sglang_all() -> list[str]:
    lines = (Path(__file__).with_name("sglang_all.txt")).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _documented_left_out() -> dict[str, str]:
    """The table under docs/frontend.md's "Names left out" heading: name -> reason."""
    text = (REPO / "docs" / "frontend.md").read_text()
    section = text.split("## Names left out", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, flags=re.M))


def test_every_sglang_name_is_exported_or_documented_as_left_out():
    names, left_out = _sglang_all(), _documented_left_out()
    assert len(names) == 34 and "separate_reasoning" in names  # the 0.5.23 list, whole
    missing = [n for n in names if n not in plait.__all__ and n not in left_out]
    assert missing == []
    assert [n for n in left_out if n in plait.__all__] == []  # documented as left out: is
    assert [n for n in left_out if n not in names] == []  # no stale entries
    assert all(len(reason) > 20 for reason in left_out.values())
    for n in names:
        if n in plait.__all__:
            assert getattr(plait, n) is not None, n


def test_version_is_the_installed_distribution():
    assert plait.__version__ == importlib.metadata.version("plait")


def test_engine_and_server_args_are_plaits_own():
    from plait.core.engine import Engine
    from plait.server.server_args import ServerArgs

    assert plait.Engine is Engine and plait.ServerArgs is ServerArgs
    assert plait.ServerArgs(model_path="m").engine_kwargs("m")["model_path"] == "m"


# ---- global_config -----------------------------------------------------------------------
def test_global_config_has_sglangs_fields_and_defaults():
    cfg = plait.global_config
    assert cfg is pl.global_config
    assert (
        cfg.verbosity,
        cfg.skip_special_tokens_in_output,
        cfg.spaces_between_special_tokens_in_out,
        cfg.enable_precache_with_tracing,
        cfg.enable_parallel_encoding,
    ) == (0, True, True, True, True)


@pytest.fixture
def restore_config():
    cfg = pl.global_config
    saved = dict(vars(cfg))
    yield cfg
    vars(cfg).update(saved)


def test_default_backend_lives_in_global_config(fake, restore_config):
    @pl.function
    def hello(s):
        s += "Hi" + pl.gen("x")

    pl.set_default_backend(fake)
    assert restore_config.default_backend is fake
    restore_config.default_backend = None  # SGLang programs also assign it directly
    with pytest.raises(ValueError, match="backend"):
        hello.run()
    restore_config.default_backend = fake
    assert hello.run()["x"] == "<0>"


def test_verbosity_two_prints_each_finished_run(fake, restore_config, capsys):
    @pl.function
    def hello(s):
        s += "Hello there" + pl.gen("x")

    hello.run(backend=fake)
    assert "Hello there" not in capsys.readouterr().out
    restore_config.verbosity = 2
    hello.run(backend=fake)
    assert "Hello there<1>" in capsys.readouterr().out


def test_precache_with_tracing_can_be_turned_off(make_fake, restore_config):
    @pl.function
    def shared(s, q):
        s += "A long shared instruction that every instance begins with, verbatim. " * 2
        s += q + pl.gen("a")

    on = make_fake()
    shared.run_batch([{"q": "1"}, {"q": "2"}], backend=on)
    assert len(on.cached) == 1 and on.cached[0].startswith("A long shared")
    restore_config.enable_precache_with_tracing = False
    off = make_fake()
    shared.run_batch([{"q": "1"}, {"q": "2"}], backend=off)
    assert off.cached == []


class RecordingNative(NativeBackend):
    """A native backend whose 'engine' answers each request with fixed token counts."""

    def __init__(self) -> None:
        super().__init__()
        self.chat_template = chatml()
        self.sent: list[Any] = []

    def _call(self, msgs):
        self.sent.extend(msgs)
        return [
            {
                "text": "ok",
                "meta_info": {"prompt_tokens": 7, "completion_tokens": 2, "cached_tokens": 3},
            }
            for _ in msgs
        ]


def test_detokenize_options_follow_global_config(restore_config):
    @pl.function
    def hello(s):
        s += "Hi" + pl.gen("x", max_tokens=2)

    backend = RecordingNative()
    hello.run(backend=backend)
    restore_config.skip_special_tokens_in_output = False
    restore_config.spaces_between_special_tokens_in_out = False
    hello.run(backend=backend)
    first, second = (m.sampling_params for m in backend.sent)
    assert (first.skip_special_tokens, first.spaces_between_special_tokens) == (True, True)
    assert (second.skip_special_tokens, second.spaces_between_special_tokens) == (False, False)


# ---- token_usage and get_model_name --------------------------------------------------------
def test_token_usage_counts_what_the_engine_reported_and_survives_reset():
    @pl.function
    def two(s):
        s += "Hi" + pl.gen("x", max_tokens=2) + pl.gen("y", max_tokens=2)

    backend = RecordingNative()
    usage = backend.token_usage
    two.run(backend=backend)
    assert (usage.prompt_tokens, usage.completion_tokens) == (14, 4)
    usage.reset()
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)
    two.run(backend=backend)
    assert backend.token_usage is usage and usage.prompt_tokens == 14
    old = backend.reset_stats()
    assert (old.prompt_tokens, old.cached_tokens, old.requests) == (14, 6, 2)
    assert backend.token_usage is usage and usage.prompt_tokens == 0


def test_endpoint_get_model_name_asks_the_server(monkeypatch):
    answers = iter([{"model_path": "/models/first"}, {"model_path": "/models/second"}])
    asked: list[str] = []

    def get(url, api_key=None, timeout=30):
        asked.append(url)
        return next(answers)

    monkeypatch.setattr(endpoint_mod.http, "get", get)
    ep = pl.RuntimeEndpoint("http://127.0.0.1:9")  # __init__ asks once
    assert ep.get_model_name() == "/models/second"  # and get_model_name asks again
    assert asked == ["http://127.0.0.1:9/get_model_info"] * 2
    assert ep.endpoint.get_model_name is not None  # SGLang programs go through .endpoint


def test_openai_backends_name_their_model_and_crusoe_needs_a_key(monkeypatch):
    oa = pl.OpenAI("some-model", base_url="http://127.0.0.1:9/v1", api_key="k")
    assert oa.get_model_name() == "some-model"
    assert (oa.token_usage.prompt_tokens, oa.token_usage.completion_tokens) == (0, 0)
    monkeypatch.delenv("CRUSOE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="CRUSOE_API_KEY"):
        pl.Crusoe("meta-llama/Llama-3.1-8B-Instruct")
    monkeypatch.setenv("CRUSOE_API_KEY", "secret")
    crusoe = pl.Crusoe("meta-llama/Llama-3.1-8B-Instruct")
    assert crusoe.base_url == "https://managed-inference-api-proxy.crusoecloud.com/v1"
    assert crusoe.api_key == "secret" and isinstance(crusoe, pl.OpenAI)


# ---- run_batch(generator_style=True) -------------------------------------------------------
def test_generator_style_yields_each_state_before_the_batch_finishes(make_fake):
    """The last program cannot finish until the caller has received the first state: a
    run_batch that returns only when all are done would wait 10 s and fail."""
    first_seen = threading.Event()

    @pl.function
    def job(s, name):
        # waits in the program's own thread, never inside the backend's lock
        if name == "last" and not first_seen.wait(10):
            raise TimeoutError("the first state was not yielded before the batch finished")
        s += name + ":" + pl.gen("out")

    backend = make_fake(lambda prompt, params: "done")
    states = job.run_batch(
        [{"name": "first"}, {"name": "mid"}, {"name": "last"}],
        backend=backend,
        num_threads=3,
        generator_style=True,
    )
    assert isinstance(states, types.GeneratorType)
    first = next(states)
    assert first.text() == "first:done"
    first_seen.set()
    rest = list(states)
    assert [s.text() for s in rest] == ["mid:done", "last:done"]  # input order, as SGLang


def test_generator_style_keeps_errors_on_their_states(make_fake):
    @pl.function
    def job(s, n):
        s += str(n) + pl.gen("out")
        if n == 1:
            raise RuntimeError("program 1 failed")

    states = list(
        job.run_batch([(0,), (1,), (2,)], backend=make_fake(), generator_style=True, num_threads=1)
    )
    assert [s.error() is None for s in states] == [True, False, True]


# ---- separate_reasoning --------------------------------------------------------------------
def _answering(reply_text: str):
    @pl.function
    def ask(s):
        s += pl.user("Why?")
        s += pl.assistant(pl.separate_reasoning(pl.gen("answer"), model_type="qwen3"))
        s += "Then: " + pl.gen("next")

    return ask, lambda prompt, params: reply_text if prompt.endswith("assistant\n") else "!"


def test_separate_reasoning_splits_variable_text_and_message(make_fake):
    ask, reply = _answering("<think>Because of physics.</think>It is blue.")
    backend = make_fake(reply)
    state = ask.run(backend=backend)
    assert state["answer"] == "It is blue."
    assert state["answer_reasoning_content"] == "Because of physics."
    assert "physics" not in state.text() and "It is blue." in state.text()
    assert state.messages()[-1] == {"role": "assistant", "content": "It is blue."}
    assert "physics" not in backend.prompts[-1]  # the next gen saw only the answer


def test_separate_reasoning_without_reasoning_keeps_the_text(make_fake):
    ask, reply = _answering("Just blue.")
    state = ask.run(backend=make_fake(reply))
    assert (state["answer"], state["answer_reasoning_content"]) == ("Just blue.", "")


@pytest.mark.parametrize(
    "model_type,text,expected",
    [
        ("deepseek-r1", "thinking...</think>42", ("thinking...", "42")),  # no start tag: forced
        ("qwen3", "thinking...</think>42", ("", "thinking...</think>42")),  # not forced
        ("qwen3", "<think>cut short by max_tokens", ("cut short by max_tokens", "")),
        ("qwen3", "<think>plan<tool_call>{}", ("plan", "<tool_call>{}")),
        ("KIMI", "\u25c1think\u25b7hm\u25c1/think\u25b7ok", ("hm", "ok")),
    ],
)
def test_reasoning_formats(model_type, text, expected):
    from plait.frontend.reasoning import split_reasoning

    assert split_reasoning(text, model_type) == expected


def test_separate_reasoning_bad_input_is_refused(make_fake):
    with pytest.raises(ValueError, match="model_type"):
        pl.separate_reasoning(pl.gen("a"), model_type="no-such-model")
    with pytest.raises(ValueError, match="name"):
        pl.separate_reasoning(pl.gen(), model_type="qwen3")

    @pl.function
    def streamed(s):
        s += "Q" + pl.separate_reasoning(pl.gen("a"), model_type="qwen3")

    state = streamed.run(backend=make_fake(), stream=True)
    with pytest.raises(ValueError, match="stream"):
        state["a"]


def test_separate_reasoning_of_several_gens_keeps_the_text_between(make_fake):
    replies = iter(["<think>r1</think>A1", "<think>r2</think>A2"])

    @pl.function
    def two(s):
        s += pl.separate_reasoning(
            "x=" + pl.gen("a") + ", y=" + pl.gen("b"), model_type="deepseek-r1"
        )

    state = two.run(backend=make_fake(lambda p, params: next(replies)))
    assert state.text() == "x=A1, y=A2"
    assert (state["a_reasoning_content"], state["b_reasoning_content"]) == ("r1", "r2")


# ---- @function(num_api_spec_tokens=N) ------------------------------------------------------
def _character(spec: int | None):
    @pl.function(num_api_spec_tokens=spec)
    def character(s):
        s += "Name: Steve Jobs.\nJob: Apple CEO.\n\nName:" + pl.gen("name", stop="\n")
        s += "\nJob:" + pl.gen("job", stop="\n") + "\n"

    return character


def test_speculation_serves_several_gens_from_one_request(make_fake):
    backend = make_fake(lambda prompt, params: " Ada Lovelace.\nJob: Analyst.\nName: x")
    state = _character(64).run(backend=backend, max_new_tokens=16)
    assert (state["name"], state["job"]) == (" Ada Lovelace.", " Analyst.")
    assert len(backend.prompts) == 1  # without speculation: one request per gen
    (params,) = backend.params
    assert params.stop == [] and params.max_new_tokens == 64  # stops lifted, N tokens asked
    assert state.text().endswith("Name: Ada Lovelace.\nJob: Analyst.\n")


def test_speculation_is_dropped_when_the_program_appends_something_else(make_fake):
    replies = iter([" Ada.\nRole: Analyst.", " Analyst."])
    backend = make_fake(lambda prompt, params: next(replies))
    state = _character(64).run(backend=backend)
    assert (state["name"], state["job"]) == (" Ada.", " Analyst.")
    assert len(backend.prompts) == 2 and backend.prompts[1].endswith("Ada.\nJob:")


def test_speculation_refuses_what_it_cannot_serve(make_fake):
    with pytest.raises(ValueError, match="num_api_spec_tokens"):
        pl.function(num_api_spec_tokens=0)

    @pl.function(num_api_spec_tokens=32)
    def constrained(s):
        s += "n=" + pl.gen("n", dtype=int)

    with pytest.raises(ValueError, match="regex"):
        constrained.run(backend=make_fake())["n"]
    chat = make_fake()
    chat.is_chat_model = True
    with pytest.raises(ValueError, match="chat model"):
        _character(32).run(backend=chat)["name"]
    with pytest.raises(ValueError, match="stream"):
        _character(32).run(backend=make_fake(), stream=True)["name"]
