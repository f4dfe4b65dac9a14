"""A third-party backend installed with pip is found through its entry point, chosen with
``--device`` and serves generation, exactly like a built-in one.

The example is pip-installed into a temporary ``--target`` directory that the subprocesses put
on ``PYTHONPATH`` (entry points are read from its ``*.dist-info``), so the shared environment
is never modified.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.testing import make_tiny_llama
from tests.plugin_install import env_with_plugin

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugin_example"


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a Python that has ``plait-toy-backend`` installed (and this
    checkout's plait first on the path)."""
    return env_with_plugin(EXAMPLE, tmp_path_factory.mktemp("toy"))


def _python(code: str, env: dict[str, str], cwd: Path | None = None) -> str:
    # A fresh interpreter: entry points are read once per process.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_without_the_install_there_is_no_toy_device():
    out = _python(
        "from plait.backends import registry; print(sorted(registry.available_backends()))",
        {**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "'toy'" not in out  # so the tests below see the install, not something else


def test_installed_plugin_is_discovered_through_its_entry_point(toy_env):
    out = _python(
        "from plait.backends import registry; print(registry.describe_backends()); "
        "print(type(registry.get_backend('toy')).__module__, "
        "registry.resolve_device('auto'))",
        toy_env,
    )
    assert "toy      available" in out
    # The class came from the installed copy; auto never picks the toy (priority -10).
    assert out.strip().endswith("plait_toy.plugin cpu")


def test_device_flag_selects_the_installed_toy_and_it_generates(toy_env, tmp_path):
    model = make_tiny_llama(tmp_path / "tiny")
    code = (
        "import sys\n"
        "from plait.server.cli import main\n"
        f"rc = main(['generate', 'Hi', '--device', 'toy', '--model-path', {str(model)!r},\n"
        "           '--max-new-tokens', '4', '--max-total-tokens', '512'])\n"
        "from plait_toy.attention import CALLS\n"
        "print('CALLS', CALLS['extend'], CALLS['decode'], 'RC', rc)\n"
    )
    out = _python(code, toy_env, cwd=tmp_path)
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "CALLS" and last[-2:] == ["RC", "0"], out
    extend, decode = int(last[1]), int(last[2])
    assert extend > 0 and decode > 0, f"the toy attention never ran: {out}"


def test_the_examples_own_tests_pass_against_the_install(toy_env, tmp_path):
    # The conformance kit on the toy device, and the example's Engine test.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(EXAMPLE / "tests"),
            "--basetemp",
            str(tmp_path / "base"),
            "-k",
            "engine or greedy",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=toy_env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "failed" not in out.stdout and " passed" in out.stdout
