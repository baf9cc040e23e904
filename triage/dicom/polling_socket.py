"""pynetdicom's association socket with poll(2) instead of select(2), for both roles.

select(2) refuses a descriptor past FD_SETSIZE (1024) with ValueError, which pynetdicom's
``AssociationSocket.ready`` takes for a closed connection (Evt17). The units raise
LimitNOFILE to 65536, so a process holding about a thousand descriptors lost every
association it opened or accepted next: the listener's (see ``fast_receive``), and the
sender's once the daemon's own descriptors (database pool, decode processes' pipes, spool
and outbox files, HTTP clients) passed that number.
"""

from __future__ import annotations

import math
import select
import socket
import ssl

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket


def readable(sock: socket.socket, timeout: float | None) -> bool:
    """Whether *sock* has data (or an end of stream or error) within *timeout* seconds
    (None: no limit), by poll(2), which takes any descriptor."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


class PollingAssociationSocket(AssociationSocket):
    """pynetdicom's association socket whose ``ready`` uses poll(2)."""

    @property
    def ready(self) -> bool:
        """Whether data (or the peer's close) is waiting to be read: pynetdicom's ``ready``
        with poll(2) instead of select(2)."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            ready = readable(sock, 0)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if isinstance(sock, ssl.SSLSocket):  # decrypted bytes poll(2) does not see
            return ready or bool(sock.pending())
        return ready


class RequestorAE(AE):
    """An AE whose requested associations use a :class:`PollingAssociationSocket`."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = PollingAssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock
