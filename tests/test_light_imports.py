"""The CLI and HTTP process start without torch: ``plait/__init__`` resolves its public names
lazily, so parsing ``plait serve`` flags or serving HTTP in front of a scheduler process (which
alone loads the model) does not pay torch's multi-second import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize(
    "code",
    [
        "import plait",
        "import plait.server.cli as c; c.build_parser().parse_args(['serve', '--port', '1'])",
        "import plait.server.http_server",
        "import plait.frontend",
    ],
)
def test_entry_imports_stay_light(code: str) -> None:
    assert _loaded_after(code) == []


def test_public_names_still_resolve() -> None:
    code = (
        "import plait\n"
        "from plait import *\n"
        "from plait import Engine, SamplingParams, ServerArgs, gen\n"
        "assert Engine.__module__ == 'plait.core.engine'\n"
        "assert plait.gen is gen and plait.__version__\n"
        "assert set(plait.__all__) <= set(dir(plait))\n"
        "try:\n"
        "    plait.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    assert _loaded_after(code) == ["torch"]
