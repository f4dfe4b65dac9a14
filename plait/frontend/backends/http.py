"""The few HTTP calls the remote backends make (``requests``, one session per thread)."""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator

import requests

_local = threading.local()


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class HTTPStatusError(RuntimeError):
    """A non-200 answer; ``status`` lets callers tell a refused body shape (422) from the
    server's own 4xx/5xx."""

    def __init__(self, status: int, url: str, body: Any):
        super().__init__(f"HTTP {status} from {url}: {body}")
        self.status = status


def _check(res: requests.Response) -> None:
    if res.status_code != 200:
        try:
            body: Any = res.json()
        except ValueError:
            body = res.text
        raise HTTPStatusError(res.status_code, res.url, body)


def get(url: str, api_key: str | None = None, timeout: float = 30) -> Any:
    res = _session().get(url, headers=_headers(api_key), timeout=timeout)
    _check(res)
    return res.json()


def post(
    url: str, body: dict[str, Any], api_key: str | None = None, timeout: float | None = 3600
) -> Any:
    res = _session().post(url, json=body, headers=_headers(api_key), timeout=timeout)
    _check(res)
    try:
        return res.json()
    except ValueError:  # some admin routes answer in plain text
        return res.text


def post_sse(
    url: str, body: dict[str, Any], api_key: str | None = None, timeout: float | None = 3600
) -> Iterator[dict[str, Any]]:
    """POST and yield each ``data: {json}`` event until ``data: [DONE]``."""
    with _session().post(
        url, json=body, headers=_headers(api_key), stream=True, timeout=timeout
    ) as res:
        _check(res)
        for line in res.iter_lines(decode_unicode=False):
            line = line.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if (
                isinstance(event, dict)
                and "error" in event
                and "text" not in event
                and "choices" not in event
            ):
                raise RuntimeError(f"stream error from {url}: {event['error']}")
            yield event
