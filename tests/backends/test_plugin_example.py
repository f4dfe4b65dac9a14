"""A third-party backend installed with pip is found through its entry point and serves
plait.Engine(device="toy"), exactly like a built-in one."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin_example"
DIST = "plait-toy-backend"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def toy_installed():
    """pip-install the example into this interpreter's environment for the module's tests; take
    it out again afterwards unless it was there already."""
    was_installed = _installed()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "-e", str(EXAMPLE)]
    subprocess.run(pip, check=True, capture_output=True, text=True)
    yield
    if not was_installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", DIST],
                       check=True, capture_output=True)


def _python(code: str) -> str:
    # A fresh interpreter: entry points are read once per process.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_installed_plugin_is_discovered_through_its_entry_point(toy_installed):
    out = _python("from plait.backends import registry; print(registry.describe_backends()); "
                  "print(registry.resolve_device('toy'), registry.resolve_device('auto'))")
    assert "toy      available" in out
    assert out.strip().endswith("toy cpu")  # auto never picks the toy (priority -10)


def test_engine_runs_on_the_installed_toy_device(toy_installed, tmp_path):
    # The example's own Engine test: generation on device="toy" that checks the toy attention
    # really ran. (Its kit checks wrap the CPU reference, which test_kit.py already certifies.)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(EXAMPLE), str(EXAMPLE / "tests"), "--basetemp", str(tmp_path),
         "-k", "engine"],
        capture_output=True, text=True, cwd=EXAMPLE)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "failed" not in out.stdout and " passed" in out.stdout
