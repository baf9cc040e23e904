"""The pipes of the worker's process pool: 1 MB wide, and results read in place.

The pool's two pipes (calls to the decode processes, results back) hold 64 KB by default,
so each overlay's 2.3 MB crosses in ~40 rounds of waking the reader and then the writer;
:func:`widen_pool_pipes` gives them 1 MB (see :func:`~triage.procutil.widen_pipe`).

The decode processes send the worker a model input and a display image per view (~0.9 MB)
and the encoded SR and overlays per study (~2.3 MB per overlay). ``multiprocessing`` reads a
message 64 KB at a time into fresh ``bytes`` and appends them to a ``BytesIO``: two copies
and a growing buffer, made while holding the worker's GIL, which the model's thread waits
for between batches. Here the kernel copies a large message straight into one buffer of
its final size (``readv``, without the GIL). Measured: +5.8% views/s on the CPU scoring path
with overlays (four interleaved pairs, every pair faster; bench/RESULTS.md).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection

from triage.procutil import widen_pipe

#: Messages at least this large are read in place; smaller ones the standard way.
IN_PLACE_BYTES = 1 << 16


class _Message:
    """What ``Connection._recv`` returns (a ``BytesIO`` there), over a filled bytearray."""

    __slots__ = ("_data", "_position")

    def __init__(self, data: bytearray) -> None:
        self._data = data
        self._position = len(data)  # as a BytesIO after its writes

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)

    def getvalue(self) -> bytes:
        return bytes(self._data)

    def tell(self) -> int:
        return self._position

    def seek(self, position: int) -> int:
        self._position = position
        return position

    def readinto(self, target: memoryview) -> int:
        count = min(len(target), len(self._data) - self._position)
        target[:count] = memoryview(self._data)[self._position : self._position + count]
        self._position += count
        return count


class _InPlaceConnection(Connection):
    """A pipe connection whose large messages land in one buffer, copied by the kernel."""

    def _recv(self, size, read=None):  # type: ignore[no-untyped-def, override]
        if size < IN_PLACE_BYTES:
            return super()._recv(size)
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            count = os.readv(self._handle, [view[got:]])  # type: ignore[attr-defined]
            if count == 0:
                if got == 0:
                    raise EOFError
                raise OSError("got end of file during message")
            got += count
        return _Message(data)


def read_results_in_place(executor: ProcessPoolExecutor) -> bool:
    """Make *executor*'s result pipe read large messages in place; False where this Python's
    executor is not built as expected (it then keeps the standard reader)."""
    reader = getattr(getattr(executor, "_result_queue", None), "_reader", None)
    if type(reader) is not Connection or not hasattr(os, "readv"):
        return False
    reader.__class__ = _InPlaceConnection
    return True


def widen_pool_pipes(executor: ProcessPoolExecutor) -> list[int]:
    """Give *executor*'s call and result pipes 1 MB each (before its processes start; the
    size belongs to the pipe, so both ends see it). Returns their sizes now, [] where this
    Python's executor is not built as expected."""
    sizes = []
    for queue in (getattr(executor, "_call_queue", None), getattr(executor, "_result_queue", None)):
        reader = getattr(queue, "_reader", None)
        if not isinstance(reader, Connection):
            return []
        sizes.append(widen_pipe(reader.fileno()))
    return sizes
