"""``Crusoe``: programs run against Crusoe's managed inference, an OpenAI-compatible API.

It is the ``OpenAI`` backend with Crusoe's endpoint and key variable as defaults (as in
SGLang): ``Crusoe("meta-llama/Llama-3.1-8B-Instruct")`` reads ``CRUSOE_API_KEY``.
"""

from __future__ import annotations

import os
from typing import Any

from plait.frontend.backends.openai import OpenAI

CRUSOE_BASE_URL = "https://managed-inference-api-proxy.crusoecloud.com/v1/"


class Crusoe(OpenAI):
    def __init__(
        self,
        model_name: str,
        api_key: str | None = None,
        base_url: str | None = None,
        **kwargs: Any,
    ):
        key = api_key or os.environ.get("CRUSOE_API_KEY")
        if not key:
            raise ValueError("api_key: Crusoe needs a key; pass api_key= or set CRUSOE_API_KEY")
        super().__init__(model_name, base_url=base_url or CRUSOE_BASE_URL, api_key=key, **kwargs)
