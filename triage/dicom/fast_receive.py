"""How the listener process receives data sets faster and makes them durable sooner.

Two targeted changes to pynetdicom 3's receive path, applied only in listener processes
(measured on 10 MB DX images, see bench/RESULTS.md):

1. pynetdicom reads every PDU from the socket 4 KiB per ``recv()`` call — 2,560 Python-level
   calls per 10 MB image. :class:`FastAssociationSocket` reads a whole PDU with ``recv_into``
   into one buffer.
2. In chunked mode pynetdicom writes each received fragment to a ``NamedTemporaryFile`` in the
   process's temp folder. :func:`install_spool_temp_files` makes it a file in the spool's own
   temp folder (same filesystem, so an accepted file is linked into place, never copied) and
   asks the kernel to start writing each few megabytes back to disk while the rest of the image
   is still arriving, so the fsync before the C-STORE answer has little left to wait for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages
from pynetdicom.transport import AssociationSocket, RequestHandler

#: Start write-back after this many new bytes (a few PDUs' worth).
WRITEBACK_STEP = 4 * 1024 * 1024

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_start_writeback = _sync_file_range()


class FastAssociationSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU in as few system calls as possible."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly *nr_bytes* (fewer only when the peer closed the connection)."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:], nr_bytes - received)
                if not count:
                    break
                received += count
        finally:
            view.release()
        if received < nr_bytes:
            del buffer[received:]
        return buffer


class FastRequestHandler(RequestHandler):
    """Creates associations whose socket is a :class:`FastAssociationSocket`."""

    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        # Same object, same state: only the recv() implementation changes.
        assoc.dul.socket.__class__ = FastAssociationSocket
        return assoc


class SpoolTempFile:
    """The file pynetdicom writes a received data set into (the interface it uses: ``name``,
    ``write``, ``file.flush`` and ``close``), in the spool's temp folder, with early
    write-back."""

    def __init__(self, directory: str) -> None:
        fd, self.name = _mkstemp(directory)
        self._fd: int | None = fd
        self._written = 0
        self._flushed = 0
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment

    def write(self, data: Any) -> int:
        """Write all of *data*; every WRITEBACK_STEP bytes, start writing back to disk."""
        assert self._fd is not None
        view = memoryview(data)
        size = len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += size
        if _start_writeback and self._written - self._flushed >= WRITEBACK_STEP:
            _start_writeback(
                self._fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE
            )
            self._flushed = self._written
        return size

    def flush(self) -> None:
        """Nothing to do: writes go straight to the file descriptor."""

    def close(self) -> None:
        """Close the descriptor (pynetdicom then deletes the name)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _mkstemp(directory: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(suffix=".dcm", dir=directory)


def install_spool_temp_files(temp_dir: Path) -> None:
    """Make pynetdicom write received data sets as :class:`SpoolTempFile` in *temp_dir*."""
    directory = str(temp_dir)

    def factory(*_args: Any, **_kwargs: Any) -> SpoolTempFile:
        return SpoolTempFile(directory)

    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]
