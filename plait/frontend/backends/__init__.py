"""Where programs run: in-process (``Runtime``), over HTTP (``RuntimeEndpoint``, ``OpenAI``).
``base.FrontendBackend`` is what each of them implements."""

from plait.frontend.backends.base import FrontendBackend, TokenUsage
from plait.frontend.backends.crusoe import Crusoe
from plait.frontend.backends.endpoint import RuntimeEndpoint
from plait.frontend.backends.openai import OpenAI
from plait.frontend.backends.runtime import Runtime

__all__ = ["Crusoe", "FrontendBackend", "OpenAI", "Runtime", "RuntimeEndpoint", "TokenUsage"]
