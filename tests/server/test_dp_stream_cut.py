"""With ``--dp``, a stream cut by its worker's death ends at the client with an error event and
``[DONE]``, on every streaming route, through the real gateway (smg 1.13, the default).

smg reads the worker's SSE body itself; when the body breaks mid-stream (the worker killed
with SIGKILL), it sends ``data: {"error": {"message": "Stream error: ..."}}`` and then
``data: [DONE]`` and ends the response cleanly (measured in this test; docs/reliability.md).
Streams on the surviving worker finish normally. Fake engines, one launch.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.server.conftest import FAKE, start_server
from tests.server.test_data_parallel import child_pids
from tests.server.test_chaos import wait_for_workers

pytestmark = pytest.mark.slow


def bodies(model: str) -> list[tuple[str, dict]]:
    text = "a stream cut in the middle " * 6
    return [
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}]}),
        ("/v1/completions", {"model": model, "prompt": text}),
        ("/generate", {"text": text, "sampling_params": {"max_new_tokens": 150}}),
    ]


def test_a_stream_cut_by_a_workers_death_ends_with_an_error_event_and_done(
    tiny_model_dir, tmp_path
):
    server = start_server(
        [*FAKE, "--dp", "2", "--router-policy", "round_robin"],
        tmp_path / "dp.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.1"},
        timeout=600,
    )
    try:
        wait_for_workers(server, 2)  # smg answers before it lists its workers
        model = tiny_model_dir.name  # the served model id
        workers = {
            f"http://127.0.0.1:{cmd[cmd.index(b'--port') + 1].decode()}": pid
            for pid in child_pids(server.proc.pid)
            if b"plait.server.cli"
            in (cmd := Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
        }
        # Two streams per route: round robin puts one of each on each worker.
        opened = []
        for path, body in bodies(model):
            for _ in range(2):
                extra = {"stream": True} | ({} if path == "/generate" else {"max_tokens": 150})
                r = requests.post(server.url + path, json=body | extra, stream=True, timeout=120)
                assert r.status_code == 200, r.text
                lines = r.iter_lines()
                first = next(ln for ln in lines if ln)  # generation has started
                opened.append((path, r.headers["x-smg-routed-worker-id"], r, lines, [first]))
        victim = opened[0][1]
        os.kill(workers[victim], signal.SIGKILL)

        def rest(item) -> list[bytes]:
            _, _, resp, lines, got = item
            with resp:
                return got + [ln for ln in lines if ln]

        with ThreadPoolExecutor(len(opened)) as pool:
            ends = list(pool.map(rest, opened))
        cut = {path for path, url, *_ in opened if url == victim}
        assert cut == {"/v1/chat/completions", "/v1/completions", "/generate"}, opened
        for (path, url, *_), events in zip(opened, ends):
            assert events[-1] == b"data: [DONE]", (path, events[-3:])
            payloads = [json.loads(e[6:]) for e in events[:-1] if e.startswith(b"data: ")]
            errors = [p["error"] for p in payloads if "error" in p]
            if url == victim:
                assert len(errors) == 1 and errors[0]["message"], (path, events[-3:])
            else:
                assert not errors, (path, errors)
    finally:
        server.stop()
