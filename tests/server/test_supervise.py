"""``children.supervise``: the launch stops for its workers only once every one it started has
exited and none of their addresses answers (a supervisor's replacement on the address keeps
the launch running); the gateway's exit stops it at once."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from plait.server.children import Child, supervise


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _exited() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc


def _run(gateway: Child, workers: list[Child], seconds: float) -> int | None:
    """supervise's result, or None if it was still supervising after ``seconds``."""
    stop, result = threading.Event(), []
    t = threading.Thread(target=lambda: result.append(supervise(gateway, workers, stop)))
    t.start()
    t.join(seconds)
    still = t.is_alive()
    stop.set()
    t.join(5)
    return None if still else result[0]


def test_a_replacement_on_a_dead_workers_address_keeps_the_launch_running():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    replaced = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        gateway = Child("gateway", "http://127.0.0.1:1", sleeper)
        workers = [Child("w0", replaced, _exited()), Child("w1", "http://127.0.0.1:1", _exited())]
        assert _run(gateway, workers, 2.0) is None  # still supervising: w0's address answers
        server.shutdown()
        server.server_close()
        assert _run(gateway, workers, 5.0) == 1  # nothing answers any more: stop
    finally:
        sleeper.kill()
        sleeper.wait()
