"""What SGLang's ``sglang/test/test_programs.py`` imports from SGLang besides its frontend:
test utilities from ``sglang.utils`` and ``sglang.srt.utils``, which would pull in SGLang's
server stack. ``test_sglang_test_programs.py`` points those imports here; each helper does
what SGLang's does, with the libraries Plait already has."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Iterator


def is_hip() -> bool:
    """Whether torch was built for ROCm (SGLang's ``sglang.srt.utils.is_hip``)."""
    import torch

    return torch.version.hip is not None


def get_tokenizer(path: str) -> Any:
    """The model's Hugging Face tokenizer (``sglang.srt.utils.hf_transformers_utils``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def download_and_cache_file(url: str, filename: str | None = None) -> str:
    """Download ``url`` once into the temp directory and return the local path."""
    import requests

    if filename is None:
        name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1]
        filename = os.path.join(tempfile.gettempdir(), name)
    if not os.path.exists(filename):
        res = requests.get(url, timeout=60)
        res.raise_for_status()
        with open(filename + ".part", "wb") as f:
            f.write(res.content)
        os.replace(filename + ".part", filename)
    return filename


def read_jsonl(filename: str) -> Iterator[Any]:
    """One JSON value per non-empty line."""
    with open(filename) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
