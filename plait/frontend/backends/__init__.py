"""Where programs run: in-process (``Runtime``), over HTTP (``RuntimeEndpoint``, ``OpenAI``)."""
from plait.frontend.backends.endpoint import RuntimeEndpoint
from plait.frontend.backends.openai import OpenAI
from plait.frontend.backends.runtime import Runtime

__all__ = ["OpenAI", "Runtime", "RuntimeEndpoint"]
