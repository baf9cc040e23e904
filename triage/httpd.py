"""The daemon's HTTP endpoints (``[http]``), a stdlib ThreadingHTTPServer in a thread:

- ``GET /healthz`` — liveness: 200 while every loop runs, else 503; JSON
  ``{"status": "ok"|"failing", "loops": {"listener": true, …}}``;
- ``GET /readyz`` — readiness: 200 when the store answers, the listener is bound, the worker
  runs (when enabled) and the spool is above its floor, and the daemon is not stopping, else
  503; JSON
  ``{"status": "ready"|"not ready", "failed": [names], "checks": {name: {"ok": …, …}}}``;
- ``GET /metrics`` — Prometheus text format (see :mod:`triage.metrics`).

No authentication and no patient data: it binds to loopback unless configured otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triage.config import HttpConfig
from triage.health import Health
from triage.logs import get_logger
from triage.metrics import REGISTRY

log = get_logger("triage.http")

#: How long a connection may take to send its request or read the answer (socket timeout).
CLIENT_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    server_version = "msk-triage"
    # HTTP/1.0: one request per connection, so a scraper cannot hold a thread open.
    protocol_version = "HTTP/1.0"
    # Nor can a client that connects and sends nothing (or half a request line), or stops
    # reading: each connection has a thread, and without a timeout it held it for ever.
    timeout = CLIENT_TIMEOUT_S

    @property
    def health(self) -> Health:
        return self.server.health  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            status, content_type, payload = self._answer(path)
        except Exception as exc:  # the endpoint must answer, whatever broke
            log.exception("http_handler_error", path=path)
            status, content_type = 500, "application/json"
            payload = _json_bytes({"error": f"{type(exc).__name__}: {exc}"})
        # Sent outside the try: a client that went away while the answer was built (a reset,
        # a scrape that timed out) is not the endpoint's error; _Server.handle_error says so.
        self._send(status, content_type, payload)

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for GET *path*."""
        if path == "/healthz":
            ok, loops = self.health.live()
            body = {"status": "ok" if ok else "failing", "loops": loops}
            return 200 if ok else 503, "application/json", _json_bytes(body)
        if path == "/readyz":
            ok, checks = self.health.ready()
            failed = [name for name, check in checks.items() if not check["ok"]]
            body = {"status": "ready" if ok else "not ready", "failed": failed, "checks": checks}
            return 200 if ok else 503, "application/json", _json_bytes(body)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        body = {"error": "not found", "endpoints": ["/healthz", "/readyz", "/metrics"]}
        return 404, "application/json", _json_bytes(body)

    def do_HEAD(self) -> None:
        """GET's status and headers without the body (load balancers and uptime checks)."""
        self._head_only = True
        self.do_GET()

    def _not_allowed(self) -> None:
        self._json(405, {"error": "method not allowed", "allow": ["GET", "HEAD"]})

    # Every other method HTTP defines; one it does not define gets 501 (RFC 9110 15.6.2).
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, "application/json", _json_bytes(body))

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        if status == 405:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the log: debug level only.
        log.debug("http_request", peer=self.client_address[0], request=format % args)


def _json_bytes(body: dict[str, Any]) -> bytes:
    return (json.dumps(body) + "\n").encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" serves IPv4 clients too (as the DICOM listener's "::" does), whatever the
            # host's net.ipv6.bindv6only says.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside the endpoints' own error handling, logged as one
        structured line. socketserver's default printed a bare traceback to stderr, which
        broke the JSON log for each client that reset its connection (a TCP probe, a port
        scan, a scraper that gave up): that is the client's doing, so debug level only."""
        exc = sys.exc_info()[1]
        peer = client_address[0] if client_address else None
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("http_client_gone", peer=peer, error=f"{type(exc).__name__}: {exc}")
        else:
            log.error("http_connection_failed", peer=peer, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _address_family(bind: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 address (``::``, ``::1``) or a name with only IPv6 addresses, else
    IPv4 (a name with both keeps binding its IPv4 address, as it always did). The stdlib
    server is IPv4 only: ``bind = "::"``, which the config accepts, failed at start."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    except ValueError:
        pass
    try:
        families = {info[0] for info in socket.getaddrinfo(bind, None, type=socket.SOCK_STREAM)}
    except OSError:
        return socket.AF_INET  # bind() says why, as before
    return socket.AF_INET6 if families == {socket.AF_INET6} else socket.AF_INET


class HttpServer:
    """Bound at construction (so a taken port stops start-up early), serving after start()."""

    def __init__(self, config: HttpConfig, health: Health) -> None:
        server_class = _Server6 if _address_family(config.bind) == socket.AF_INET6 else _Server
        self._server = server_class((config.bind, config.port), _Handler)
        self._server.health = health  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked when the config said 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="http"
        )
        self._thread.daemon = True
        self._thread.start()

    def alive(self) -> bool:
        """True while the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


__all__ = ["HttpServer"]
