"""The listener's PDU reader (triage.dicom.fast_receive) on a real socket pair."""

from __future__ import annotations

import socket
import struct
import tracemalloc
from types import SimpleNamespace

import pytest

from triage.dicom.fast_receive import FastAssociationSocket, _read_pdu


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
