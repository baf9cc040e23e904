"""Files written and read around the page cache: same bytes as an ordinary write, the body
really bypasses the cache, and a file system that refuses O_DIRECT still gets the file."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path

import pytest

from triage.store import direct_io
from triage.store.spool import Spool

SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096, 2_300_017]


def _pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4099))
    return (block * (size // len(block) + 1))[:size]


def _resident_pages(path: Path) -> list[bool]:
    """Which pages of *path* are in the page cache (mincore(2) on a shared mapping)."""
    size = path.stat().st_size
    if size == 0:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return [bool(v & 1) for v in vector]
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def _direct_io_works_here(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_written_and_read_back_byte_for_byte(tmp_path: Path, size: int, direct: bool) -> None:
    data = _pattern(size, seed=size % 7)
    path = tmp_path / "f.dcm"
    assert direct_io.write_new(path, (data,), direct=direct) == size
    assert path.read_bytes() == data
    assert direct_io.read_whole(path) == data


def test_chunks_are_joined_in_order(tmp_path: Path) -> None:
    chunks = [_pattern(n, seed=n) for n in (10, 5000, 0, 8192, 3)]
    path = tmp_path / "f.dcm"
    assert direct_io.write_new(path, [memoryview(c) for c in chunks]) == sum(map(len, chunks))
    assert path.read_bytes() == b"".join(chunks)


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "f.dcm"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        direct_io.write_new(path, (_pattern(10_000, 1),))
    assert path.read_bytes() == b"first"


def test_the_body_bypasses_the_page_cache(tmp_path: Path) -> None:
    if not _direct_io_works_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    size = 64 * 4096 + 100
    ordinary = tmp_path / "ordinary"
    direct_io.write_new(ordinary, (_pattern(size, 2),), direct=False)
    assert all(_resident_pages(ordinary))  # the measurement sees cached pages

    direct = tmp_path / "direct"
    direct_io.write_new(direct, (_pattern(size, 3),))
    resident = _resident_pages(direct)
    assert not any(resident[:64])  # the block-aligned body went straight to the disk
    assert direct_io.read_whole(direct) == _pattern(size, 3)
    assert not any(_resident_pages(direct)[:64])  # and was read back the same way


def test_a_file_system_that_refuses_o_direct_gets_an_ordinary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            if flags & os.O_CREAT:  # as tmpfs did: the file is created, then refused
                os.close(real_open(path, flags & ~os.O_DIRECT, *args))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    data = _pattern(100_000, 4)
    path = tmp_path / "f.dcm"
    assert direct_io.write_new(path, (data,)) == len(data)
    assert path.read_bytes() == data
    assert direct_io.read_whole(path) == data


def test_a_refused_direct_write_starts_over_the_ordinary_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    data = _pattern(50_000, 5)
    path = tmp_path / "f.dcm"
    assert direct_io.write_new(path, (data,)) == len(data)
    assert refused == [0]
    assert path.read_bytes() == data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError) as raised:
        direct_io.write_new(tmp_path / "f.dcm", (_pattern(50_000, 6),))
    assert raised.value.errno == errno.ENOSPC


def test_threads_keep_their_own_buffers(tmp_path: Path) -> None:
    sizes = [4096 * 50 + i * 1000 for i in range(8)]
    errors: list[BaseException] = []

    def write_and_check(index: int) -> None:
        try:
            for round_ in range(5):
                data = _pattern(sizes[index] + round_, seed=index + round_)
                path = tmp_path / f"{index}-{round_}"
                direct_io.write_new(path, (data,))
                assert direct_io.read_whole(path) == data
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write_and_check, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_spool_writes_direct_files_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    data = _pattern(300_001, 7)
    relative = "outbox/1.2.3/1.2.3.4.dcm"
    assert spool.write(relative, (data,), direct=True) == len(data)
    assert spool.path(relative).read_bytes() == data
    assert not list(spool.temp_dir.iterdir())
