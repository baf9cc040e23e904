"""sd_notify: readiness, watchdog and stopping messages to systemd, without libsystemd.

systemd (``Type=notify``) passes ``$NOTIFY_SOCKET``: a Unix datagram socket, a filesystem path or
``@name`` for the abstract namespace. Each message is one datagram of ``KEY=VALUE`` lines. With
``WatchdogSec=`` it also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant to
ping); the service must send ``WATCHDOG=1`` more often than that or systemd kills and restarts it.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from triage.logs import get_logger

log = get_logger("triage.notify")


def _address(value: str) -> str:
    # "@name" is the abstract namespace: a leading NUL byte on the wire.
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` if systemd gave one."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.socket_path = env.get("NOTIFY_SOCKET", "")
        self._watchdog_s = _watchdog_seconds(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test) is listening."""
        return bool(self.socket_path)

    @property
    def watchdog_s(self) -> float | None:
        """The watchdog timeout in seconds, or ``None`` when no watchdog is armed for us."""
        return self._watchdog_s

    @property
    def check_interval_s(self) -> float:
        """How often a supervising loop checks its loops and pings: a quarter of the watchdog
        timeout (so a late ping is still in time), at most 1 s, at least 50 ms."""
        if self._watchdog_s is None:
            return 1.0
        return max(0.05, min(1.0, self._watchdog_s / 4))

    def send(self, *lines: str) -> bool:
        """Send one datagram with *lines*; False (and one warning) if it could not be sent."""
        if not self.socket_path:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_address(self.socket_path))
                sock.sendall(payload)
        except OSError as exc:
            # A notification that cannot be sent must never stop the daemon; say it once.
            if not self._warned:
                log.warning("sd_notify_failed", socket=self.socket_path, error=str(exc))
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up finished (listener bound, schema current)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon's loops are alive."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: shutdown began."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=…``: a line `systemctl status` shows."""
        return self.send(f"STATUS={text}")


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds when it applies to this process (``$WATCHDOG_PID``)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None  # meant for another process (a parent that exec'd us did not reset it)
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


__all__ = ["Notifier"]
