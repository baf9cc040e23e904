"""How the listener process receives data sets faster and makes them durable sooner.

Three targeted changes to pynetdicom 3's receive path, applied only in listener processes
(measured on 10 MB DX images, see bench/RESULTS.md):

1. pynetdicom reads every PDU from the socket 4 KiB per ``recv()`` call — 2,560 Python-level
   calls per 10 MB image. :class:`FastAssociationSocket` reads a whole PDU with ``recv_into``
   into one buffer.
2. In chunked mode pynetdicom writes each received fragment to a ``NamedTemporaryFile`` in the
   process's temp folder. :func:`install_spool_temp_files` makes it a file in the spool's own
   temp folder (same filesystem, so an accepted file is linked into place, never copied) and
   asks the kernel to start writing each megabyte back to disk while the rest of the image
   is still arriving, so the fsync before the C-STORE answer has little left to wait for.
3. For every P-DATA-TF PDU pynetdicom copies each PDV into new objects (PDU decode, P-DATA
   primitive, ``data[1:]``) before the fragment reaches that file. :func:`read_pdu_data` (the
   DUL's PDU reader in our associations) takes over P-DATA-TF PDUs of a C-STORE data set
   being received: on plain TCP it reads the item headers and moves each data-set PDV's
   payload with splice(2) from the socket through a pipe into the message's spool file (the
   bytes never enter user space); under TLS it reads the PDU into a buffer reused for the
   whole association and writes the payloads from there. pynetdicom still sees every PDU,
   in order, with each PDV's message control header (so its state machine, timers and
   end-of-message logic are untouched) — only the payload bytes, already on their way to
   disk, are left out. Command PDVs, PDUs of other messages and anything unusual take
   pynetdicom's own path.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import socket
import ssl
import struct
import sys
import types
import uuid
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import association as association_module
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import RequestHandler

from triage.dicom import fast_commands, prompt_reactors
from triage.dicom.association_request import without_unknown_user_sub_items
from triage.dicom.polling_socket import PollingAssociationSocket, readable
from triage.logs import get_logger
from triage.procutil import WIDE_PIPE_BYTES, widen_pipe

#: Start write-back after this many new bytes. What is left when the last fragment arrives is
#: what the fsync before the answer waits for: on a 10 MB image, a 4 MiB step left 1.4–1.7 ms
#: of fsync per instance and a 1 MiB step 0.4–0.5 ms (bench/RESULTS.md, 2026-11-30 fast disk);
#: 256 KiB was no better than 1 MiB.
WRITEBACK_STEP = 1024 * 1024

_SYNC_FILE_RANGE_WRITE = 2

#: Larger PDUs than this (we never offer more than 4 MiB) are read pynetdicom's way, as the
#: data arrive: a length field alone must not make us allocate gigabytes.
LARGEST_BUFFERED_PDU = 8 * 1024 * 1024

#: A PDU announcing more than this is refused (A-ABORT) before any of it is read: four times
#: the largest maximum we offer (4 MiB), so a peer that ignores our maximum still gets
#: through, but no length field can make a connection cost gigabytes before it is even
#: associated.
LARGEST_ACCEPTED_PDU = 16 * 1024 * 1024

#: Size asked for the splice(2) pipe of an association (the kernel may give less).
PIPE_SIZE = WIDE_PIPE_BYTES
_HAS_SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_MOVE = getattr(os, "SPLICE_F_MOVE", 0)
_SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 0)

_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
_LOGGER = logging.getLogger("pynetdicom")


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


class FastAssociationSocket(PollingAssociationSocket):
    """pynetdicom's association socket, reading a PDU in as few system calls as possible
    (and polling with poll(2): a busy listener holds more than 1024 descriptors)."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly *nr_bytes* (fewer only when the peer closed the connection)."""
        if nr_bytes > LARGEST_BUFFERED_PDU:
            return super().recv(nr_bytes)  # type: ignore[no-any-return]
        buffer = bytearray(nr_bytes)
        received = self.recv_into(buffer, nr_bytes)
        if received < nr_bytes:
            del buffer[received:]
        return buffer

    def recv_into(self, buffer: bytearray, nr_bytes: int) -> int:
        """Fill the first *nr_bytes* of *buffer*; the count read (less only at end of stream)."""
        sock = self.socket
        assert sock is not None
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:nr_bytes], nr_bytes - received)
                if not count:
                    break
                received += count
        finally:
            view.release()
        return received


class FastRequestHandler(RequestHandler):
    """Creates associations whose socket is a :class:`FastAssociationSocket`, whose DUL reads
    PDUs with :func:`read_pdu_data`, whose reactors wake when there is work
    (:mod:`triage.dicom.prompt_reactors`) and whose C-STORE answers are encoded byte by byte
    (:mod:`triage.dicom.fast_commands`)."""

    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        # Same objects, same state: only how PDUs are read changes.
        assoc.dul.socket.__class__ = FastAssociationSocket
        assoc.dul._read_pdu_data = types.MethodType(read_pdu_data, assoc.dul)
        assoc.dimse.receive_primitive = _guarded(assoc.dimse, assoc.dimse.receive_primitive)
        machine = assoc.dul.state_machine
        machine.do_action = _after_the_end_ignored(machine, machine.do_action)
        assoc._serve_request = _served_by_its_context(assoc, assoc._serve_request)
        prompt_reactors.attach(assoc)
        assoc.dimse.send_msg = fast_commands.fast_send_msg(assoc.dimse, assoc.dimse.send_msg)
        return assoc


def _guarded(dimse: Any, receive_primitive: Any) -> Any:
    """*receive_primitive* (pynetdicom's, run by the DUL thread for each P-DATA), ending the
    association with an A-ABORT when a message cannot be decoded.

    pynetdicom reads the command set's AffectedSOPClassUID, AffectedSOPInstanceUID and
    presentation context unchecked when it writes data sets to files (our chunked mode): a
    command without them, or on a context never accepted, raised in the DUL thread and
    killed it, so the peer got no answer, the association was never closed out (its audit
    row stayed ACTIVE) and its spool temp file stayed. Evt19 (an invalid PDU) is pynetdicom's
    own answer to a message it cannot turn into a primitive.

    A data-set fragment on another presentation context than its command's is refused the
    same way (PS3.7 6.3.1; DCMTK: "Presentation Contexts of Command and Data Differ"):
    pynetdicom wrote it on, under File Meta naming the command's transfer syntax, and an
    Explicit VR data set sent on an Implicit VR context was stored and acknowledged
    mislabelled.
    """

    def receive(primitive: Any) -> None:
        stray = _stray_data_set_fragment(dimse.message, primitive)
        if stray is not None:
            _LOGGER.error(
                "Received a data set fragment on presentation context %d, its command on %d",
                *stray,
            )
            dimse.dul.event_queue.put("Evt19")
            return
        try:
            receive_primitive(primitive)
        except Exception as exc:
            _LOGGER.error("Received an invalid DIMSE message: %s: %s", type(exc).__name__, exc)
            dimse.dul.event_queue.put("Evt19")

    return receive


def _stray_data_set_fragment(message: Any, primitive: Any) -> tuple[int, int] | None:
    """(its context ID, the command's) for the first data-set fragment in the P-DATA
    *primitive* whose presentation context is not its command's, else None. *message* is
    the message being received (None between messages)."""
    command_context = getattr(message, "context_id", None)
    for context_id, data in getattr(primitive, "presentation_data_value_list", ()):
        if not data:
            continue
        if data[0] & 1:  # a command fragment; its last one names the message's context
            if data[0] & 2:
                command_context = context_id
        elif command_context is not None and context_id != command_context:
            return context_id, command_context
    return None


def _served_by_its_context(assoc: Any, serve_request: Any) -> Any:
    """*serve_request* (pynetdicom's), refusing with an A-ABORT a request its presentation
    context cannot carry.

    pynetdicom picks the service from the SOP class the command names, not from the
    context: a C-STORE naming Verification on a DX context got a C-ECHO answer (Success) and
    its data set was dropped; an N-ACTION on a DX context got a C-STORE answer. A C-STORE of
    another storage class still reaches the listener (0xA900, "SOP class differs from the
    presentation context"), and a C-ECHO is answered on any context, as peers expect.
    """

    def serve(message: Any, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if context is not None and not _fits_its_context(message, str(context.abstract_syntax)):
            _LOGGER.error(
                "%s naming SOP class %s on the presentation context of %s: aborted",
                type(message).__name__.replace("_", "-"),
                _named_class(message),
                context.abstract_syntax,
            )
            _delete_data_set_file(message)
            assoc.abort()
            return
        serve_request(message, context_id)

    return serve


def _named_class(message: Any) -> str:
    named = getattr(message, "AffectedSOPClassUID", None)
    if named is None:
        named = getattr(message, "RequestedSOPClassUID", None)
    return str(named or "")


def forget_service_classes() -> None:
    """Look service classes up afresh (after classes were registered with pynetdicom)."""
    _is_storage_class.cache_clear()


@functools.lru_cache(maxsize=512)
def _is_storage_class(uid: str) -> bool:
    # pynetdicom scans its tables of classes for each lookup: once per class, not per C-STORE.
    return uid_to_service_class(uid) is StorageServiceClass


def _fits_its_context(message: Any, abstract_syntax: str) -> bool:
    if isinstance(message, C_ECHO):
        return True
    named = _named_class(message)
    if isinstance(message, C_STORE):
        return _is_storage_class(named)
    return named == abstract_syntax and not _is_storage_class(abstract_syntax)


#: Requests of our own side as the acceptor (PS3.8 9.2): association answer, P-DATA,
#: release, abort.
_LOCAL_REQUESTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
#: Idle, or waiting for the transport connection to close: the association has ended.
_ENDED_STATES = frozenset({"Sta1", "Sta13"})


def _after_the_end_ignored(machine: Any, do_action: Any) -> Any:
    """*do_action* (the DUL state machine's), dropping a request of our own side that comes
    after the association ended: a C-STORE answered while an abort was under way.

    pynetdicom's state table has no action for a P-DATA request once the association was
    aborted (Sta13); the InvalidEventError it raised killed the DUL thread, and the
    association was never closed out. There is no one left to answer.
    """

    def act(event: str) -> None:
        if event in _LOCAL_REQUESTS and machine.current_state in _ENDED_STATES:
            _LOGGER.debug("%s dropped: the association has ended", event)
            return
        do_action(event)

    return act


def _spool_target(dul: Any) -> SpoolTempFile | None:
    """The spool file of the C-STORE data set this association is receiving, if any."""
    message = dul.assoc.dimse.message
    target = getattr(message, "_data_set_file", None) if message is not None else None
    if isinstance(target, SpoolTempFile) and target.is_open:
        return target
    return None


class _InvalidPdu(ValueError):
    """A PDU that cannot be decoded (pynetdicom's Evt19)."""


class _TlsRecord(_InvalidPdu):
    """A TLS record (a ClientHello) where a PDU would start: a TLS client on a plain port."""


class _ClosedBetweenPdus(EOFError):
    """The peer closed the connection where a PDU would start: the normal end."""


def read_pdu_data(dul: Any) -> None:
    """Read one PDU for *dul* (a ``DULServiceProvider``): pynetdicom's ``_read_pdu_data``,
    with the P-DATA-TF fast path described in the module docstring."""
    try:
        event, pdu = _read_pdu(dul)
    except _ClosedBetweenPdus:
        _no_request_coming(dul)
        dul.event_queue.put("Evt17")
        return
    except (OSError, TimeoutError, EOFError) as exc:
        # After an invalid PDU (a TLS ClientHello on this plain port), the peer's reset is
        # part of the same failure, already logged once.
        level = logging.DEBUG if getattr(dul, "_triage_invalid_pdu", False) else logging.ERROR
        _LOGGER.log(level, "Connection closed before the entire PDU was received: %s", exc)
        _no_request_coming(dul)
        dul.event_queue.put("Evt17")  # transport connection closed
        return
    except ValueError as exc:
        if getattr(dul, "_triage_invalid_pdu", False):
            # The rest of what a peer sent after an invalid PDU, read six bytes at a time,
            # is more of the same: a TLS ClientHello gave a dozen ERROR lines, none naming
            # the peer.
            _LOGGER.debug("Unable to decode the received PDU data: %s", exc)
        elif isinstance(exc, _TlsRecord):
            get_logger("triage.listener").warning(
                "tls_client_on_plain_port",
                peer_host=str(dul.assoc.requestor.address),
                hint="the peer sent TLS to this plain DICOM port: turn TLS off on the peer,"
                " or set [dicom] tls = true here",
            )
        else:
            _LOGGER.error("Unable to decode the received PDU data: %s", exc)
        dul._triage_invalid_pdu = True
        _no_request_coming(dul)
        dul.event_queue.put("Evt19")  # invalid or unrecognised PDU
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _no_request_coming(dul: Any) -> None:
    """Tell the association's thread, waiting for the A-ASSOCIATE-RQ, that none will come.

    A peer that connects and closes (a port check, a load balancer's probe, a TLS client on
    the plain port) ended the connection, yet the thread waited out the whole ACSE timeout
    holding one of ``max_associations`` slots, invisible in the association gauge (no
    request, no audit row). pynetdicom takes None from that wait as its timeout.
    """
    if dul.state_machine.current_state == "Sta2":  # connected, awaiting the request
        dul.to_user_queue.put(None)


def _read_pdu(dul: Any) -> tuple[str, Any]:
    """The next PDU and its state-machine event; raises OSError/EOFError when the connection
    fails, ValueError when the PDU is invalid."""
    sock = dul.socket
    header = sock.recv(6)
    if not header:
        raise _ClosedBetweenPdus
    if len(header) < 6:
        raise EOFError(f"connection closed inside a PDU header ({len(header)} of 6 bytes)")
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in _PDU_TYPES:
        if header[:2] == b"\x16\x03":  # a TLS handshake record, version 3.x
            raise _TlsRecord("a TLS handshake record")
        raise _InvalidPdu(f"unknown PDU type 0x{pdu_type:02X}")
    if pdu_length > LARGEST_ACCEPTED_PDU:
        raise _InvalidPdu(f"a PDU of {pdu_length} bytes, more than {LARGEST_ACCEPTED_PDU}")
    target = _spool_target(dul) if pdu_type == _P_DATA_TF else None
    if target is not None and _can_splice(sock.socket):
        return "Evt10", _splice_data_set_payloads(dul, sock, pdu_length, target)
    if target is not None and pdu_length <= LARGEST_BUFFERED_PDU:
        buffer = getattr(dul, "_triage_pdu_buffer", None)
        if buffer is None or len(buffer) < pdu_length:
            buffer = dul._triage_pdu_buffer = bytearray(max(pdu_length, 1 << 17))
        received = sock.recv_into(buffer, pdu_length)
        if received != pdu_length:
            raise EOFError(f"PDU shorter than announced ({received} of {pdu_length} bytes)")
        return "Evt10", _split_data_set_payloads(buffer, pdu_length, target)
    bytestream = header + _recv_exactly(sock, pdu_length)
    if pdu_type == _A_ASSOCIATE_RQ:
        bytestream, skipped = without_unknown_user_sub_items(bytestream)
        if skipped:
            _LOGGER.warning(
                "Ignored User Information sub-items of unknown type: %s",
                ", ".join(f"0x{kind:02X}" for kind in skipped),
            )
    try:
        pdu, event = dul._decode_pdu(bytestream)
        if pdu_type == _A_ASSOCIATE_RQ:
            # The state machine converts it (AE-6) unguarded: a presentation context of even
            # ID raised there and killed the DUL thread, the peer left without an answer.
            pdu.to_primitive()
    except Exception as exc:
        raise _InvalidPdu(f"{type(exc).__name__}: {exc}") from exc
    return event, pdu


def _can_splice(sock: Any) -> bool:
    # TLS data must be decrypted in user space; splice(2) is Linux only.
    return _HAS_SPLICE and isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)


def _pipe_of(dul: Any) -> tuple[int, int]:
    """The association's pipe for splice(2), made on first use, closed with the DUL."""
    pipe = getattr(dul, "_triage_pipe", None)
    if pipe is None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        widen_pipe(write_end, PIPE_SIZE)  # a bigger pipe means fewer system calls
        pipe = dul._triage_pipe = (read_end, write_end)
        weakref.finalize(dul, _close_fds, read_end, write_end)
    return pipe


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: How much of a PDU other than a data set's is read at once.
_CHUNK = 256 * 1024


def _recv_exactly(sock: FastAssociationSocket, count: int) -> bytearray:
    # Grown as the bytes arrive, not allocated from the length the header announces: any
    # peer, before it is even associated, could otherwise make each connection cost 8 MiB.
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), _CHUNK))
        if not chunk:
            raise EOFError(f"connection closed ({len(data)} of {count} bytes)")
        data += chunk
    return data


def _splice_data_set_payloads(
    dul: Any, sock: FastAssociationSocket, length: int, target: SpoolTempFile
) -> P_DATA_TF:
    """Like :func:`_split_data_set_payloads`, reading the PDU body from the socket: the
    item headers and command PDVs with ``recv``, each data-set payload moved by splice(2)
    from the socket through a pipe into *target* — the bytes never enter user space."""
    raw = sock.socket
    assert raw is not None
    items: list[PresentationDataValueItem] = []
    offset = 0
    while offset < length:
        if offset + 6 > length:
            raise ValueError("truncated presentation data value item")
        head = _recv_exactly(sock, 6)
        item_length, context_id, control = struct.unpack(">LBB", head)
        end = offset + 4 + item_length
        if item_length < 2 or end > length:
            raise ValueError(f"invalid presentation data value item length {item_length}")
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        if control & 1:  # command fragment: pynetdicom decodes it
            item.presentation_data_value = bytes(head[5:6]) + bytes(
                _recv_exactly(sock, item_length - 2)
            )
        else:
            _splice_into(raw, _pipe_of(dul), target, item_length - 2)
            item.presentation_data_value = bytes((control,))
        items.append(item)
        offset = end
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


def _splice_into(
    raw: socket.socket, pipe: tuple[int, int], target: SpoolTempFile, count: int
) -> None:
    """Move exactly *count* bytes from *raw* into *target* through *pipe*."""
    read_end, write_end = pipe
    source = raw.fileno()
    timeout = raw.gettimeout()
    while count:
        try:
            moved = os.splice(
                source, write_end, min(count, PIPE_SIZE), flags=_SPLICE_MOVE | _SPLICE_NONBLOCK
            )
        except BlockingIOError:
            if not readable(raw, timeout):
                raise TimeoutError("no data from the peer within the network timeout") from None
            continue
        if moved == 0:
            raise EOFError(f"connection closed with {count} bytes of the data set to come")
        target.append_from_pipe(read_end, moved)
        count -= moved


def _split_data_set_payloads(buffer: bytearray, length: int, target: SpoolTempFile) -> P_DATA_TF:
    """Write the data-set PDV payloads of a P-DATA-TF PDU body into *target*; the PDU
    pynetdicom gets instead (command PDVs whole, data-set PDVs as their control header)."""
    items: list[PresentationDataValueItem] = []
    view = memoryview(buffer)
    try:
        offset = 0
        while offset < length:
            if offset + 6 > length:
                raise ValueError("truncated presentation data value item")
            (item_length,) = struct.unpack_from(">L", buffer, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > length:
                raise ValueError(f"invalid presentation data value item length {item_length}")
            context_id = buffer[offset + 4]
            control = buffer[offset + 5]
            item = PresentationDataValueItem()
            item.presentation_context_id = context_id
            if control & 1:  # command fragment: pynetdicom decodes it
                item.presentation_data_value = bytes(view[offset + 5 : end])
            else:
                target.write(view[offset + 6 : end])
                item.presentation_data_value = bytes((control,))
            items.append(item)
            offset = end
    finally:
        view.release()
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


class SpoolTempFile:
    """The file pynetdicom writes a received data set into (the interface it uses: ``name``,
    ``write``, ``file.flush`` and ``close``), in the spool's temp folder, with early
    write-back."""

    def __init__(self, directory: str, prefix: str = "tmp") -> None:
        self._written = 0
        self._flushed = 0
        #: The first write that failed (a full disk, an I/O error): the rest of the data set
        #: is read and dropped, and the C-STORE is answered 0xA700 (see :func:`write_error`).
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment
        self._fd: int | None = None
        try:
            self._fd, self.name = _mkstemp(directory, prefix)
        except OSError as exc:
            # A read-only spool, no inode left: raised here, in the DUL thread, it was taken
            # for an invalid message and the association aborted; the PACS never got 0xA700.
            # The data set is read and dropped as after a failed write, under a name no file
            # has, and the C-STORE is answered "out of resources".
            self.name = os.path.join(directory, f"unwritable-{uuid.uuid4().hex}.dcm")
            self._failed(exc)

    def write(self, data: Any) -> int:
        """Write all of *data*; every WRITEBACK_STEP bytes, start writing back to disk."""
        view = memoryview(data)
        size = len(view)
        if self.error is not None:
            return size
        assert self._fd is not None
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._failed(exc)
            return size
        self._account(size)
        return size

    def append_from_pipe(self, pipe: int, count: int) -> None:
        """Move *count* bytes from the pipe *pipe* to the end of the file (splice(2))."""
        left = count
        while left and self.error is None:
            assert self._fd is not None
            try:
                moved = os.splice(pipe, self._fd, left, flags=_SPLICE_MOVE)
            except OSError as exc:
                self._failed(exc)
                break
            if moved == 0:
                raise OSError("pipe emptied before the data were written")
            left -= moved
        while left:  # what the file did not take: out of the pipe, so the message goes on
            left -= len(os.read(pipe, min(left, 1 << 20)))
        if self.error is None:
            self._account(count)

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        _WRITE_ERRORS[self.name] = exc

    def _account(self, size: int) -> None:
        self._written += size
        if _start_writeback and self._written - self._flushed >= WRITEBACK_STEP:
            _start_writeback(
                self._fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE
            )
            self._flushed = self._written

    def flush(self) -> None:
        """Nothing to do: writes go straight to the file descriptor."""

    @property
    def is_open(self) -> bool:
        """True until :meth:`close`."""
        return self._fd is not None

    def close(self) -> None:
        """Close the descriptor (pynetdicom then deletes the name)."""
        _WRITE_ERRORS.pop(self.name, None)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


#: Temp file name → the write that failed on it, until the file is closed.
_WRITE_ERRORS: dict[str, OSError] = {}


def write_error(path: str | os.PathLike[str] | None) -> OSError | None:
    """The error a received data set's spool temp file got while it was written, if any
    (the bytes after it were dropped: the file is not the data set)."""
    return None if path is None else _WRITE_ERRORS.get(os.fspath(path))


def _mkstemp(directory: str, prefix: str = "tmp") -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=prefix, suffix=".dcm", dir=directory)


def install_spool_temp_files(temp_dir: Path, prefix: str = "tmp") -> None:
    """Make pynetdicom write received data sets as :class:`SpoolTempFile` in *temp_dir*,
    named ``<prefix>*.dcm``: a prefix of its own lets whoever started this process remove
    what it was receiving should it die (see ListenerPool)."""
    directory = str(temp_dir)

    def factory(*_args: Any, **_kwargs: Any) -> SpoolTempFile:
        return SpoolTempFile(directory, prefix)

    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]
    _delete_data_sets_after_each_request()


def _delete_data_set_file(message: Any) -> None:
    """Delete the temp file a C-STORE request's data set was written to, if any."""
    data_set_file = getattr(message, "_dataset_file", None)
    if data_set_file is not None:
        with contextlib.suppress(OSError):
            data_set_file.close()
        with contextlib.suppress(OSError):
            os.unlink(data_set_file.name)


def _delete_data_sets_after_each_request() -> None:
    """Delete a C-STORE's temp file when pynetdicom has finished with the request.

    pynetdicom deletes it only in its Storage service. A C-STORE that goes anywhere else (its
    command names Verification, it arrives during release, its context was not accepted) left
    the file in the spool's temp folder until the hourly sweep. By the time the request
    returns an accepted file is linked into the spool under its own name, so the temp name
    can always go.
    """
    original = association_module.Association._serve_request
    if getattr(original, "_deletes_data_sets", False):
        return

    def serve_request(self: Any, msg: Any, context_id: int) -> None:
        try:
            original(self, msg, context_id)
        finally:
            _delete_data_set_file(msg)

    serve_request._deletes_data_sets = True  # type: ignore[attr-defined]
    association_module.Association._serve_request = serve_request  # type: ignore[method-assign]
