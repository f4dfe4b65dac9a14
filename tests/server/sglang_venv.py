"""Virtual environments holding SGLang's real client code, kept apart from Plait's venv
(sglang's own pinned dependencies would replace Plait's torch and transformers).

The frontend (``sglang.lang``) needs no torch. ``sglang.bench_serving`` does: at import it
loads ``sglang.srt.utils``, which imports torch, torchvision and triton (and starlette, zmq,
orjson, PIL; its dataset modules import ``datasets``). PyPI's torchvision only loads with the
CUDA build of torch it was built for, so the bench venv holds that (several GB, downloaded
once: the venv is cached in /tmp).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SGLANG_VERSION = "0.5.10.post1"

# sglang's frontend imports only these; with their own deps (requests needs urllib3, ipython
# needs traitlets), but never sglang's server stack or torch.
FRONTEND_PACKAGES = ("numpy", "tqdm", "pybase64", "requests", "ipython", "pydantic", "aiohttp")
# What `python -m sglang.bench_serving` imports beyond the frontend's, found by trying (the
# tokenizer comes from transformers; torch and torchvision pinned as a matching pair).
BENCH_PACKAGES = FRONTEND_PACKAGES + (
    "transformers",
    "pillow",
    "datasets",
    "orjson",
    "psutil",
    "starlette",
    "pyzmq",
    "torch==2.14.1",
    "torchvision==0.29.1",
)


def sglang_venv(venv: Path, packages: tuple[str, ...], timeout: float = 1800) -> Path:
    """``venv`` with sglang (no deps) and ``packages``; returns its python. The ``.ready``
    stamp is written last and holds what was installed, so a venv that is half built, or was
    built with another package list, is built again."""
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    want = "\n".join((f"sglang=={SGLANG_VERSION}",) + packages)
    if ready.exists() and ready.read_text() == want:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", f"sglang=={SGLANG_VERSION}"], check=True, timeout=timeout)
    subprocess.run(pip + list(packages), check=True, timeout=timeout)
    ready.write_text(want)
    return python
