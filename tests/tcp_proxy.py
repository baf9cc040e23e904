"""A TCP proxy for tests that puts a server (PostgreSQL) out of reach on demand: *refuse*
(connections reset, as a server that is down) or *freeze* (connections accepted and bytes
taken, nothing ever answered, as a hung server or a network partition behind a middlebox).

Adapted from the review script that found the hung-store defect (pgproxy.py).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

#: SO_LINGER on, 0 s: close() sends RST instead of FIN (the peer sees "connection refused/reset").
_RESET = struct.pack("ii", 1, 0)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to *target* until told to refuse or freeze."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self._listening = socket.socket()
        self._listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listening.bind(("127.0.0.1", 0))
        self._listening.listen(64)
        self.port: int = self._listening.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def url(self, database_url: str) -> str:
        """*database_url* (``postgresql://user@host:port/db``) with this proxy as its host."""
        scheme, rest = database_url.split("://", 1)
        credentials, _, location = rest.rpartition("@")
        path = location.split("/", 1)[1]
        user = f"{credentials}@" if credentials else ""
        return f"{scheme}://{user}127.0.0.1:{self.port}/{path}"

    def forward(self) -> None:
        """Pass bytes both ways (again)."""
        self.mode = "forward"

    def freeze(self) -> None:
        """Take every byte, answer none: open connections and new ones hang."""
        self.mode = "freeze"

    def refuse(self) -> None:
        """Reset every open connection and every new one."""
        self.mode = "refuse"
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _reset(sock)

    def close(self) -> None:
        """Stop listening, drop every connection and end the proxy's threads."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listening.shutdown(socket.SHUT_RDWR)
        self._listening.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _reset(sock)
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listening.accept()
            except OSError:
                return
            if self.mode == "refuse":
                _reset(client)
                continue
            upstream = None
            if self.mode == "forward":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _reset(client)
                    continue
            with self._lock:
                self._sockets += [client] if upstream is None else [client, upstream]
            pump = threading.Thread(
                target=self._pump, args=(client, upstream), name="proxy-pump", daemon=True
            )
            self._threads.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        # A connection accepted while frozen has no upstream: it only ever waits.
        try:
            while not self._closed.is_set():
                if self.mode != "forward" or upstream is None:
                    # Frozen: the kernel takes the bytes (and ACKs them), nobody reads them.
                    self._closed.wait(0.2)
                    continue
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                for end in readable:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is client else client).sendall(data)
        except (OSError, ValueError):  # reset by refuse()/close(), or closed under select
            return
        finally:
            for end in (client, upstream):
                if end is not None:
                    _close(end)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
