"""The listener's PDU reader (triage.dicom.fast_receive) on a real socket pair."""

from __future__ import annotations

import os
import resource
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from triage.dicom.fast_receive import (
    FastAssociationSocket,
    SpoolTempFile,
    _read_pdu,
    _splice_into,
    write_error,
)


def _reader_of(connection: socket.socket) -> SimpleNamespace:
    """What _read_pdu needs of a DUL: its socket (the listener's class, on *connection*)."""
    sock = FastAssociationSocket.__new__(FastAssociationSocket)
    sock.socket = connection
    return SimpleNamespace(socket=sock, assoc=None)


def test_a_pdu_length_alone_does_not_make_the_reader_allocate_it() -> None:
    """An A-ASSOCIATE-RQ header announcing 7 MiB followed by 1 KiB and a close: the reader
    fails with EOFError having held about what arrived, not the announced length (any
    peer, before it is associated, could otherwise make each connection cost megabytes)."""
    ours, peer = socket.socketpair()
    try:
        announced = 7 * 1024 * 1024
        peer.sendall(struct.pack(">BBL", 0x01, 0, announced) + b"\x00" * 1024)
        peer.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(EOFError, match=f"1024 of {announced} bytes"):
                _read_pdu(_reader_of(ours))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        ours.close()
        peer.close()
    assert peak < 1024 * 1024


def test_a_pdu_that_arrives_in_pieces_is_read_whole() -> None:
    """An A-RELEASE-RQ sent a byte at a time reaches the decoder whole, header included."""
    from pynetdicom.pdu import A_RELEASE_RQ

    ours, peer = socket.socketpair()
    dul = _reader_of(ours)
    dul._decode_pdu = lambda data: (bytes(data), "Evt12")
    pdu = A_RELEASE_RQ().encode()
    try:
        for byte in pdu:
            peer.sendall(bytes((byte,)))
        event, received = _read_pdu(dul)
    finally:
        ours.close()
        peer.close()
    assert (event, received) == ("Evt12", pdu)


#: A descriptor past select(2)'s FD_SETSIZE (1024).
_HIGH_FD = 1500


def _tcp_pair_past_fd_setsize() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair whose first socket has descriptor :data:`_HIGH_FD`, with the
    network timeout the listener gives accepted sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= _HIGH_FD:
        if hard != resource.RLIM_INFINITY and hard <= _HIGH_FD:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (_HIGH_FD + 1, hard))
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    os.dup2(accepted.fileno(), _HIGH_FD)
    accepted.close()
    ours = socket.socket(fileno=_HIGH_FD)
    ours.settimeout(10)
    return ours, peer


def test_a_socket_past_fd_setsize_is_read_not_taken_for_closed(tmp_path: Path) -> None:
    """select(2) refuses descriptors past 1024; pynetdicom's ``ready`` took that for a
    closed connection (Evt17), and the data-set splice failed on it whenever the data were
    not there yet: a listener holding a thousand descriptors (LimitNOFILE=65536, up to 1000
    associations) dropped every association it accepted next."""
    ours, peer = _tcp_pair_past_fd_setsize()
    events: list[str] = []
    sock = FastAssociationSocket.__new__(FastAssociationSocket)
    sock.socket = ours
    sock._is_connected = True
    sock._assoc = SimpleNamespace(
        dul=SimpleNamespace(event_queue=SimpleNamespace(put=events.append))
    )
    target = SpoolTempFile(str(tmp_path))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    payload = os.urandom(300_000)

    def send_later() -> None:
        time.sleep(0.3)  # the splice finds nothing first, and waits
        peer.sendall(payload)

    sender = threading.Thread(target=send_later)
    try:
        assert sock.ready is False
        sender.start()
        _splice_into(ours, (read_end, write_end), target, len(payload))
        sender.join()
        peer.sendall(b"x")
        time.sleep(0.1)
        assert sock.ready is True
        assert events == []
    finally:
        sender.join()
        target.close()
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        peer.close()
    assert Path(target.name).read_bytes() == payload


def test_a_temp_file_that_cannot_be_created_drops_the_data_set_with_an_error(
    tmp_path: Path,
) -> None:
    """A spool temp folder no file can be made in (read-only, out of inodes; here: gone):
    the constructor raised in the DUL thread, which aborted the association, and the PACS
    never got 0xA700. The data set is now read and dropped, with the error to answer."""
    target = SpoolTempFile(str(tmp_path / "gone"))
    assert target.is_open is False
    assert target.write(b"\x00" * 132) == 132
    target.file.flush()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(write_end, b"pixels")
        target.append_from_pipe(read_end, 6)  # drained from the pipe, not written
        os.write(write_end, b"!")
        assert os.read(read_end, 1) == b"!"
    finally:
        os.close(read_end)
        os.close(write_end)
    assert isinstance(write_error(target.name), FileNotFoundError)
    assert not Path(target.name).exists()
    target.close()
    assert write_error(target.name) is None
