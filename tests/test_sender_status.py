"""What the sender makes of a PACS's C-STORE status, against a PACS answering each one.

DCMTK's storescp cannot be told which status to answer, so the PACS here is a pynetdicom
server over TCP. PS3.7 Annex C's general warnings (0x0001, 0x0107, 0x0116) mean the object
was stored, like the storage warnings 0xBxxx; 0x0213 (resource limitation) means try later.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from sqlalchemy import update

from tests.peers import free_port
from tests.test_admin import SC_CLASS, SR_CLASS, sender_site
from tests.test_outbox import delivering_study
from triage.dicom.sender import Sender
from triage.store.db import make_engine, upgrade_schema
from triage.store.models import Delivery, DeliveryState, utcnow
from triage.store.outbox import Outbox
from triage.store.repository import Store


@pytest.fixture(autouse=True)
def _no_triage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config under test, not this shell's TRIAGE_ overrides."""
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)


def _pacs(
    port: int,
    on_store: Callable[[evt.Event], int] | None = None,
    transfer_syntaxes: list[str] | None = None,
):  # type: ignore[no-untyped-def]
    """A PACS for SRs and SCs on *port* (in the transfer syntaxes given, else pynetdicom's
    defaults), answering each C-STORE with the status *on_store* returns."""
    pacs = AE(ae_title="PACS")
    for sop_class in (SR_CLASS, SC_CLASS):
        if transfer_syntaxes:
            pacs.add_supported_context(sop_class, transfer_syntaxes)
        else:
            pacs.add_supported_context(sop_class)
    handlers = [(evt.EVT_C_STORE, on_store)] if on_store else []
    return pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)


def _one_round(
    tmp_path: Path,
    port: int,
    server,
    ready: Callable[[Store, str], None] | None = None,
    timeout_s: float | None = None,
) -> list[Delivery]:  # type: ignore[no-untyped-def]
    """One sender round for a study's SR and SC to the PACS on *port* (*server*, shut down
    after it); *ready* sees the store and the study first; ``[delivery] timeout_s`` is
    *timeout_s* when given. The study's deliveries after it."""
    _path, config, store, spool, study_uid = sender_site(tmp_path, {"port": port})
    if timeout_s is not None:
        delivery = dataclasses.replace(config.delivery, timeout_s=timeout_s)
        config = dataclasses.replace(config, delivery=delivery)
    if ready is not None:
        ready(store, study_uid)
    try:
        Sender(config, store, spool).deliver_once(config.destinations[0])
        return [delivery for delivery, _ in Outbox(store).deliveries(study_uid)]
    finally:
        server.shutdown()
        store.engine.dispose()


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, DeliveryState.DONE),
        (0xB000, DeliveryState.DONE),
        (0x0001, DeliveryState.DONE),
        (0x0107, DeliveryState.DONE),
        (0x0116, DeliveryState.DONE),
        (0x0111, DeliveryState.DONE),  # duplicate SOP instance: the PACS holds it already
        (0x0213, DeliveryState.PENDING),  # retried later
        (0xA700, DeliveryState.PENDING),
        (0xC000, DeliveryState.FAILED),
    ],
    ids=lambda value: f"0x{value:04X}" if isinstance(value, int) else value.value,
)
def test_the_pacs_status_decides_delivered_retried_or_failed(
    tmp_path: Path, status: int, expected: DeliveryState
) -> None:
    port = free_port()
    deliveries = _one_round(tmp_path, port, _pacs(port, lambda _e: status))
    assert {delivery.state for delivery in deliveries} == {expected}


def test_stop_bounds_the_whole_wait_not_each_destination(
    tmp_path: Path,
) -> None:
    """Two PACSs that take a C-STORE and never answer it: stop(timeout) returns after about
    *timeout* in all, not *timeout* per destination (a few of them went past systemd's
    TimeoutStopSec), and the deliveries stay due for the next start."""
    import threading
    import time

    from tests.peers import wait_until

    release = threading.Event()
    entered: list[str] = []

    def hang(event: evt.Event) -> int:
        entered.append(event.assoc.acceptor.ae_title)
        release.wait(30)
        return 0xA700

    ports = [free_port(), free_port()]
    servers = [_pacs(port, hang) for port in ports]
    _path, config, store, spool, study_uid = sender_site(
        tmp_path, {"port": ports[0]}, {"name": "archive", "port": ports[1]}
    )
    engine = store.engine
    sender = Sender(config, store, spool)
    try:
        sender.start()
        wait_until(lambda: len(entered) == 2, message="both PACSs holding a C-STORE")
        started = time.monotonic()
        sender.stop(timeout=2.0)
        stopped_after = time.monotonic() - started
    finally:
        release.set()
        for server in servers:
            server.shutdown()
    try:
        wait_until(lambda: not sender.alive() and not any(t.is_alive() for t in sender._threads))
        states = {delivery.state for delivery, _ in Outbox(store).deliveries(study_uid)}
    finally:
        engine.dispose()
    assert stopped_after < 3.5  # one 2 s bound, not 2 s per destination
    assert states == {DeliveryState.PENDING}


def test_what_became_due_just_before_the_stop_is_sent_before_the_sender_ends(
    tmp_path: Path,
) -> None:
    """The daemon stops the sender after the worker's grace: results finished in it are due
    when the stop comes, and a sender woken for them but stopped before its next round (the
    stop wakes it too) left them for the next start. It makes one round after the stop."""
    import time
    from datetime import timedelta

    from sqlalchemy import update

    from triage.store.models import Delivery, utcnow

    stored: list[str] = []

    def store_it(event: evt.Event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    port = free_port()
    server = _pacs(port, store_it)
    _path, config, store, spool, study_uid = sender_site(tmp_path, {"port": port})
    engine = store.engine

    def due_at(when: object) -> None:
        store.transaction(
            lambda session: session.execute(update(Delivery).values(next_attempt_at=when))
        )

    sender = Sender(config, store, spool)
    try:
        due_at(utcnow() + timedelta(hours=1))
        sender.start()
        time.sleep(0.5)  # its first round found nothing due: it waits to be woken
        due_at(utcnow() - timedelta(seconds=1))
        sender.stop(timeout=30)
        assert not sender.alive()
        states = {delivery.state for delivery, _ in Outbox(store).deliveries(study_uid)}
    finally:
        server.shutdown()
        engine.dispose()
    assert states == {DeliveryState.DONE}
    assert len(stored) == 2  # the SR and the SC


def test_a_cancel_during_a_batch_stops_the_objects_not_yet_sent(
    tmp_path: Path,
) -> None:
    """`triage-admin cancel` (a wrong patient's results) while the sender works through a
    claimed batch: the rest of the batch no longer follows the object in flight."""
    from triage.store.operations import cancel

    port = free_port()
    stored: list[str] = []
    holder: dict[str, object] = {}

    def store_then_cancel(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if len(stored) == 1:  # the operator cancels while the first object is sent
            cancel(holder["store"], holder["study"], "wrong patient")  # type: ignore[arg-type]
        return 0x0000

    deliveries = _one_round(
        tmp_path,
        port,
        _pacs(port, store_then_cancel),
        lambda store, study: holder.update(store=store, study=study),
    )
    assert len(deliveries) > 1 and len(stored) == 1
    assert {d.state for d in deliveries} == {DeliveryState.CANCELLED}
    # The one in flight reached the PACS: the store says so, for whoever must remove it.
    [sent] = [d for d in deliveries if d.delivered_at is not None]
    assert sent.last_error.startswith("acknowledged after it was cancelled")


def test_a_pacs_refusing_only_the_transfer_syntax_is_told_apart(
    tmp_path: Path,
) -> None:
    # "stores none of the SOP classes" sent the engineer to the wrong setting.
    port = free_port()
    jpeg_lossless_only = _pacs(port, transfer_syntaxes=["1.2.840.10008.1.2.4.70"])
    deliveries = _one_round(tmp_path, port, jpeg_lossless_only)
    assert {d.state for d in deliveries} == {DeliveryState.FAILED}
    error = deliveries[0].last_error
    assert "stores none of the SOP classes offered" in error
    assert "Secondary Capture Image Storage in any transfer syntax offered (" in error
    assert "Explicit VR Little Endian" in error


def test_a_pacs_aborting_at_the_c_store_is_told_apart_from_a_timeout(tmp_path: Path) -> None:
    """Orthanc aborts the association at the first C-STORE from a calling AE title it does
    not know; "no response (timeout or aborted association)" sent the engineer to the
    network. Both are retried (an abort can be an overloaded PACS)."""
    import time

    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0x0000

    port = free_port()
    started = time.monotonic()
    deliveries = _one_round(tmp_path, port, _pacs(port, abort), timeout_s=30)
    assert time.monotonic() - started < 20  # the abort was seen, not waited out
    assert {d.state for d in deliveries} == {DeliveryState.PENDING}
    [tried] = [d for d in deliveries if d.attempts == 1]
    error = tried.last_error
    assert error.startswith("the peer ended the association during the C-STORE"), error
    assert "calling AE title it does not know (TRIAGE)" in error
    # The objects after it were never sent: no attempt is counted against them (a slow or
    # aborting first object used to take its whole batch to max_attempts, and FAILED).
    untried = [d for d in deliveries if d is not tried]
    assert untried and all(d.attempts == 0 for d in untried)
    assert {d.last_error for d in untried} == {"association ended before it was sent"}


def test_a_pacs_that_never_answers_the_c_store_is_a_timeout(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    def hang(event: evt.Event) -> int:
        release.wait(30)
        return 0x0000

    port = free_port()
    server = _pacs(port, hang)
    try:
        deliveries = _one_round(tmp_path, port, server, timeout_s=1.5)
    finally:
        release.set()
    assert {d.state for d in deliveries} == {DeliveryState.PENDING}
    assert deliveries[0].last_error == (
        "no response to the C-STORE within 1.5 s ([delivery] timeout_s)"
    )


def test_a_batch_that_outlasts_its_lease_is_not_sent_twice(tmp_path: Path, store_url: str) -> None:
    """Two daemons on one store: while sender A works through its batch, the lease of the
    rest runs out and sender B claims it. A must leave those objects to B, not send them too."""
    port = free_port()
    _path, config, first_store, spool, _ = sender_site(tmp_path, {"port": port})
    first_store.engine.dispose()
    engine_a, engine_b = make_engine(store_url), make_engine(store_url)
    upgrade_schema(engine_a)
    store_a, store_b = Store(engine_a), Store(engine_b)
    study = delivering_study(store_a, destinations=("pacs",))
    [sr_id] = [d.id for d, o in Outbox(store_a).deliveries(study) if o.kind == "sr"]
    a, b = Sender(config, store_a, spool), Sender(config, store_b, spool)
    received: collections.Counter[str] = collections.Counter()
    b_in_flight, a_sent_sc = threading.Event(), threading.Event()
    other = threading.Thread(target=b.deliver_once, args=(config.destinations[0],))

    def on_store(event: evt.Event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        received[sop_class] += 1
        if sop_class == SR_CLASS:  # A's first object; meanwhile the rest's lease runs out
            with engine_a.begin() as connection:
                connection.execute(
                    update(Delivery)
                    .where(Delivery.state == DeliveryState.PENDING, Delivery.id != sr_id)
                    .values(next_attempt_at=utcnow() - timedelta(seconds=1))
                )
            other.start()  # the other daemon's sender claims it
            b_in_flight.wait(10)
        elif received[sop_class] == 1:  # B's C-STORE of the SC, in flight
            b_in_flight.set()
            a_sent_sc.wait(2)
        else:
            a_sent_sc.set()
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in (SR_CLASS, SC_CLASS):
        pacs.add_supported_context(sop_class)
    server = pacs.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        a.deliver_once(config.destinations[0])
        other.join(30)
        states = {d.state for d, _ in Outbox(store_a).deliveries(study)}
    finally:
        server.shutdown()
        engine_a.dispose()
        engine_b.dispose()
    assert received == {SR_CLASS: 1, SC_CLASS: 1}
    assert states == {DeliveryState.DONE}


def test_a_pacs_complaint_naming_the_patient_is_kept_without_the_name(tmp_path: Path) -> None:
    """The reason is logged, stored and shown by triage-admin: a PACS's ErrorComment that
    names the patient (it knows the object it refuses) must not carry that into them."""
    from pydicom.dataset import Dataset

    from tests.test_admin import PATIENT

    def refuse(event: evt.Event) -> Dataset:
        answer = Dataset()
        answer.Status = 0xC000
        answer.ErrorComment = f"ID {PATIENT['id']} is {PATIENT['name']} here"
        return answer

    port = free_port()
    deliveries = _one_round(tmp_path, port, _pacs(port, refuse))
    assert {d.state for d in deliveries} == {DeliveryState.FAILED}
    for delivery in deliveries:
        assert delivery.last_error == "status 0xC000: ID ... is ... here", delivery.last_error


def test_a_missing_outbox_file_fails_and_a_read_error_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file gone will not come back; EIO or ESTALE on a network spool may pass, and the
    study went FAILED on the first for an operator to retry by hand."""
    import errno

    from triage.dicom import sender as sender_module

    reads = sender_module.read_whole

    def read(path: Path) -> bytes:
        if path.name == "sc.dcm":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return reads(path)

    kinds: dict[int, str] = {}

    def remove_the_sr(store: Store, study_uid: str) -> None:
        kinds.update({d.id: o.kind for d, o in Outbox(store).deliveries(study_uid)})
        (tmp_path / "spool" / "outbox" / "sr.dcm").unlink()

    monkeypatch.setattr(sender_module, "read_whole", read)
    port = free_port()
    deliveries = _one_round(tmp_path, port, _pacs(port), ready=remove_the_sr)
    by_kind = {kinds[d.id]: d for d in deliveries}
    assert by_kind["sr"].state is DeliveryState.FAILED
    assert "No such file" in by_kind["sr"].last_error
    assert by_kind["sc"].state is DeliveryState.PENDING
    assert "Input/output error" in by_kind["sc"].last_error


def test_an_object_that_takes_longer_than_the_timeout_to_transfer_is_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow link (or a PACS that writes as it reads): the transfer of a large object (a
    parametric map of a detector-sized DX is ~30 MB) takes longer than ``[delivery]
    timeout_s``. pynetdicom counts its DIMSE timeout from before the first byte of the
    request is sent, so the sender gave up on a PACS that was taking every byte, and the
    same object failed every attempt, then for good."""
    import socket
    import time

    from pydicom import dcmread
    from pynetdicom import transport

    # Small socket buffers on both ends, so the PACS's reading paces the sender: on loopback
    # the kernel takes megabytes at once and would hide the slow link.
    create_socket = transport.AssociationSocket._create_socket

    def small_send_buffer(self, address):  # type: ignore[no-untyped-def]
        sock = create_socket(self, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        return sock

    monkeypatch.setattr(transport.AssociationSocket, "_create_socket", small_send_buffer)

    def slow_reader(_event: evt.Event) -> None:
        time.sleep(0.02)  # ~16 KB per PDU: under 1 MB/s

    def large_sc(_store: Store, _study_uid: str) -> None:
        path = tmp_path / "spool" / "outbox" / "sc.dcm"
        ds = dcmread(path)
        ds.add_new("PixelData", "OB", bytes(2 * 1024 * 1024))  # ~130 PDUs: ~3 s at its pace
        ds.save_as(path, enforce_file_format=True)

    port = free_port()
    pacs = AE(ae_title="PACS")
    pacs.maximum_pdu_size = 16384
    for sop_class in (SR_CLASS, SC_CLASS):
        pacs.add_supported_context(sop_class)
    server = pacs.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0x0000), (evt.EVT_PDU_RECV, slow_reader)],
    )
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    started = time.monotonic()
    deliveries = _one_round(tmp_path, port, server, ready=large_sc, timeout_s=1.5)
    assert time.monotonic() - started > 2.0  # the transfer did outlast the timeout
    assert {d.state for d in deliveries} == {DeliveryState.DONE}, [d.last_error for d in deliveries]


def _rejecting_peer(result: int, source: int, reason: int) -> tuple[int, Callable[[], None]]:
    """A peer on a free port answering every A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ of
    *result*, *source* and *reason* (PS3.8 9.3.4), then closing: (port, stop)."""
    import socket
    import struct

    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listening.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                pdu_type, _length = struct.unpack(">B1xI", connection.recv(6))
                assert pdu_type == 0x01  # A-ASSOCIATE-RQ
                connection.sendall(struct.pack(">B1xIBBBB", 0x03, 4, 0, result, source, reason))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        listening.close()

    return listening.getsockname()[1], stop


@pytest.mark.parametrize(
    ("rejection", "expected"),
    [
        ((0x01, 0x01, 0x03), DeliveryState.FAILED),  # calling AE title not recognised
        ((0x02, 0x01, 0x01), DeliveryState.PENDING),  # transient, no reason given
        # "Permanent", but for temporary congestion: DCMTK's storescp --fork and dcmqrscp
        # answer so when they cannot fork a process for the association (a loaded host).
        ((0x01, 0x03, 0x01), DeliveryState.PENDING),
        ((0x01, 0x03, 0x02), DeliveryState.PENDING),  # local limit exceeded
    ],
    ids=["calling-ae", "transient", "congestion", "local-limit"],
)
def test_a_rejected_association_fails_for_good_only_when_its_reason_lasts(
    tmp_path: Path, rejection: tuple[int, int, int], expected: DeliveryState
) -> None:
    port, stop = _rejecting_peer(*rejection)

    class Server:
        shutdown = staticmethod(stop)

    deliveries = _one_round(tmp_path, port, Server())
    assert {d.state for d in deliveries} == {expected}
    assert {d.last_error for d in deliveries} == {
        {
            (0x01, 0x01, 0x03): "association rejected permanently: calling AE title not recognised",
            (0x02, 0x01, 0x01): "association rejected transiently: no reason given",
            (0x01, 0x03, 0x01): "association rejected permanently: temporary congestion",
            (0x01, 0x03, 0x02): "association rejected permanently: local limit exceeded",
        }[rejection]
    }


def test_each_object_is_read_when_it_is_sent_not_the_whole_batch_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is up to 64 objects, and a parametric map of a detector-sized DX is ~30 MB: read
    whole before the association, a backlog (a PACS back after an outage) held a GB or two
    per destination in memory at once."""
    from triage.dicom import sender as sender_module

    reads = sender_module.read_whole
    read: list[str] = []
    read_before_each_store: list[int] = []

    def counting(path: Path) -> bytes:
        read.append(path.name)
        return reads(path)

    def store_it(_event: evt.Event) -> int:
        read_before_each_store.append(len(read))
        return 0x0000

    monkeypatch.setattr(sender_module, "read_whole", counting)
    port = free_port()
    deliveries = _one_round(tmp_path, port, _pacs(port, store_it))
    assert {d.state for d in deliveries} == {DeliveryState.DONE}
    assert read_before_each_store == [1, 2]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_destination_that_refuses_connections_logs_no_error_lines(level: str) -> None:
    """pynetdicom logged two ERROR lines per connection it could not make: a destination
    down for three minutes gave hundreds, paging whoever alerts on errors for an outage the
    sender retries and reports itself. They go to DEBUG (and at info level, nowhere)."""
    import json
    import subprocess
    import sys

    script = f"""
from pynetdicom.sop_class import Verification
from triage.dicom.polling_socket import RequestorAE
from triage.logs import configure_logging
configure_logging({level!r}, "json")
ae = RequestorAE(ae_title="TRIAGE")
ae.add_requested_context(Verification)
ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
assert not ae.associate("127.0.0.1", {free_port()}, ae_title="PACS").is_established
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] == "error"] == []
    refused = [r for r in records if "TCP Initialisation Error" in r["event"]]
    assert [r["level"] for r in refused] == (["debug"] if level == "debug" else [])


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_tls_destination_that_fails_its_handshake_logs_no_traceback(
    tmp_path: Path, level: str
) -> None:
    """pynetdicom logged each TLS failure of ours as an ERROR with a Python traceback, on
    top of its two connection-failure lines: a PACS whose certificate we do not trust gave
    one traceback per delivery attempt, for a failure the sender reports itself in one
    line (``delivery_failed``: "TLS: the peer's certificate failed verification: …")."""
    import json
    import subprocess
    import sys

    from tests.peers import Storescp
    from tests.test_listener import _make_pki

    pki = _make_pki(tmp_path / "pki")
    other = _make_pki(tmp_path / "other")  # a CA that did not sign the PACS's certificate
    pacs = Storescp(
        tmp_path / "pacs", extra=["+tls", str(pki["server.key"]), str(pki["server.pem"]), "-ic"]
    ).start()
    script = f"""
from pynetdicom.sop_class import Verification
from triage.config import DestinationConfig
from triage.dicom.polling_socket import RequestorAE
from triage.dicom.sender import _association_failure, associate, client_tls_context
from triage.logs import configure_logging
configure_logging({level!r}, "json")
ae = RequestorAE(ae_title="TRIAGE")
ae.add_requested_context(Verification)
ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
pacs = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port={pacs.port},
                         tls=True, tls_ca={str(other["ca.pem"])!r})
assoc, tls_error = associate(ae, "127.0.0.1", {pacs.port}, "PACS", client_tls_context(pacs))
print(_association_failure(assoc, tls_error))
"""
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    finally:
        pacs.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("TLS: the peer's certificate failed verification: "), run.stdout
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] == "error" or "exception" in r] == []
    if level == "debug":
        assert any("CERTIFICATE_VERIFY_FAILED" in r["event"] for r in records), records


def test_a_tls_destination_that_speaks_plain_dicom_is_not_called_unreachable(
    tmp_path: Path,
) -> None:
    """A destination set to ``tls = true`` whose port speaks plain DICOM (DCMTK closes the
    connection at the ClientHello): the connection was made and the peer answered, yet the
    delivery and `triage-admin echo` said "peer down or unreachable", sending whoever read
    it after the network instead of the destination's TLS setting."""
    from tests.peers import Storescp
    from tests.test_listener import _make_pki
    from triage.cli.admin import echo
    from triage.config import DestinationConfig
    from triage.dicom.sender import client_tls_context

    pki = _make_pki(tmp_path / "pki")
    pacs = Storescp(tmp_path / "pacs").start()  # no +tls
    try:
        destination = DestinationConfig(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port, tls=True,
            tls_ca=str(pki["ca.pem"]),
        )  # fmt: skip
        target = {"host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
        outcome = echo(target, "TRIAGE", 10, client_tls_context(destination))
    finally:
        pacs.stop()
    assert not outcome["ok"]
    assert outcome["error"].startswith("TLS: "), outcome
    assert "TLS handshake" in outcome["error"] and "plain DICOM" in outcome["error"], outcome
    assert "unreachable" not in outcome["error"], outcome
