"""SGLang's own program tests (``sglang/test/test_programs.py``) pass on Plait's frontend
with only their imports changed.

The file is not copied here: it is read at test time from the sglang wheel installed in the
venv that ``tests/server/test_server_real.py`` builds (``sglang==SGLANG_VERSION``, no deps),
its ``sglang`` imports are rewritten (the frontend to ``plait``, SGLang's test utilities to
``sglang_test_helpers``), and the functions run against SmolLM2 in an in-process
``Runtime``, the default backend. Every function is either run or excluded below with the
reason; the ones excluded assert what only a capable model (or the internet) can give.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import plait
from tests.server.test_server_real import SGLANG_VERSION, sglang_python  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

# Functions run, with the arguments that turn off their model-quality checks.
CHOSEN = {
    "test_mt_bench": {},
    "test_select": {"check_answer": False},
    "test_decode_json_regex": {},
    "test_decode_json": {},
    "test_expert_answer": {"check_answer": False},
    "test_parallel_decoding": {},
    "test_parallel_encoding": {"check_answer": False},
    "test_stream": {},
    "test_regex": {},
    "test_dtype_gen": {},
    "test_chat_completion_speculative": {},
    "test_gen_min_new_tokens": {},
}
EXCLUDED = {
    "test_few_shot_qa": "asserts the answers Washington, Tokyo, London and Beijing",
    "test_decode_int": "asserts the model knows a day has 24 hours and a year 365 days",
    "test_tool_use": "asserts the model writes 257*983 as the calculator's expression",
    "test_react": "asserts the model picks Finish and names Finland or the United States",
    "test_image_qa": "needs a vision model and example_image.png (sgl.image is left out)",
    "test_completion_speculative": "asserts API speculative execution saved prompt tokens, "
    "which holds only when the model (sampling at temperature "
    "1) keeps the few-shot Name/Birthday/Job format: SmolLM2 "
    "did in 4 of 6 runs",
    "test_hellaswag_select": "downloads HellaSwag from GitHub (no internet here) and wants "
    "two 200-question runs within 1 s of each other",
}

# SGLang import -> what the rewritten file imports instead.
IMPORTS = {
    "import sglang as sgl": "import plait as sgl",
    "from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR": "from plait.frontend.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR",
    "from sglang.srt.utils import is_hip": "from tests.frontend.sglang_test_helpers import is_hip",
    "from sglang.utils import download_and_cache_file, read_jsonl": "from tests.frontend.sglang_test_helpers import download_and_cache_file, read_jsonl",
    "from sglang.srt.utils.hf_transformers_utils import get_tokenizer": "from tests.frontend.sglang_test_helpers import get_tokenizer",
}


def rewrite_imports(source: str) -> str:
    """Change each line that imports from ``sglang``, and nothing else; an import this table
    does not know (a newer sglang) fails here rather than importing the real package."""

    def swap(match: re.Match) -> str:
        indent, statement = match.group(1), match.group(2).strip()
        if statement not in IMPORTS:
            raise AssertionError(f"unknown sglang import in test_programs.py: {statement}")
        return indent + IMPORTS[statement]

    return re.sub(r"^([ \t]*)((?:import|from)[ \t]+sglang\b.*)$", swap, source, flags=re.M)


@pytest.fixture(scope="module")
def sglang_test_programs(sglang_python) -> Path:  # noqa: F811 - the fixture imported above
    venv = Path(sglang_python).parent.parent
    found = sorted(venv.glob("lib/python*/site-packages/sglang/test/test_programs.py"))
    assert found, f"sglang=={SGLANG_VERSION} in {venv} has no sglang/test/test_programs.py"
    return found[0]


@pytest.fixture(scope="module")
def programs(sglang_test_programs, runtime):
    source = rewrite_imports(sglang_test_programs.read_text())
    assert not re.search(r"^\s*(import|from)\s+sglang\b", source, flags=re.M)
    module = types.ModuleType("sglang_test_programs_on_plait")
    module.__file__ = str(sglang_test_programs)
    exec(compile(source, str(sglang_test_programs), "exec"), module.__dict__)
    plait.set_default_backend(runtime)
    yield module
    plait.set_default_backend(None)


def test_every_function_is_run_or_excluded_with_a_reason(programs):
    functions = {n for n in vars(programs) if n.startswith("test_")}
    assert not set(CHOSEN) & set(EXCLUDED)
    assert functions == set(CHOSEN) | set(EXCLUDED)


@pytest.mark.parametrize("name", sorted(CHOSEN))
def test_sglang_program(programs, name):
    getattr(programs, name)(**CHOSEN[name])
