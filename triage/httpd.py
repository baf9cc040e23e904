"""The daemon's HTTP endpoints (``[http]``), a stdlib ThreadingHTTPServer in a thread:

- ``GET /healthz`` — liveness: 200 while every loop runs, else 503; JSON
  ``{"status": "ok"|"failing", "loops": {"listener": true, …}}``;
- ``GET /readyz`` — readiness: 200 when the store answers, the listener is bound, the worker
  runs (when enabled) and the spool is above its floor, else 503; JSON
  ``{"status": "ready"|"not ready", "failed": [names], "checks": {name: {"ok": …, …}}}``;
- ``GET /metrics`` — Prometheus text format (see :mod:`triage.metrics`).

No authentication and no patient data: it binds to loopback unless configured otherwise.
"""

from __future__ import annotations

import json
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
            if path == "/healthz":
                ok, loops = self.health.live()
                self._json(
                    200 if ok else 503, {"status": "ok" if ok else "failing", "loops": loops}
                )
            elif path == "/readyz":
                ok, checks = self.health.ready()
                failed = [name for name, check in checks.items() if not check["ok"]]
                body = {
                    "status": "ready" if ok else "not ready",
                    "failed": failed,
                    "checks": checks,
                }
                self._json(200 if ok else 503, body)
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            else:
                self._json(
                    404, {"error": "not found", "endpoints": ["/healthz", "/readyz", "/metrics"]}
                )
        except Exception as exc:  # the endpoint must answer, whatever broke
            log.exception("http_handler_error", path=path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_HEAD(self) -> None:
        """GET's status and headers without the body (load balancers and uptime checks)."""
        self._head_only = True
        self.do_GET()

    def _not_allowed(self) -> None:
        self._json(405, {"error": "method not allowed", "allow": ["GET", "HEAD"]})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, "application/json", (json.dumps(body) + "\n").encode())

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpServer:
    """Bound at construction (so a taken port stops start-up early), serving after start()."""

    def __init__(self, config: HttpConfig, health: Health) -> None:
        self._server = _Server((config.bind, config.port), _Handler)
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
