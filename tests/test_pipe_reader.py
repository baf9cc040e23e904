"""The worker's pool hands results back through a pipe read in place: same results, any size;
both of its pipes hold 1 MB."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from triage.procutil import WIDE_PIPE_BYTES, widen_pipe
from triage.scoring.pipe_reader import (
    IN_PLACE_BYTES,
    _InPlaceConnection,
    read_results_in_place,
    widen_pool_pipes,
)


def _payload(size: int) -> dict[str, object]:
    rng = np.random.default_rng(size)
    return {"bytes": rng.bytes(size), "array": rng.random(size // 8 + 1), "size": size}


def _fail() -> None:
    raise ValueError("decoding failed")


def _pipe_size(connection: object) -> int:
    return int(fcntl.fcntl(connection.fileno(), fcntl.F_GETPIPE_SZ))  # type: ignore[attr-defined]


def test_results_of_every_size_come_back_intact_through_wide_pipes() -> None:
    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    assert widen_pool_pipes(executor) == [WIDE_PIPE_BYTES, WIDE_PIPE_BYTES]
    for queue in (executor._call_queue, executor._result_queue):
        # The size is the pipe's: the decode processes' ends see it too.
        assert _pipe_size(queue._reader) == _pipe_size(queue._writer) == WIDE_PIPE_BYTES
    assert read_results_in_place(executor)
    assert type(executor._result_queue._reader) is _InPlaceConnection
    try:
        for size in (0, 10, IN_PLACE_BYTES - 200, IN_PLACE_BYTES, 3 << 20, (9 << 20) + 7):
            got = executor.submit(_payload, size).result(timeout=60)
            expected = _payload(size)
            assert got["bytes"] == expected["bytes"] and got["size"] == size
            assert np.array_equal(got["array"], expected["array"])
        with pytest.raises(ValueError, match="decoding failed"):
            executor.submit(_fail).result(timeout=60)
    finally:
        executor.shutdown()


def test_a_message_reads_like_the_standard_one() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    reader.__class__ = _InPlaceConnection
    message = bytes(range(256)) * 1024  # 256 KiB: read in place, larger than the pipe holds

    def send(*items: object) -> threading.Thread:
        def run() -> None:
            for item in items:
                if isinstance(item, bytes):
                    writer.send_bytes(item)
                else:
                    writer.send(item)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    sending = send(message, message, {"big": message})
    assert reader.recv_bytes() == message
    into = bytearray(len(message) + 16)
    assert reader.recv_bytes_into(into, 16) == len(message)
    assert bytes(into[16:]) == message
    assert reader.recv() == {"big": message}
    sending.join(10)
    writer.close()
    with pytest.raises(EOFError):
        reader.recv()


def test_a_pipe_is_widened_and_anything_else_is_left_alone(tmp_path) -> None:
    read_end, write_end = os.pipe()
    try:
        assert int(fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)) < WIDE_PIPE_BYTES  # 64 KB
        assert widen_pipe(write_end) == WIDE_PIPE_BYTES
        assert int(fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)) == WIDE_PIPE_BYTES
    finally:
        os.close(read_end)
        os.close(write_end)
    with open(tmp_path / "file", "wb") as regular:
        assert widen_pipe(regular.fileno()) == 0  # not a pipe: nothing to widen
