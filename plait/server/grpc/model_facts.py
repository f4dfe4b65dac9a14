"""What the gateway reads about a worker's model: special token ids, architecture, and the
tokenizer files themselves (``GetTokenizer``, for a gateway started without ``--model-path``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

# The files a Hugging Face tokenizer (and its chat template) loads from; the gateway rebuilds
# the tokenizer from these.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(kw_only=True)
class ModelFacts:
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    bos_token_id: int = 0

    @property
    def probe_token(self) -> int:
        """A token every model accepts, for the health probe's one-token prompt."""
        return self.bos_token_id or (self.eos_token_ids[0] if self.eos_token_ids else 0)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def model_facts(model_path: str, tokenizer: Any) -> ModelFacts:
    """From ``config.json`` and ``generation_config.json`` when the model is a directory (a
    GGUF file has neither), else from the tokenizer. EOS ids: the generation config's list
    (chat models stop on several), then the config's, then the tokenizer's."""
    base = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    config = _read_json(os.path.join(base, "config.json"))
    gen = _read_json(os.path.join(base, "generation_config.json"))
    eos = _ids(gen.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]

    def special(name: str) -> int:
        for source in (gen, config):
            if isinstance(source.get(name), int):
                return source[name]
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        return value if isinstance(value, int) else 0

    return ModelFacts(
        model_type=str(config.get("model_type") or ""),
        architectures=[a for a in config.get("architectures") or [] if isinstance(a, str)],
        eos_token_ids=eos,
        pad_token_id=special("pad_token_id"),
        bos_token_id=special("bos_token_id"),
    )


def tokenizer_zip(model_path: str) -> tuple[bytes, str]:
    """The tokenizer files of ``model_path`` as one ZIP archive and its SHA-256 (hex).
    FileNotFoundError when the directory holds none of them."""
    base = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    buf = io.BytesIO()
    found = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in TOKENIZER_FILES:
            path = os.path.join(base, name)
            if os.path.isfile(path):
                zf.write(path, name)
                found += 1
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {base}")
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()
