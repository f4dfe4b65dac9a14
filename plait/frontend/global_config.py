"""``global_config``: SGLang's process-wide frontend settings, under SGLang's field names.

Programs written for SGLang read and set these (``sgl.global_config.default_backend``,
``global_config.verbosity = 2``), so each field here is one the interpreter or the native
backends actually consult:

- ``default_backend``: the backend of a program run without ``backend=``
  (``set_default_backend`` writes it).
- ``verbosity``: 2 or more prints each finished run's text, as SGLang does.
- ``enable_precache_with_tracing``: ``run_batch`` prefills the program's traced shared prefix
  once before fanning out; ``False`` skips that request.
- ``skip_special_tokens_in_output`` / ``spaces_between_special_tokens_in_out``: how the
  native backends (``Runtime``, ``RuntimeEndpoint``) ask the engine to detokenize a ``gen``.
- ``enable_parallel_encoding``: as in SGLang, ``join("concate_and_append")`` joins the
  branches' KV caches on backends that can (``Runtime``; see
  ``plait.frontend.parallel_encoding``); ``False``, or another backend, appends their text.
"""

from __future__ import annotations

from typing import Any


class GlobalConfig:
    """Mutable settings shared by every program in the process (one instance: below)."""

    def __init__(self) -> None:
        self.verbosity = 0
        self.default_backend: Any = None
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"GlobalConfig({fields})"


global_config = GlobalConfig()
