"""Files written once and read once, moved around the page cache (``O_DIRECT``).

The daemon's outputs (SR, CAM overlays, parametric maps) are written once and read once, by
the sender, soon after; then they only wait for retention to remove them. The page cache
gains nothing from holding them, and filling it costs CPU. Measured on the development VM
(2.3 MB overlay files, written and fsync'd one after another; CPU of the whole VM per file):
4.7–6.4 ms through the page cache while it grows into fresh memory (the kernel allocates
~560 pages and writes them back; on a VM whose freed memory goes back to the host every
fresh page is a fault on the host), 0.6–0.9 ms when it reuses pages freed moments before;
0.4–0.7 ms written directly from a buffer the writing thread keeps. Read back directly:
0.5–0.6 ms (0.3 from the cache, 0.7–1.4 through the cache once dropped). And results then
never push received images out of the cache. See bench/RESULTS.md (eighth session).

Received images are *not* written this way: the decode processes read them moments later,
and the page cache is what makes that read cheap.

Direct I/O needs block-aligned offsets, lengths and memory: the bytes are copied into a
page-aligned buffer kept per thread (faulted in once, reused for every file), the
block-aligned body is written directly and the tail (under 4 KiB) through the page cache, on
the same descriptor. Where the file system refuses ``O_DIRECT`` (``EINVAL``: tmpfs on older
kernels, some FUSE file systems) the file is written and read the ordinary way; the result
is the same file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path

#: Offsets, lengths and memory of direct I/O are multiples of this (the largest logical
#: block size of common disks; 512-byte-sector disks accept it too).
ALIGNMENT = 4096
_GROWTH = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _ThreadBuffer(threading.local):
    buffer: mmap.mmap | None = None


_local = _ThreadBuffer()


def _buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer, at least *size* bytes (grown in 1 MiB steps)."""
    current = _local.buffer
    if current is None or len(current) < size:
        if current is not None:
            current.close()
        _local.buffer = current = mmap.mmap(-1, max(_GROWTH, -(-size // _GROWTH) * _GROWTH))
    return current


def _aligned_down(size: int) -> int:
    return size - size % ALIGNMENT


def _aligned_up(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def write_new(
    path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview], *, direct: bool = True
) -> int:
    """Create *path* (it must not exist) holding *chunks*; returns its size. Not synced: the
    caller fsyncs when the file must be durable.

    With *direct* the block-aligned body bypasses the page cache where the file system allows
    it; without, the whole file goes through the cache (an ordinary write).
    """
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    size = sum(view.nbytes for view in views)
    body = _aligned_down(size)
    if not (direct and _O_DIRECT) or body == 0:
        _write_buffered(path, views)
        return size
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o640)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # Some file systems create the file and then refuse the flag: the name is ours.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _write_buffered(path, views)
        return size
    buffer = _buffer(size)
    try:
        with memoryview(buffer) as whole:
            offset = 0
            for view in views:
                whole[offset : offset + view.nbytes] = view
                offset += view.nbytes
            written = 0
            while written < body:
                written += os.pwrite(fd, whole[written:body], written)
            # The tail is shorter than a block: through the page cache, same descriptor.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            while written < size:
                written += os.pwrite(fd, whole[written:size], written)
    except OSError as exc:
        os.close(fd)
        if exc.errno != errno.EINVAL:
            raise
        # Direct writes refused after all (a stricter alignment than ours): start over.
        os.unlink(path)
        _write_buffered(path, views)
        return size
    os.close(fd)
    return size


def _write_buffered(path: str | os.PathLike[str], views: list[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for view in views:
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_whole(path: str | os.PathLike[str]) -> bytes:
    """The bytes of *path*, read around the page cache where the file system allows it."""
    if not _O_DIRECT:
        return Path(path).read_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return Path(path).read_bytes()
    try:
        size = os.fstat(fd).st_size
        span = _aligned_up(size)
        buffer = _buffer(span)
        with memoryview(buffer) as whole:
            done = 0
            while done < span:
                # Reads at block-aligned offsets; the one that reaches the end comes back short.
                count = os.preadv(fd, [whole[done:span]], done)
                if count == 0:
                    break
                done += count
            return bytes(whole[: min(done, size)])
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return Path(path).read_bytes()
    finally:
        os.close(fd)
