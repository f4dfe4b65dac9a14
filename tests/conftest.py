"""Shared fixtures: the real SmolLM2 model and tiny random Llama-family checkpoints."""

from __future__ import annotations

import ctypes
import gc
import shutil
from pathlib import Path

import pytest
import torch

from tests import kernel_prebuild

_PREBUILD = pytest.StashKey["object"]()
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; absent elsewhere


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    kernel_prebuild.defer(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the lower SIMD levels the collected tests check (tests/kernel_prebuild.py)."""
    if not session.config.option.collectonly:
        session.config.stash[_PREBUILD] = kernel_prebuild.start(session.items)


@pytest.hookimpl(tryfirst=True)  # before the fixtures: their setup may wait on the build
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker(kernel_prebuild.MARKER):
        kernel_prebuild.prioritize(item.config.stash.get(_PREBUILD, None), now=True)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if item.get_closest_marker(kernel_prebuild.MARKER):
        kernel_prebuild.prioritize(item.config.stash.get(_PREBUILD, None), now=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    kernel_prebuild.stop(session.config.stash.get(_PREBUILD, None))


_RELEASE_ABOVE = 512 * 2**20  # growth that pays a full collection
# the process's RSS just after the last release: any one, and the last at a module's end
_released_at = {"test": 0, "module": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Hand freed memory back to the system after a test that grew the process. An engine
    keeps itself alive through reference cycles after ``shutdown()`` until a full collection,
    and glibc keeps what Python and torch free in its heaps: without this the pytest process
    grew test by test (9.4 GiB in a whole run; a SmolLM2 engine built twice in one process left
    2.3 GiB behind after ``gc.collect()``, 0.4 GiB after ``malloc_trim``). After the protocol,
    not in a fixture's teardown: until then the test's arguments still hold its engine."""
    yield
    _release_if_grown(module_ends=nextitem is None or nextitem.path != item.path)


def _release_if_grown(module_ends: bool) -> None:
    """A full collection costs about a second on a loaded machine, so it runs only after
    512 MiB of growth: since the last release, or at a module's end (its module fixtures
    just went) since the last release at a module's end."""
    import psutil

    process = psutil.Process()
    since = _released_at["module" if module_ends else "test"]
    if process.memory_info().rss - since <= _RELEASE_ABOVE:
        return
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    _released_at["test"] = process.memory_info().rss
    if module_ends:
        _released_at["module"] = _released_at["test"]


@pytest.fixture
def spawned_children():
    """The test's own descendant processes, live or zombie: those the pytest process already had
    when the test began (the background kernel build, a session-scoped server) are left out, so
    a "no rank left behind" check sees only what the test started."""
    import psutil

    before = {p.pid for p in psutil.Process().children()}

    def spawned() -> list[psutil.Process]:
        # a child that was there before keeps its own descendants out too (the build's
        # compilers come and go during any test)
        new = [p for p in psutil.Process().children() if p.pid not in before]
        tree = list(new)
        for child in new:
            try:
                tree += child.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return tree

    return spawned


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from plait.models.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def real_server(smollm_dir, tmp_path_factory):
    """One real ``plait serve`` of SmolLM2 on CPU for the whole run: every module that needs a
    default server (tests/server, the frontend's HTTP backends) shares it instead of each
    paying a start; a test that changes flags or stops its server starts its own."""
    from tests.server.conftest import start_server

    server = start_server(
        ["--device", "cpu", "--max-running-requests", "32"],
        tmp_path_factory.mktemp("logs") / "real.log",
        str(smollm_dir),
    )
    yield server
    server.stop()


TINY_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, smollm_dir):
    """Write a tiny random checkpoint of a model type (with SmolLM2's tokenizer) and return its
    directory; the weights are random but fixed by the seed."""
    made: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key in made:
            return made[key]
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(model_type, **{**TINY_BASE, **overrides})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
        with torch.no_grad():  # larger weights than init's 0.02 so logits are far from ties
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.15)
        path = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smollm_dir / name).exists():
                shutil.copy(smollm_dir / name, path / name)
        made[key] = path
        return path

    return make


@pytest.fixture(scope="session")
def prompt_ids(smollm_dir) -> list[list[int]]:
    """SmolLM2's token ids of the engine parity prompts (tests/core/test_engine_parity.py)."""
    from transformers import AutoTokenizer

    from tests.core.test_engine_parity import PROMPTS

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="session")
def expected(smollm_dir, prompt_ids) -> list[list[int]]:
    """transformers' greedy tokens for :func:`prompt_ids`: the oracle of every module that
    checks SmolLM2 on the parity prompts, computed once per run (about 15 s each time)."""
    from transformers import AutoModelForCausalLM

    from tests.core.test_engine_parity import NEW

    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    return hf_greedy(model, prompt_ids, NEW)


def hf_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding effects): the oracle."""
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            g = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        outs.append(g[0, len(ids) :].tolist())
    return outs
