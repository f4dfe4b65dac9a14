"""The same programs over HTTP: ``RuntimeEndpoint`` (native ``/generate``) must match the
in-process ``Runtime`` exactly under greedy decoding; ``OpenAI`` drives the OpenAI routes.
Needs ``plait serve`` (started on a free port by the ``server_url`` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

import plait.frontend as pl

pytestmark = pytest.mark.slow


@pl.function
def mixed(s, topic):
    s += pl.system("You are terse.")
    s += pl.user("Give one word about " + topic + ".")
    s += pl.assistant(pl.gen("word", max_tokens=6))
    s += pl.user("Is that positive?")
    s += pl.assistant_begin() + pl.select("verdict", ["Yes", "No"]) + pl.assistant_end()
    forks = s.fork(2)
    forks += lambda i: pl.user(f"Variant {i}?") + pl.assistant(pl.gen("variant", max_tokens=4))
    forks.join()


def _results(state):
    assert state.error() is None, state.error()
    return state["word"], state["verdict"], state["variant"], state.text()


def test_endpoint_matches_in_process_runtime(runtime, endpoint):
    local = _results(mixed.run(topic="the sea", temperature=0, backend=runtime))
    remote = _results(mixed.run(topic="the sea", temperature=0, backend=endpoint))
    assert remote == local
    assert (endpoint.get_server_info() or {}).get("model_path")


def test_endpoint_select_logprobs_match(runtime, endpoint):
    @pl.function
    def pick(s):
        s += "The opposite of hot is" + pl.select("x", [" cold", " warm", " icy"])

    local = pick.run(backend=runtime).get_meta_info("x")["normalized_prompt_logprobs"]
    remote = pick.run(backend=endpoint).get_meta_info("x")["normalized_prompt_logprobs"]
    assert remote == pytest.approx(local, abs=1e-4)


def test_endpoint_streaming_concatenates(endpoint):
    @pl.function
    def qa(s):
        s += pl.user("Count to five.")
        s += pl.assistant(pl.gen("answer", max_tokens=10))

    state = qa.run(temperature=0, stream=True, backend=endpoint)
    chunks = list(state.text_iter("answer"))
    assert "".join(chunks) == state["answer"] and len(chunks) >= 2


def test_endpoint_errors_surface_on_state(endpoint):
    @pl.function
    def too_long(s):
        s += "x" + pl.gen("y", max_tokens=10**6)  # only the server knows the context length

    state = too_long.run(backend=endpoint)
    assert isinstance(state.error(), RuntimeError)
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        state["y"]

    @pl.function
    def bad(s):
        s += "x" + pl.gen("y", max_tokens=4, top_p=5.0)  # the core's rule, before sending

    state = bad.run(backend=endpoint)
    with pytest.raises(ValueError, match="top_p"):
        state["y"]


@pytest.fixture(scope="module")
def openai_backend(server_url, endpoint, smollm_dir):
    import requests

    models = requests.get(server_url + "/v1/models", timeout=10).json()["data"]
    return pl.OpenAI(
        models[0]["id"],
        base_url=server_url + "/v1",
        api_key="unused",
        tokenizer_path=str(smollm_dir),
    )


def test_openai_chat_gen_matches_native(openai_backend, endpoint):
    @pl.function
    def chat(s):
        s += pl.system("You are terse.")
        s += pl.user("Name a color.")
        s += pl.assistant(pl.gen("color", max_tokens=6))

    via_openai = chat.run(temperature=0, backend=openai_backend)
    native = chat.run(temperature=0, backend=endpoint)
    assert via_openai.error() is None, via_openai.error()
    assert via_openai["color"] == native["color"]
    assert via_openai.messages() == native.messages()


def test_openai_gen_outside_assistant_is_a_clear_error(openai_backend):
    @pl.function
    def raw(s):
        s += "Once upon a time" + pl.gen("story", max_tokens=4)

    with pytest.raises(ValueError, match="assistant"):
        raw.run(backend=openai_backend)["story"]


def test_openai_select_uses_prompt_logprobs(openai_backend, endpoint):
    @pl.function
    def pick(s):
        s += "The opposite of hot is" + pl.select("x", [" cold", " warm"])

    state = pick.run(backend=openai_backend)
    assert state.error() is None, state.error()
    assert state["x"] == pick.run(backend=endpoint)["x"]


def test_model_name_is_asked_of_the_engine_and_the_server(runtime, endpoint, smollm_dir):
    assert runtime.get_model_name() == endpoint.get_model_name()
    assert Path(endpoint.get_model_name()).resolve() == Path(smollm_dir).resolve()


def test_token_usage_agrees_across_native_and_openai_routes(openai_backend, endpoint):
    """The OpenAI backend counts the usage the server reports (plain, streamed, select);
    the native endpoint counts the engine's meta info. Same prompts, same numbers."""

    @pl.function
    def chat(s):
        s += pl.system("You are terse.")
        s += pl.user("Name a color.")
        s += pl.assistant(pl.gen("color", max_tokens=6))

    endpoint.reset_stats()
    chat.run(temperature=0, backend=endpoint)
    native = endpoint.token_usage
    usage = openai_backend.token_usage
    for stream in (False, True):
        usage.reset()
        state = chat.run(temperature=0, backend=openai_backend, stream=stream)
        assert state.error() is None, state.error()
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            native.prompt_tokens,
            native.completion_tokens,
        ), stream
    usage.reset()

    @pl.function
    def pick(s):
        s += "The opposite of hot is" + pl.select("x", [" cold", " warm"])

    pick.run(backend=openai_backend)
    assert usage.prompt_tokens > 2 * 5 and usage.completion_tokens == 2  # max_tokens=1 each
