"""``plait serve --join GATEWAY_URL``: a worker that adds itself to a running ``smg`` gateway
through its worker API, and takes itself out before it drains.

Joining: once this worker is healthy (its own ``/health`` or gRPC health check), it posts
``{"url", "connection_mode", "worker_type"}`` to the gateway's ``POST /workers``, and waits
until the gateway lists it (``GET /workers``: the gateway registers a worker in the background
after probing it, fetching its model info over gRPC). A gateway that refuses, or never lists
it within the start-up timeout, fails the worker's start with a clear error.

Leaving (the first SIGTERM/SIGINT): ``DELETE /workers/{id}``, then wait until the gateway no
longer lists it, so no new request is routed here, and only then drain (running requests
finish, up to ``--shutdown-timeout``). A request the gateway had already picked this worker
for when the removal landed still arrives and is served: draining refuses only after the
gateway has let go. If the gateway cannot be reached the worker drains anyway (it must not
hang on shutdown) and logs that the gateway may still list it until its health check fails.

``--leave-gateway GATEWAY_URL`` (what the ``--pd`` launcher gives its servers, which the
gateway lists from its command line): no joining; the first SIGTERM finds this server's id in
the gateway's ``GET /workers`` and leaves the same way. A PD server that refused requests while
the gateway still routed to it would cost more than a 503: the gateway sends each request to a
prefill and a decode server at once, and the half that was accepted holds its KV waiting for
the refused half until the transfer timeout.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from plait.server.children import connect_host, healthy

log = logging.getLogger("plait.join")

JOIN_TIMEOUT = 120.0  # seconds from this worker's start to its place in the gateway's pool


class JoinError(RuntimeError):
    """The gateway did not take this worker."""


def advertised_url(host: str, port: int, grpc_mode: bool) -> str:
    """How the gateway reaches this worker: its bind address, or this machine's address when
    it binds every interface."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    else:
        host = connect_host(host)
    return f"{'grpc' if grpc_mode else 'http'}://{host}:{port}"


def _ready(record: dict[str, Any] | None) -> bool:
    """Listed and routable: the gateway marks a worker healthy after its first checks."""
    return record is not None and record.get("is_healthy", True) is not False


class Membership:
    """This worker's place in one gateway's pool."""

    def __init__(
        self,
        gateway_url: str,
        worker_url: str,
        worker_api_key: str | None = None,
        joins: bool = True,
    ):
        self.gateway = gateway_url.rstrip("/")
        self.joins = joins  # False: someone else registered this worker; only leave
        self.url = worker_url
        self.headers = {"Content-Type": "application/json"}
        self.worker_api_key = worker_api_key  # what the gateway presents to this worker
        self.worker_id: str | None = None

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.gateway + path, data=data, method=method, headers=self.headers
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode() or "null"
        return json.loads(text)

    def listed(self) -> dict[str, Any] | None:
        """The gateway's record of this worker, or None."""
        workers = self._call("GET", "/workers").get("workers", [])
        return next((w for w in workers if w.get("url") == self.url), None)

    def join(self, timeout: float) -> None:
        """Wait until this worker is healthy, register it, wait until the gateway lists it.
        :class:`JoinError` on refusal or timeout."""
        deadline = time.monotonic() + timeout
        while not healthy(self.url):
            if time.monotonic() > deadline:
                raise JoinError(f"{self.url} did not become healthy within {timeout:.0f}s")
            time.sleep(0.3)
        body = {
            "url": self.url,
            "worker_type": "regular",
            "connection_mode": "grpc" if self.url.startswith("grpc://") else "http",
        }
        if self.worker_api_key:
            body["api_key"] = self.worker_api_key
        try:
            reply = self._call("POST", "/workers", body)
        except urllib.error.HTTPError as e:
            raise JoinError(
                f"the gateway at {self.gateway} refused {self.url}: {e.code} {e.read()[:300]!r}"
            ) from None
        except OSError as e:
            raise JoinError(f"the gateway at {self.gateway} is not reachable: {e}") from None
        self.worker_id = reply.get("worker_id")
        while not _ready(record := self.listed()):
            if time.monotonic() > deadline:
                raise JoinError(f"the gateway at {self.gateway} never listed {self.url}")
            time.sleep(0.3)
        self.worker_id = (record or {}).get("id") or self.worker_id
        log.info("joined the gateway at %s as %s (%s)", self.gateway, self.url, self.worker_id)

    def leave(self, timeout: float = 30) -> bool:
        """Deregister and wait until the gateway no longer lists this worker. False (logged)
        when the gateway could not be told or did not confirm in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            if self.worker_id is None and not self.joins:
                self.worker_id = (self.listed() or {}).get("id")
            if self.worker_id is None:
                log.warning("the gateway at %s does not list %s", self.gateway, self.url)
                return False
            self._call("DELETE", f"/workers/{self.worker_id}")
            while self.listed() is not None:
                if time.monotonic() > deadline:
                    log.warning("the gateway still lists %s after %.0fs", self.url, timeout)
                    return False
                time.sleep(0.2)
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.warning(
                "could not leave the gateway at %s (%s); it routes here until its health "
                "check fails",
                self.gateway,
                e,
            )
            return False
        log.info("left the gateway at %s", self.gateway)
        return True


def membership_for(args: Any) -> Membership | None:
    """The membership ``--join`` or ``--leave-gateway`` asks for (``args`` is a ServerArgs),
    or None."""
    if args.join is not None:
        url = advertised_url(args.host, args.port, args.grpc_mode)
        return Membership(args.join, url, worker_api_key=args.api_key)
    if args.leave_gateway is not None:
        url = advertised_url(args.host, args.port, args.grpc_mode)
        return Membership(args.leave_gateway, url, joins=False)
    return None


def start_joining(membership: Membership, on_failure: Callable[[], None]) -> None:
    """Join in a background thread (the server must be answering for the gateway to take
    it); a refusal, or no place in the pool within :data:`JOIN_TIMEOUT`, is logged and
    ``on_failure`` stops the worker."""

    def run() -> None:
        try:
            membership.join(JOIN_TIMEOUT)
        except (JoinError, OSError, ValueError) as e:
            log.error("%s; stopping", e)
            on_failure()

    threading.Thread(target=run, name="plait-join", daemon=True).start()
