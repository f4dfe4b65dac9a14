"""Schemathesis fuzzing of the server's own OpenAPI schema: valid-by-schema and invalid
requests to every route, a bounded number per route, and never a 5xx (or a 4xx without an
OpenAI-style error body).

Generation lengths are clamped before sending so a case costs milliseconds, not minutes of CPU
decoding; everything else (types, ranges, prompts, regexes, n, the model name) is whatever the
fuzzer makes: the schema (plait.server.openapi) states what the server accepts, so valid-by-schema
cases must mostly reach the engine, which is counted per generation route.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

_TOKEN_KEYS = (
    "max_tokens",
    "max_completion_tokens",
    "max_new_tokens",
    "min_tokens",
    "min_new_tokens",
)


def _clamp_params(d: dict[str, Any], default_key: str | None) -> None:
    for key in _TOKEN_KEYS:
        v = d.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 4:
            d[key] = 4
    if default_key and d.get(default_key) is None:
        d[default_key] = 4
    n = d.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 2:
        d["n"] = 2


def clamp(path: str, body: Any) -> None:
    """Bound the work a fuzzed case asks for (in place); invalid values are left invalid."""
    if not isinstance(body, dict):
        return
    if path == "/generate":
        sps = body.get("sampling_params")
        for sp in sps if isinstance(sps, list) else [sps]:
            if isinstance(sp, dict):
                _clamp_params(sp, "max_new_tokens")
        if sps is None and ("text" in body or "input_ids" in body):
            body["sampling_params"] = {"max_new_tokens": 4}
        for key in ("text", "input_ids"):
            if isinstance(body.get(key), list):
                body[key] = body[key][:3]
        top = body.get("top_logprobs_num")
        if isinstance(top, int) and not isinstance(top, bool) and top > 5:
            body["top_logprobs_num"] = 5
    elif path in ("/v1/completions", "/v1/chat/completions"):
        _clamp_params(body, "max_tokens" if "max_completion_tokens" not in body else None)
        if isinstance(body.get("prompt"), list):
            body["prompt"] = body["prompt"][:3]


GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


def fuzz(base_url: str, max_examples: int, positive: Counter | None = None) -> list[tuple]:
    """Fuzz every route; return the failures, and count in ``positive`` the valid-by-schema
    cases' answers by ``(path, status)``."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[tuple] = []
    positive = Counter() if positive is None else positive
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                clamp(op.path, case.body)
                resp = case.call(base_url=base_url, timeout=120)
                if mode is GenerationMode.POSITIVE:
                    positive[op.path, resp.status_code] += 1
                bad_error = 400 <= resp.status_code < 500 and "error" not in _json(resp)
                if resp.status_code >= 500 or bad_error:
                    failures.append(
                        (op.method, op.path, case.body, resp.status_code, resp.text[:500])
                    )

            try:
                run()
            except Unsatisfiable:  # no way to make e.g. a body-less GET invalid
                pass
    return failures


def _json(resp) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {}


def test_fuzzed_requests_never_get_a_5xx_fake_engine(fake_server):
    positive: Counter = Counter()
    examples = int(os.environ.get("PLAIT_FUZZ_EXAMPLES", "25"))  # per route and mode
    failures = fuzz(fake_server.url, examples, positive)
    assert not failures, failures[:5]
    assert fake_server.get("/health").status_code == 200
    # Valid-by-schema cases reach generation on every generation route (the schema's model
    # enum, prompt and unsupported-field rules); the rest are 400s for what JSON Schema cannot
    # say (1.0 as an integer, prompts over the context length). Measured: 11, 7, 23 of 25.
    for path in GENERATION_ROUTES:
        answers = {code: n for (p, code), n in positive.items() if p == path}
        print(f"{path}: valid-by-schema cases answered {answers}")
        assert positive[path, 200] >= examples // 5, (path, answers)
