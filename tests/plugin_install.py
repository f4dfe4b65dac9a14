"""Installing an example plugin package for a test, without touching the shared venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_with_plugin(example: Path, tmp: Path) -> dict[str, str]:
    """The environment of a Python that has the package at ``example`` installed (with
    ``pip --target`` into ``tmp``, so the shared venv is untouched) and this checkout's plait
    first on the path. The build runs from a copy: an in-tree build would leave build/ and
    *.egg-info in the checkout."""
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--no-index", "--target", str(target), str(src)]  # fmt: skip
    out = subprocess.run(pip, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = [str(target), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "OMP_NUM_THREADS": "1"}  # fmt: skip
