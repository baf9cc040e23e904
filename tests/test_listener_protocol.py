"""The listener against peers that break the DICOM upper layer or DIMSE protocol.

Every case gets an A-ABORT (or an error status), the association's audit row is closed, no
temp file stays in the spool, no thread dies with a traceback, and the daemon goes on. The
messages are built with pynetdicom's own encoders, then broken on purpose.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from tests.peers import echoscu, wait_until
from triage.testing.synth import make_study, write_study

DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
_A_ABORT = 0x07


def _command(**fields: object) -> bytes:
    """A command set (implicit VR little endian) with its group length."""
    command = Dataset()
    for keyword, value in fields.items():
        setattr(command, keyword, value)
    encoded = DicomBytesIO()
    encoded.is_implicit_VR = True
    encoded.is_little_endian = True
    write_dataset(encoded, command)
    body = encoded.getvalue()
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _dx_data_set(folder: Path, seed: int) -> tuple[Dataset, bytes]:
    """A synthetic DX view written to *folder*, and its data set as Explicit VR Little Endian
    bytes, as a peer sends it."""
    dataset = make_study(modality="DX", views=1, rows=32, cols=32, seed=seed)[0]
    [path] = write_study([dataset], folder)
    encoded = DicomBytesIO()
    encoded.is_implicit_VR = False
    encoded.is_little_endian = True
    write_dataset(encoded, pydicom.dcmread(path))
    return dataset, encoded.getvalue()


def _store_command(sop_instance_uid: str, sop_class_uid: str = "", **fields: object) -> bytes:
    """A C-STORE-RQ command set (message 1, a data set follows unless *fields* say not)."""
    return _command(
        **{
            "CommandField": 0x0001,
            "MessageID": 1,
            "Priority": 0,
            "CommandDataSetType": 0,
            "AffectedSOPClassUID": sop_class_uid or DX,
            "AffectedSOPInstanceUID": sop_instance_uid,
            **fields,
        }
    )


def _send_pdv(  # type: ignore[no-untyped-def]
    assoc, context_id: int, control: int, data: bytes
) -> None:
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, bytes([control]) + data]]
    assoc.dul.send_pdu(pdata)


def _pause(assoc) -> None:  # type: ignore[no-untyped-def]
    """Hold the association's reactor, which would take an answer for an unexpected
    message: the test reads it with ``assoc.dimse.get_msg``."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)


def _association_request(context_id: int) -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "ROUTER"
    request.called_ae_title = "TRIAGE"
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    request.user_information = [length, implementation]
    context = build_context(DX, [EXPLICIT])
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    encoded = bytearray(pdu.encode())
    # pynetdicom refuses to build an even ID: set it in the encoded item (type 0x20, after
    # the 74 bytes of the fixed fields; the ID follows the item's type, reserved and length).
    item = encoded.index(b"\x20\x00", 74)
    encoded[item + 4] = context_id
    return bytes(encoded)


def _answer_type(port: int, data: bytes) -> int | None:
    """The type of the first PDU the daemon answers *data* with (None: it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
        with contextlib.suppress(OSError):  # it stopped reading: the answer is what counts
            peer.sendall(data)
        answer = peer.recv(6)
    return answer[0] if answer else None


def _audit_closed(daemon) -> bool:  # type: ignore[no-untyped-def]
    return all(row.ended_at is not None for row in daemon.store().associations(100))


def _spool_temp(daemon) -> list[Path]:  # type: ignore[no-untyped-def]
    return list((Path(daemon.sections["store"]["spool_dir"]) / "tmp").iterdir())


def _daemon(daemon_factory):  # type: ignore[no-untyped-def]
    # Short timeouts: an aborted association is closed out when its ARTIM timer expires.
    return daemon_factory({"dicom": {"network_timeout_s": 3, "acse_timeout_s": 3}}).start()


def _check_unharmed(daemon) -> None:  # type: ignore[no-untyped-def]
    wait_until(lambda: _audit_closed(daemon), timeout=60, message="audit rows closed")
    assert _spool_temp(daemon) == []
    assert echoscu(daemon.port).returncode == 0
    assert "Exception in thread" not in daemon.log_text()
    assert "thread_died" not in daemon.log_text()
    assert daemon.stop() == 0


def test_a_c_store_command_without_its_uids_is_aborted_and_closed_out(
    daemon_factory, tmp_path
) -> None:
    """pynetdicom reads the command's AffectedSOPInstanceUID (and class, and the context)
    unchecked when it writes data sets to files: the KeyError killed the association's DUL
    thread, the peer got nothing, the audit row stayed ACTIVE and the temp file stayed."""
    daemon = _daemon(daemon_factory)
    dataset, data = _dx_data_set(tmp_path / "in", seed=3)
    broken = [
        {"AffectedSOPClassUID": DX},  # no AffectedSOPInstanceUID
        {"AffectedSOPInstanceUID": str(dataset.SOPInstanceUID)},  # no AffectedSOPClassUID
    ]
    for fields in broken:
        ae = AE(ae_title="ROUTER")
        ae.add_requested_context(DX, EXPLICIT)
        assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        command = _command(
            CommandField=0x0001, MessageID=1, Priority=0, CommandDataSetType=0, **fields
        )
        _send_pdv(assoc, context_id, 0x03, command)
        _send_pdv(assoc, context_id, 0x02, data)
        wait_until(lambda a=assoc: a.is_aborted, timeout=20, message="the daemon's A-ABORT")
    _check_unharmed(daemon)


def test_an_association_request_with_an_even_context_id_is_aborted_at_once(
    daemon_factory,
) -> None:
    # PS3.8 9.3.2.2: context IDs are odd. pynetdicom's AE-6 raised on it in the DUL thread:
    # no answer at all, and the connection held until the ACSE timeout.
    daemon = _daemon(daemon_factory)
    started = time.monotonic()
    assert _answer_type(daemon.port, _association_request(context_id=2)) == _A_ABORT
    assert time.monotonic() - started < 5
    assert _answer_type(daemon.port, _association_request(context_id=1)) == 0x02  # A-ASSOCIATE-AC
    _check_unharmed(daemon)


def _with_user_sub_item(request: bytes, kind: int, value: bytes) -> bytes:
    """*request* with a sub-item of type *kind* added to its User Information item (last)."""
    item = request.rindex(b"\x50\x00")
    length = struct.unpack_from(">H", request, item + 2)[0]
    assert item + 4 + length == len(request)
    sub_item = struct.pack(">BBH", kind, 0, len(value)) + value
    body = request[6:item] + struct.pack(">BBH", 0x50, 0, length + len(sub_item))
    body += request[item + 4 :] + sub_item
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def test_an_association_request_with_an_unknown_user_information_sub_item_is_accepted(
    daemon_factory,
) -> None:
    """pynetdicom raised on a sub-item type outside PS3.7 Annex D (a vendor's or a newer
    standard's): the PACS was aborted before its first C-STORE. DCMTK skips such a
    sub-item; so does the listener, and says so in its log."""
    daemon = _daemon(daemon_factory)
    request = _with_user_sub_item(_association_request(context_id=1), 0x5E, b"vendor")
    assert _answer_type(daemon.port, request) == 0x02  # A-ASSOCIATE-AC
    wait_until(
        lambda: "sub-items of unknown type: 0x5E" in daemon.log_text(),
        timeout=20,
        message="the skipped sub-item logged",
    )
    _check_unharmed(daemon)


def test_a_pdu_announcing_gigabytes_is_aborted_before_it_is_read(daemon_factory) -> None:
    """Any host, before its AE title is checked, made the listener buffer what the length
    field announced as it arrived (600 MiB sent: 600 MiB more resident)."""
    daemon = _daemon(daemon_factory)
    header = struct.pack(">BBL", 0x01, 0, 0xFFFFFF00)
    assert _answer_type(daemon.port, header + b"\0" * (1 << 20)) == _A_ABORT
    _check_unharmed(daemon)


def test_a_second_command_before_the_data_set_is_aborted_and_closed_out(
    daemon_factory, tmp_path
) -> None:
    """pynetdicom aborts on the malformed message, while the C-ECHO it already took is
    answered: that P-DATA after the abort raised InvalidEventError in the DUL thread."""
    daemon = _daemon(daemon_factory)
    verification = "1.2.840.10008.1.1"
    dataset = make_study(modality="DX", views=1, rows=32, cols=32, seed=4)[0]
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(DX, EXPLICIT)
    ae.add_requested_context(verification, EXPLICIT)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert assoc.is_established
    ids = {str(c.abstract_syntax): c.context_id for c in assoc.accepted_contexts}
    store = _store_command(str(dataset.SOPInstanceUID))
    echo = _command(
        CommandField=0x0030,
        MessageID=2,
        CommandDataSetType=0x0101,
        AffectedSOPClassUID=verification,
    )
    _send_pdv(assoc, ids[DX], 0x03, store)
    _send_pdv(assoc, ids[verification], 0x03, echo)
    _send_pdv(assoc, ids[DX], 0x02, b"\x08\x00\x16\x00UI\x00\x00")
    wait_until(lambda: not assoc.is_established, timeout=20, message="the association ended")
    _check_unharmed(daemon)


def test_a_c_store_request_without_a_data_set_is_answered_c000_and_the_rest_go_in(
    daemon_factory, tmp_path
) -> None:
    daemon = _daemon(daemon_factory)
    dataset = make_study(modality="DX", views=1, rows=32, cols=32, seed=5)[0]
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(DX, EXPLICIT)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert assoc.is_established
    command = _store_command(  # no data set follows
        str(dataset.SOPInstanceUID), CommandDataSetType=0x0101
    )
    _pause(assoc)
    _send_pdv(assoc, assoc.accepted_contexts[0].context_id, 0x03, command)
    _, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assert response is not None
    assert response.Status == 0xC000
    assert response.ErrorComment == "C-STORE request without a data set"
    assoc.release()
    [path] = write_study([dataset], tmp_path / "in")
    from tests.peers import storescu

    assert storescu(daemon.port, [path]).acknowledged == 1
    _check_unharmed(daemon)


def test_a_request_its_presentation_context_cannot_carry_is_aborted(
    daemon_factory, tmp_path
) -> None:
    """pynetdicom serves a request by the SOP class its command names: a C-STORE naming
    Verification on the DX context was answered by a C-ECHO response (Success) and its
    data set dropped; an N-ACTION on the DX context got a C-STORE response."""
    daemon = _daemon(daemon_factory)
    dataset, data = _dx_data_set(tmp_path / "in", seed=6)
    requests = [
        (
            _store_command(str(dataset.SOPInstanceUID), "1.2.840.10008.1.1"),
            data,
        ),
        (
            _command(
                CommandField=0x0130,
                MessageID=2,
                CommandDataSetType=0x0101,
                RequestedSOPClassUID=DX,
                RequestedSOPInstanceUID=str(dataset.SOPInstanceUID),
                ActionTypeID=1,
            ),
            None,
        ),
    ]
    for command, data in requests:
        ae = AE(ae_title="ROUTER")
        ae.dimse_timeout = 10
        ae.add_requested_context(DX, EXPLICIT)
        assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        _pause(assoc)  # to see what the daemon answers, if anything
        _send_pdv(assoc, context_id, 0x03, command)
        if data is not None:
            _send_pdv(assoc, context_id, 0x02, data)
        _, answer = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert answer is None, answer  # an A-ABORT, not a response of another service
        wait_until(lambda a=assoc: not a.is_established, timeout=20, message="the A-ABORT")
    assert daemon.store().counts_by_state() == {}
    _check_unharmed(daemon)


def test_a_connection_closed_before_its_request_frees_its_slot_at_once(daemon_factory) -> None:
    """A port check or a load balancer's probe (connect, close), or a TLS client on the
    plain port, held one of max_associations for the whole ACSE timeout: PACS associations
    were refused ("local limit exceeded") while the association gauge read 0."""
    daemon = daemon_factory(
        {"dicom": {"max_associations": 1, "acse_timeout_s": 60, "network_timeout_s": 60}}
    ).start()
    client_hello = bytes.fromhex("160301002a0100002603030000")  # the start of a ClientHello
    for probe in (b"", client_hello):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as peer:
            peer.sendall(probe)
        started = time.monotonic()
        wait_until(
            lambda: echoscu(daemon.port).returncode == 0, timeout=20, message="the slot freed"
        )
        assert time.monotonic() - started < 15
    _check_unharmed(daemon)


def test_a_data_set_on_another_presentation_context_than_its_command_is_aborted(
    daemon_factory, tmp_path
) -> None:
    """PS3.7 6.3.1: a message's command and data set share one presentation context (DCMTK
    refuses "Presentation Contexts of Command and Data Differ"). pynetdicom wrote the data
    set on under File Meta naming the command's transfer syntax: an Explicit VR data set
    sent on the Implicit VR context was acknowledged and stored labelled Implicit VR."""
    daemon = _daemon(daemon_factory)
    implicit = "1.2.840.10008.1.2"
    dataset, data = _dx_data_set(tmp_path / "in", seed=7)
    half = len(data) // 2 & ~1
    command = _store_command(str(dataset.SOPInstanceUID))
    # The command on the Implicit VR context; both data-set fragments on the Explicit VR
    # one, or only the last of them.
    for stray_from in (0, 1):
        ae = AE(ae_title="ROUTER")
        ae.dimse_timeout = 10
        ae.add_requested_context(DX, implicit)
        ae.add_requested_context(DX, EXPLICIT)
        assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
        assert assoc.is_established
        ids = {str(c.transfer_syntax[0]): c.context_id for c in assoc.accepted_contexts}
        contexts = [ids[implicit] if n < stray_from else ids[EXPLICIT] for n in range(2)]
        _pause(assoc)
        _send_pdv(assoc, ids[implicit], 0x03, command)
        _send_pdv(assoc, contexts[0], 0x00, data[:half])
        _send_pdv(assoc, contexts[1], 0x02, data[half:])
        _, answer = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert answer is None, answer  # an A-ABORT, not a C-STORE response
        wait_until(lambda a=assoc: not a.is_established, timeout=20, message="the A-ABORT")
    assert daemon.store().counts_by_state() == {}
    assert "its command on" in daemon.log_text()
    _check_unharmed(daemon)
