"""The listener as a real process, driven by DCMTK echoscu/storescu."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.peers import (
    ACKNOWLEDGED,
    StoreRun,
    acknowledged_files,
    echoscu,
    free_port,
    skip_without_ipv6,
    storescu,
    storescu_background,
    wait_until,
    write_config,
)
from triage.store.db import make_engine
from triage.store.models import AssociationOutcome, StudyState
from triage.store.repository import Store
from triage.testing.synth import make_study, write_study

pytestmark = pytest.mark.timeout(240)


def study_files(
    folder: Path, views: int = 3, seed: int = 1, rows: int = 256, cols: int = 256, **kwargs
) -> list[Path]:
    """A synthetic CR/DX study written to *folder*."""
    datasets = make_study(views=views, seed=seed, rows=rows, cols=cols, **kwargs)
    return write_study(datasets, folder)


def same_study_more_views(files: list[Path], folder: Path, count: int) -> list[Path]:
    """Extra instances for the study of *files* (new SOP Instance UIDs): late arrivals."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 100 + n
        path = folder / f"late{n}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def rewrite(source: Path, target: Path, **changes) -> Path:
    """A copy of *source* with attributes changed (``None`` deletes)."""
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_echo_and_config_check(daemon_factory) -> None:
    daemon = daemon_factory().start()
    result = echoscu(daemon.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr
    wait_until(
        lambda: any(r.echoes == 1 for r in daemon.store().associations()),
        message="echo recorded in the association audit",
    )
    assert daemon.stop() == 0


def test_multi_view_study_is_stored_grouped_and_idempotent(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory().start()
    files = study_files(tmp_path / "in", views=3)
    run = storescu(daemon.port, files)
    assert run.acknowledged == 3, run.output
    store = daemon.store()
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    instances = store.study_instances(study_uid)
    assert len(instances) == 3
    spool = Path(daemon.sections["store"]["spool_dir"])
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    assert {i.sop_instance_uid for i in instances} == set(by_uid)
    for instance in instances:
        stored = pydicom.dcmread(spool / instance.path)
        source = pydicom.dcmread(by_uid[instance.sop_instance_uid])
        assert stored.PixelData == source.PixelData
        assert stored.PatientName == source.PatientName
    # The same study again: every instance acknowledged, nothing stored twice.
    again = storescu(daemon.port, files)
    assert again.acknowledged == 3
    assert len(store.study_instances(study_uid)) == 3
    audits = wait_until(
        lambda: (
            [a for a in store.associations() if a.outcome is AssociationOutcome.RELEASED][:2]
            if len([a for a in store.associations() if a.outcome is AssociationOutcome.RELEASED])
            >= 2
            else None
        ),
        message="both associations audited",
    )
    assert sorted((a.instances_stored, a.instances_duplicate) for a in audits) == [(0, 3), (3, 0)]
    # One of them again, filed under another study: acknowledged, and no file of it left
    # there (no row would name it; the spool recovery would make it a new study).
    moved = rewrite(
        files[0], tmp_path / "moved.dcm", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1"
    )
    assert storescu(daemon.port, [moved]).acknowledged == 1
    assert store.get_study("1.2.826.0.1.3680043.8.498.1") is None
    assert sorted(p.parent.name for p in spool.rglob("*.dcm")) == [study_uid] * 3
    assert daemon.stop() == 0


_LISTENER_RACING_A_PURGE = """
import sys
from triage.config import load_config
from triage.dicom.listener import Listener
from triage.store.db import make_engine, upgrade_schema
from triage.store.repository import Store
from triage.store.spool import Spool

config = load_config(sys.argv[1], env={})
spool = Spool(config.spool_path)
spool.prepare()
engine = make_engine(config.store.url)
upgrade_schema(engine)


class PurgedWhileRecording(Store):
    def record_instance(self, meta, association_id):
        # The purge of this study's finished revision commits while the row waits for the
        # store's lock: the file the listener adopted a moment ago is gone.
        spool.remove(meta.path)
        return super().record_instance(meta, association_id)


listener = Listener(config.dicom, PurgedWhileRecording(engine), spool)
listener.start()
print(listener.port, flush=True)
sys.stdin.read()
listener.stop(1.0)
"""


def _send_to_a_scripted_listener(
    tmp_path: Path, script: str, files: list[Path], extra: list[str] | None = None
) -> StoreRun:
    """storescu of *files* (with *extra* options) to a listener run by *script* in its own
    process (it patches pynetdicom), on an SQLite store and spool under *tmp_path*; the
    run's result."""
    config = write_config(
        tmp_path / "triage.toml",
        {
            "dicom": {"port": 0, "ae_title": "TRIAGE"},
            "store": {"url": f"sqlite:///{tmp_path / 'triage.db'}", "spool_dir": "spool"},
        },
    )
    listener = subprocess.Popen(
        [sys.executable, "-c", script, str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        return storescu(port, files, extra=["--no-halt", *(extra or [])])
    finally:
        assert listener.stdin is not None
        listener.stdin.close()
        listener.wait(timeout=30)


def test_an_instance_whose_file_a_purge_removes_while_it_is_recorded_is_kept(
    tmp_path: Path,
) -> None:
    """The PACS re-sends an instance of a study that the purge is removing at that moment:
    the file adopted before the row was written is linked again, not lost once acknowledged.
    The listener runs in its own process (it patches pynetdicom); only the interleaving is
    injected."""
    files = study_files(tmp_path / "in", views=2, rows=64, cols=64)
    run = _send_to_a_scripted_listener(tmp_path, _LISTENER_RACING_A_PURGE, files)
    assert run.acknowledged == 2, run.output
    spool = tmp_path / "spool"
    for path in files:
        ds = pydicom.dcmread(path)
        kept = spool / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        assert pydicom.dcmread(kept).SOPInstanceUID == ds.SOPInstanceUID


_LISTENER_LOSING_THE_COMMITS_ANSWER = _LISTENER_RACING_A_PURGE.replace(
    """        spool.remove(meta.path)
        return super().record_instance(meta, association_id)""",
    """        super().record_instance(meta, association_id)
        raise ConnectionError("server closed the connection unexpectedly")""",
)


def test_a_file_a_row_names_is_kept_when_the_commits_answer_is_lost(tmp_path: Path) -> None:
    """The row was written, then the store's answer was lost (or another association's copy
    of the instance, acknowledged meanwhile, kept this file): the PACS is told 0xA701, and
    the file stays, since a row names it. It was removed: a row with no file behind it."""
    assert _LISTENER_LOSING_THE_COMMITS_ANSWER != _LISTENER_RACING_A_PURGE
    files = study_files(tmp_path / "in", views=1, rows=64, cols=64)
    run = _send_to_a_scripted_listener(tmp_path, _LISTENER_LOSING_THE_COMMITS_ANSWER, files)
    assert run.acknowledged == 0 and run.failure_statuses == ["0xa701"], run.output
    ds = pydicom.dcmread(files[0])
    kept = tmp_path / "spool" / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(kept).SOPInstanceUID == ds.SOPInstanceUID


_LISTENER_HOLDING_A_THOUSAND_DESCRIPTORS = _LISTENER_RACING_A_PURGE.replace(
    "listener = Listener(config.dicom, PurgedWhileRecording(engine), spool)",
    """import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
listener = Listener(config.dicom, Store(engine), spool)""",
)


def test_a_listener_holding_over_a_thousand_descriptors_still_serves(tmp_path: Path) -> None:
    """The unit allows 65536 descriptors and [dicom] up to 1000 associations; pynetdicom
    polls each association's socket with select(2), which refuses a descriptor past 1024,
    and took the refusal for a closed connection: once the listener held a thousand
    descriptors, every association it accepted was dropped before its A-ASSOCIATE-RQ."""
    assert _LISTENER_HOLDING_A_THOUSAND_DESCRIPTORS != _LISTENER_RACING_A_PURGE
    files = study_files(tmp_path / "in", views=2, rows=512, cols=512)
    run = _send_to_a_scripted_listener(tmp_path, _LISTENER_HOLDING_A_THOUSAND_DESCRIPTORS, files)
    assert run.acknowledged == 2, run.output[-2000:]


_LISTENER_HANDLING_A_C_STORE_PAST_THE_CLOSE = _LISTENER_RACING_A_PURGE.replace(
    "listener = Listener(config.dicom, PurgedWhileRecording(engine), spool)",
    """import threading

closed = threading.Event()


class HandledAfterTheClose(Listener):
    # The peer sent a whole data set and went away before its answer: pynetdicom's DUL
    # thread reports the close while the association thread has yet to handle the C-STORE.
    def _on_store(self, event):
        closed.wait(60)
        return super()._on_store(event)

    def _on_closed(self, event):
        super()._on_closed(event)
        closed.set()


listener = HandledAfterTheClose(config.dicom, Store(engine), spool)""",
)


def test_an_instance_handled_after_its_association_closed_is_in_its_audit_row(
    tmp_path: Path,
) -> None:
    """A peer that sends a whole data set and goes away before the answer (storescu's DIMSE
    timeout here; a dropped connection, a killed sender) has the instance stored, after
    pynetdicom reported the close: its audit row said 0 stored (and so did
    triage_instances_received), and the instance's row named no association."""
    assert _LISTENER_HANDLING_A_C_STORE_PAST_THE_CLOSE != _LISTENER_RACING_A_PURGE
    files = study_files(tmp_path / "in", views=1, rows=64, cols=64)
    run = _send_to_a_scripted_listener(
        tmp_path, _LISTENER_HANDLING_A_C_STORE_PAST_THE_CLOSE, files, extra=["-td", "1", "-ta", "1"]
    )
    assert run.acknowledged == 0, run.output
    store = Store(make_engine(f"sqlite:///{tmp_path / 'triage.db'}"))
    (audit,) = store.associations()
    assert audit.outcome is AssociationOutcome.ABORTED
    assert (audit.instances_stored, audit.bytes_stored > 0) == (1, True)
    ds = pydicom.dcmread(files[0])
    (instance,) = store.study_instances(str(ds.StudyInstanceUID))
    assert instance.association_id == audit.id


def test_instances_of_a_cancelled_study_resent_under_a_corrected_study_move_there(
    daemon_factory, tmp_path
) -> None:
    """A study of two patients is FAILED with "correct the study at its source, then cancel
    it here"; the PACS splits it, and the images keep their SOP Instance UIDs. They used to
    be acknowledged as duplicates and dropped: the corrected study was never scored."""
    from triage.store.operations import cancel

    daemon = daemon_factory().start()
    files = study_files(tmp_path / "in", views=2, rows=64, cols=64)
    assert storescu(daemon.port, files).acknowledged == 2
    mixed = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    spool = Path(daemon.sections["store"]["spool_dir"])
    old_paths = daemon.store().instance_paths(mixed)
    assert len(old_paths) == 2
    # Not cancelled yet: a duplicate, as before.
    corrected = generate_uid()
    resent = [
        rewrite(path, tmp_path / f"corrected{n}.dcm", StudyInstanceUID=corrected)
        for n, path in enumerate(files)
    ]
    assert storescu(daemon.port, resent[:1]).acknowledged == 1
    assert daemon.store().get_study(corrected) is None
    cancel(daemon.store(), mixed, "two patients", actor="test")
    assert storescu(daemon.port, resent).acknowledged == 2
    study = daemon.store().get_study(corrected)
    assert study is not None and study.state is StudyState.RECEIVING
    assert len(daemon.store().study_instances(corrected)) == 2
    assert daemon.store().instance_paths(mixed) == set()
    assert not any((spool / path).exists() for path in old_paths)
    assert daemon.store().get_study(mixed).state is StudyState.CANCELLED
    assert "instance_moved_from_cancelled_study" in daemon.log_text()
    assert daemon.stop() == 0


@pytest.mark.parametrize("max_pdu_size", [4096, 131072, 1048576])
def test_data_sets_over_many_pdus_are_stored_byte_for_byte(
    daemon_factory, tmp_path, max_pdu_size: int
) -> None:
    """Data-set PDVs are written straight from the socket buffer into the spool file (see
    fast_receive): over hundreds of small PDUs or a few large ones the stored data set is the
    one sent, element for element, and its file meta is pynetdicom's."""
    daemon = daemon_factory({"dicom": {"max_pdu_size": max_pdu_size}}).start()
    files = study_files(tmp_path / "in", views=2, rows=700, cols=611, seed=7)  # odd sizes
    run = storescu(daemon.port, files)
    assert run.acknowledged == 2, run.output
    spool = Path(daemon.sections["store"]["spool_dir"])
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    for instance in daemon.store().study_instances(study_uid):
        stored = pydicom.dcmread(spool / instance.path)
        source = pydicom.dcmread(by_uid[instance.sop_instance_uid])
        assert stored == source
        assert stored.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert list((spool / "tmp").iterdir()) == []
    assert daemon.stop() == 0


def test_compressed_transfer_syntaxes_are_accepted(daemon_factory, tmp_path) -> None:
    from triage.testing.synth import available_encodings

    daemon = daemon_factory().start()
    encodings = [e for e in available_encodings() if e != "explicit"]
    assert "rle" in encodings and "jpeg2000" in encodings
    for n, encoding in enumerate(encodings):
        files = write_study(
            make_study(views=1, seed=100 + n, rows=128, cols=128), tmp_path / encoding, encoding
        )
        # storescu proposes uncompressed syntaxes unless told which one to propose.
        flags = {
            "implicit": ["-xi"],
            "deflated": ["-xd"],
            "rle": ["-xr"],
            "jpeg2000": ["-xv"],
            "jpeg-ls": ["-xt"],
            "jpeg-lossless": ["-xs"],
        }[encoding]
        run = storescu(daemon.port, files, extra=flags)
        assert run.acknowledged == 1, f"{encoding}: {run.output}"
        stored = daemon.store().study_instances(str(pydicom.dcmread(files[0]).StudyInstanceUID))
        assert (
            stored[0].transfer_syntax_uid == pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID
        )
    assert daemon.stop() == 0


def test_calling_ae_allow_list_with_and_without_host(daemon_factory) -> None:
    daemon = daemon_factory(
        {"dicom": {"allowed_peers": ["PACS", "ROUTER@127.0.0.1", "FARAWAY@192.0.2.7"]}}
    ).start()
    assert echoscu(daemon.port, calling="PACS").returncode == 0
    assert echoscu(daemon.port, calling="ROUTER").returncode == 0
    for stranger in ("INTRUDER", "FARAWAY"):
        result = echoscu(daemon.port, calling=stranger)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr
    # The called AE title is checked too.
    wrong_called = echoscu(daemon.port, calling="PACS", called="NOTTRIAGE")
    assert wrong_called.returncode != 0
    store = daemon.store()
    rejected = wait_until(
        lambda: (
            [a for a in store.associations() if a.outcome is AssociationOutcome.REJECTED]
            if len([a for a in store.associations() if a.outcome is AssociationOutcome.REJECTED])
            >= 3
            else None
        ),
        message="rejections audited",
    )
    reasons = sorted(a.reason for a in rejected)
    assert reasons == [
        "called AE title not recognised",
        "calling AE title not allowed from this host",
        "calling AE title not allowed from this host",
    ]
    assert daemon.stop() == 0


def test_a_dual_stack_listener_knows_an_ipv4_peer_by_its_ipv4_address(daemon_factory) -> None:
    """Bound to ``::``, the listener sees IPv4 peers as ``::ffff:127.0.0.1``: the allow list,
    the audit and the log name them by their IPv4 address all the same."""
    skip_without_ipv6()
    daemon = daemon_factory(
        {"dicom": {"bind": "::", "allowed_peers": ["ROUTER@127.0.0.1"]}}
    ).start()
    assert echoscu(daemon.port, calling="ROUTER").returncode == 0
    store = daemon.store()
    [audited] = wait_until(
        lambda: [a for a in store.associations() if a.outcome is AssociationOutcome.RELEASED],
        message="the association audited",
    )
    assert audited.peer_host == "127.0.0.1"
    assert daemon.stop() == 0


def test_invalid_input_gets_the_right_status_and_the_daemon_keeps_running(
    daemon_factory, tmp_path
) -> None:
    daemon = daemon_factory().start()
    good = study_files(tmp_path / "in", views=1)[0]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    traversal = rewrite(good, bad_dir / "traversal.dcm", StudyInstanceUID="../../x")
    no_series = rewrite(good, bad_dir / "noseries.dcm", SeriesInstanceUID=None)
    no_pixels = rewrite(good, bad_dir / "nopixels.dcm", PixelData=None)
    cases = {traversal: "0xc001", no_series: "0xc001", no_pixels: "0xa900"}
    for path, status in cases.items():
        run = storescu(daemon.port, [path])
        assert run.acknowledged == 0
        assert run.failure_statuses == [status], run.output
    spool = Path(daemon.sections["store"]["spool_dir"])
    assert not (spool.parent / "x").exists()
    assert not any(p.suffix == ".dcm" for p in spool.rglob("*"))
    # Still serving, and a good instance still goes through.
    assert storescu(daemon.port, [good]).acknowledged == 1
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert '"event": "instance_rejected"' in log and "missing or invalid StudyInstanceUID" in log


@pytest.mark.parametrize(
    "sop_class",
    [
        pytest.param("1.2.840.10008.5.1.4.1.1.88.11", id="a report (Basic Text SR)"),
        pytest.param("1.2.840.10008.5.1.4.1.1.88.34", id="an SR like ours"),
        pytest.param("1.2.840.10008.5.1.4.1.1.11.1", id="a presentation state"),
    ],
)
def test_non_view_objects_of_a_study_are_acknowledged_and_not_stored(
    daemon_factory, tmp_path, sop_class
) -> None:
    # A PACS re-sending a whole study sends its reports and our results too: refusing them
    # failed the PACS's whole job (Orthanc stops at the first object it cannot send).
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    daemon = daemon_factory().start()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    view = study_files(tmp_path / "in", views=1, rows=64, cols=64)
    run = storescu(daemon.port, [path, *view], extra=["--required"])  # its SOP classes only
    assert run.acknowledged == 2, run.output
    assert daemon.store().get_study(str(ds.StudyInstanceUID)) is None
    assert len(daemon.store().study_instances(str(pydicom.dcmread(view[0]).StudyInstanceUID))) == 1
    spool = Path(daemon.sections["store"]["spool_dir"])
    wait_until(lambda: not list((spool / "tmp").iterdir()), message="no temp file left")
    assert daemon.stop() == 0
    assert '"event": "non_view_ignored"' in daemon.log_text()


def test_dataset_of_another_sop_class_is_refused_with_a900(daemon_factory, tmp_path) -> None:
    """A CR data set in a file labelled DX, sent under the DX context → 0xA900.

    DCMTK's storescu always sends a data set under its own SOP class, so it cannot make this
    mistake; pynetdicom sends a file's encoded data set under the class its meta names, as a
    misconfigured router would.
    """
    from pynetdicom import AE

    daemon = daemon_factory().start()
    good = study_files(tmp_path / "in", views=1, modality="CR")[0]
    ds = pydicom.dcmread(good)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    mislabelled = tmp_path / "mislabelled.dcm"
    ds.save_as(mislabelled)
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert assoc.is_established
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as is, class from its meta
    try:
        response = assoc.send_c_store(mislabelled)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert response.Status == 0xA900
    assert "SOP Class UID differs" in response.ErrorComment
    assert daemon.store().counts_by_state() == {}
    assert daemon.stop() == 0


def test_a_data_set_whose_pixel_data_is_cut_short_is_refused_with_c000(
    daemon_factory, tmp_path
) -> None:
    """The header parses (pixel data is read lazily), the pixels are not all there: never
    acknowledged as stored, as if the image could be read later."""
    from pynetdicom import AE, _config

    daemon = daemon_factory().start()
    good = study_files(tmp_path / "in", views=1, modality="CR")[0]
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are
    try:
        response = assoc.send_c_store(cut)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert response.Status == 0xC000
    assert "pixel data cut short" in response.ErrorComment
    assert daemon.store().counts_by_state() == {}
    assert storescu(daemon.port, [good]).acknowledged == 1  # the whole file still goes in
    assert daemon.stop() == 0


def test_a_sop_class_the_daemon_does_not_store_is_refused_with_0122(tmp_path) -> None:
    """Sent under the presentation context of a class it stores (the listener answers 0xA900
    for that), or let through by anything else: never taken for a view of its study."""
    from triage.dicom.sop import DEFAULT_STORAGE_CLASSES, Status
    from triage.dicom.validation import Rejected, check_instance

    mr_image = "1.2.840.10008.5.1.4.1.1.4"
    good = study_files(tmp_path / "in", views=1, modality="CR")[0]
    mr = rewrite(good, tmp_path / "mr.dcm", SOPClassUID=mr_image, Modality="MR")
    uid = str(pydicom.dcmread(mr).SOPInstanceUID)
    verdict = check_instance(mr, mr_image, uid, frozenset(DEFAULT_STORAGE_CLASSES))
    assert verdict == Rejected(Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Rows": 0}, "image of zero Rows"),
        ({"Columns": 0, "BitsAllocated": 0}, "image of zero Columns, BitsAllocated"),
        ({"PixelData": b""}, "empty Pixel Data"),
        ({"PixelData": b"\0" * 1000}, "Pixel Data holds 1000 bytes, its image needs 8192"),
        ({"NumberOfFrames": 3}, "Pixel Data holds 8192 bytes, its image needs 24576"),
    ],
)
def test_an_image_its_pixel_data_cannot_fill_is_refused_with_a900(
    tmp_path, changes: dict, reason: str
) -> None:
    """Acknowledged, such a view would fail at scoring, retried until FAILED, with no word to
    the PACS that sent it: refused at once as not matching an image SOP class."""
    from triage.dicom.sop import DEFAULT_STORAGE_CLASSES, Status
    from triage.dicom.validation import Rejected, check_instance

    good = study_files(tmp_path / "in", views=1, rows=64, cols=64, modality="CR")[0]
    bad = rewrite(good, tmp_path / "bad.dcm", **changes)
    ds = pydicom.dcmread(bad, stop_before_pixels=True)
    verdict = check_instance(
        bad, ds.SOPClassUID, ds.SOPInstanceUID, frozenset(DEFAULT_STORAGE_CLASSES)
    )
    assert verdict == Rejected(Status.DATASET_MISMATCH, reason)
    assert not isinstance(
        check_instance(good, ds.SOPClassUID, ds.SOPInstanceUID, frozenset(DEFAULT_STORAGE_CLASSES)),
        Rejected,
    )


def test_an_image_without_pixels_sent_by_storescu_gets_a900_and_the_rest_go_in(
    daemon_factory, tmp_path
) -> None:
    daemon = daemon_factory().start()
    files = study_files(tmp_path / "in", views=2, rows=64, cols=64)
    empty = rewrite(files[0], tmp_path / "empty.dcm", PixelData=b"")
    run = storescu(daemon.port, [empty, files[1]], extra=["--no-halt"])
    assert run.acknowledged == 1, run.output
    assert run.failure_statuses == ["0xa900"], run.output
    study = str(pydicom.dcmread(files[1]).StudyInstanceUID)
    assert len(daemon.store().study_instances(study)) == 1
    assert daemon.stop() == 0


def test_a_received_file_that_cannot_be_read_is_out_of_resources_not_unreadable(
    tmp_path,
) -> None:
    # The file went (or the disk failed) on our side: 0xC000 would tell the PACS the data
    # set is bad and not worth sending again.
    from triage.dicom.sop import DEFAULT_STORAGE_CLASSES, Status
    from triage.dicom.validation import check_instance

    verdict = check_instance(
        str(tmp_path / "gone.dcm"),
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.3.4",
        frozenset(DEFAULT_STORAGE_CLASSES),
    )
    assert verdict.status == Status.OUT_OF_RESOURCES


def test_low_disk_space_answers_a700_and_stores_nothing(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory({"store": {"min_free_mb": 1_000_000_000}}).start()
    files = study_files(tmp_path / "in", views=2)
    run = storescu(daemon.port, files, extra=["--no-halt"])
    assert run.acknowledged == 0
    assert run.failure_statuses == ["0xa700", "0xa700"], run.output
    assert daemon.store().counts_by_state() == {}
    assert daemon.stop() == 0


@pytest.fixture
def small_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A 12 MB tmpfs (root only: CI runs as root), unmounted afterwards."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_disk_that_fills_during_a_transfer_answers_a700(
    daemon_factory, tmp_path, small_disk
) -> None:
    """Past the free-space floor check, the disk fills while the data set arrives: the peer
    gets "out of resources" (the connection was dropped: a network error to the PACS), no
    partial file stays, and the daemon goes on."""
    daemon = daemon_factory(
        {"store": {"spool_dir": str(small_disk / "spool"), "min_free_mb": 0}}
    ).start()
    big = make_study(body_part="WRIST", views=3, rows=2048, cols=2048, seed=41)  # ~8 MB each
    files = write_study(big, tmp_path / "big")
    run = storescu(daemon.port, files, extra=["--no-halt"])
    assert run.acknowledged == 1
    assert run.failure_statuses == ["0xa700", "0xa700"], run.output
    assert not any((small_disk / "spool" / "tmp").iterdir())
    assert len(daemon.store().study_instances(str(big[0].StudyInstanceUID))) == 1
    assert echoscu(daemon.port).returncode == 0
    assert daemon.stop() == 0
    assert '"event": "spool_write_failed"' in daemon.log_text()


def test_a_read_only_spool_answers_a700_and_storing_resumes_once_writable(
    daemon_factory, tmp_path
) -> None:
    """The spool's temp folder remounted read-only under a running daemon: the temp file
    for the data set could not be made, the association was aborted as if the peer had sent
    an invalid message, and the PACS never got "out of resources". Once the folder is
    writable again, the same instances go in."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (permission bits do not stop root)")
    daemon = daemon_factory().start()
    temp = Path(daemon.sections["store"]["spool_dir"]) / "tmp"
    files = study_files(tmp_path / "in", views=2)
    if subprocess.run(["mount", "--bind", str(temp), str(temp)], check=False).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        remount = ["mount", "-o", "remount,bind,ro", str(temp)]
        if subprocess.run(remount, check=False).returncode:
            pytest.skip("cannot remount read-only here")
        run = storescu(daemon.port, files, extra=["--no-halt"])
    finally:
        subprocess.run(["umount", str(temp)], check=False)
    assert run.acknowledged == 0
    assert run.failure_statuses == ["0xa700", "0xa700"], run.output
    assert daemon.store().counts_by_state() == {}
    assert storescu(daemon.port, files).acknowledged == 2
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert len(daemon.store().study_instances(study_uid)) == 2
    assert daemon.stop() == 0
    assert '"event": "spool_write_failed"' in daemon.log_text()


def test_quiet_period_queues_and_a_late_instance_opens_revision_2(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory({"study": {"quiet_period_s": 1.0, "check_interval_s": 0.2}}).start()
    files = study_files(tmp_path / "in", views=2)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert storescu(daemon.port, files).acknowledged == 2
    store = daemon.store()
    assert store.get_study(study_uid).state in (StudyState.RECEIVING, StudyState.QUEUED)
    wait_until(lambda: store.get_study(study_uid).state is StudyState.QUEUED, 15, message="queued")
    late = same_study_more_views(files, tmp_path / "late", 1)
    assert storescu(daemon.port, late).acknowledged == 1
    study = store.get_study(study_uid)
    assert study.revision == 2
    wait_until(lambda: store.get_study(study_uid).state is StudyState.QUEUED, 15, message="rev 2")
    assert [(e.to_state.value, e.revision) for e in store.study_history(study_uid)] == [
        ("RECEIVING", 1),
        ("QUEUED", 1),
        ("RECEIVING", 2),
        ("QUEUED", 2),
    ]
    assert daemon.stop() == 0
    log_lines = [
        json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")
    ]
    queued = [line for line in log_lines if line["event"] == "study_queued"]
    assert [line["study_uid"] for line in queued] == [study_uid, study_uid]


def big_series(folder: Path, count: int, rows: int = 1024, cols: int = 1024) -> list[Path]:
    """*count* instances of one study (one rendered image, new UIDs): a long transfer."""
    [first] = write_study(make_study(views=1, seed=7, rows=rows, cols=cols), folder)
    return [first, *same_study_more_views([first], folder, count - 1)]


class SlowProxy:
    """A TCP relay to *port* that passes the client's bytes on at about *rate* bytes/s, so a
    test can stop a sender in the middle of a data set."""

    def __init__(self, port: int, rate: int) -> None:
        self.target = port
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(upstream, client, 0), daemon=True).start()
            self._pump(client, upstream, self.rate)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: int) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(16384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


@contextlib.contextmanager
def _data_set_half_received(daemon, tmp_path):  # type: ignore[no-untyped-def]
    """storescu sending an 8 MiB view through a slow proxy, once more than 1 MB of it is in
    the spool's temp folder: (the storescu process, that folder). Killed on leaving."""
    files = study_files(tmp_path / "in", views=1, rows=2048, cols=2048)
    proxy = SlowProxy(daemon.port, rate=2_000_000)
    sender = storescu_background(proxy.port, files, tmp_path / "storescu.log")
    temp = Path(daemon.sections["store"]["spool_dir"]) / "tmp"
    try:
        wait_until(
            lambda: any(f.stat().st_size > 1_000_000 for f in temp.iterdir()),
            message="a partial data set in the spool's temp folder",
        )
        yield sender, temp
    finally:
        sender.kill()
        sender.wait()
        proxy.close()


def test_a_data_set_cut_off_mid_transfer_leaves_no_temp_file(daemon_factory, tmp_path) -> None:
    """The sender dies half-way through a data set: nothing was acknowledged, the partial
    file is deleted at once (not at the next start), the association is audited ABORTED."""
    daemon = daemon_factory().start()
    with _data_set_half_received(daemon, tmp_path) as (_sender, temp):
        pass  # the sender is killed on leaving
    wait_until(lambda: not list(temp.iterdir()), message="partial file deleted")
    store = daemon.store()
    # The row is written ACTIVE when the association starts and closed after the partial
    # file is deleted: wait for it to be closed, not merely there.
    audit = wait_until(
        lambda: next(
            (a for a in store.associations() if a.outcome is not AssociationOutcome.ACTIVE), None
        ),
        message="the association audited as ended",
    )
    assert audit.outcome is AssociationOutcome.ABORTED and audit.instances_stored == 0
    assert "partial_data_set_discarded" in daemon.log_text()
    assert daemon.stop() == 0


def test_a_study_stays_receiving_while_its_association_is_still_sending_it(
    daemon_factory, tmp_path
) -> None:
    """Each view takes longer than the quiet period to arrive (a slow teleradiology link):
    the study was queued once the first view was recorded, while the association was still
    sending the second, which then opened revision 2 (scored and sent twice). The quiet
    period now starts when the association stops sending."""
    daemon = daemon_factory({"study": {"quiet_period_s": 1.0, "check_interval_s": 0.2}}).start()
    files = study_files(tmp_path / "in", views=2, rows=1024, cols=1024)  # 2 MiB each
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    proxy = SlowProxy(daemon.port, rate=800_000)  # about 2.6 s a view
    try:
        run = storescu(proxy.port, files)
    finally:
        proxy.close()
    assert run.acknowledged == 2, run.output
    store = daemon.store()
    wait_until(lambda: store.get_study(study_uid).state is StudyState.QUEUED, 15, message="queued")
    assert [(e.to_state.value, e.revision) for e in store.study_history(study_uid)] == [
        ("RECEIVING", 1),
        ("QUEUED", 1),
    ]
    assert [i.revision for i in store.study_instances(study_uid)] == [1, 1]
    assert daemon.stop() == 0


def test_instances_whose_rows_a_power_loss_took_are_recorded_again_at_start(
    daemon_factory, tmp_path
) -> None:
    """The listener's SQLite commits do not wait for the disk (the spool file is the durable
    copy). Simulate a power loss that took the last commits: the study's rows are gone, its
    files are not. At start the daemon records the files again and the study goes on."""
    daemon = daemon_factory({"study": {"quiet_period_s": 60}}).start()
    files = study_files(tmp_path / "in", views=2, seed=31)
    assert storescu(daemon.port, files).acknowledged == 2
    assert daemon.stop() == 0
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    store = daemon.store()
    with store.engine.begin() as connection:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.exec_driver_sql("DELETE FROM studies WHERE study_uid = ?", (study_uid,))
    assert store.get_study(study_uid) is None
    spool = Path(daemon.sections["store"]["spool_dir"])
    stray = spool / generate_uid()
    stray.mkdir()
    (stray / f"{generate_uid()}.dcm").write_bytes(b"not DICOM")

    daemon.sections["study"]["quiet_period_s"] = 0.5
    daemon.config_path = write_config(daemon.workdir / "triage.toml", daemon.sections)
    daemon.start()
    study = wait_until(
        lambda: (s := store.get_study(study_uid)) and s.state is StudyState.QUEUED and s,
        message="recovered study queued",
    )
    assert study.revision == 1
    assert {i.sop_instance_uid for i in store.study_instances(study_uid)} == {
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files
    }
    log = daemon.log_text()
    assert '"instances_recorded": 2' in log and '"files_left": 1' in log
    assert "spool_file_not_recordable" in log or "spool_file_unreadable" in log
    # Nothing is recorded twice on the next start.
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.log_text().count('"event": "spool_recovered"') == 2  # the stray file again
    assert len(store.study_instances(study_uid)) == 2
    assert daemon.stop() == 0


def test_sigterm_during_a_transfer_finishes_the_association_then_exits_0(
    daemon_factory, tmp_path
) -> None:
    daemon = daemon_factory().start()
    files = big_series(tmp_path / "in", 60)
    log = tmp_path / "storescu.log"
    sender = storescu_background(daemon.port, files, log)
    wait_until(lambda: log.read_text().count(ACKNOWLEDGED) >= 5, 60, 0.02)
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(90) == 0
    assert sender.wait(60) == 0
    acknowledged = log.read_text().count(ACKNOWLEDGED)
    assert acknowledged == 60
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert len(daemon.store().study_instances(study_uid)) == 60
    # New associations are refused once the stop began.
    assert echoscu(daemon.port).returncode != 0


def test_a_hang_up_stops_the_daemon_cleanly(daemon_factory) -> None:
    """A terminal or SSH session that hangs up sends SIGHUP to the whole process group: its
    default action killed the daemon and its listener at once (exit 129), claims and
    associations in flight with them."""
    daemon = daemon_factory().start()
    for pid in (daemon.process.pid, *daemon.children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
    assert daemon.process.wait(60) == 0
    assert '"signal": "SIGHUP"' in daemon.log_text()
    assert '"event": "listener_stopped"' in daemon.log_text()


def test_kill_9_during_a_transfer_loses_no_acknowledged_instance(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory().start()
    files = big_series(tmp_path / "in", 60)
    log = tmp_path / "storescu.log"
    sender = storescu_background(daemon.port, files, log)
    wait_until(lambda: log.read_text().count(ACKNOWLEDGED) >= 20, 60, 0.01)
    daemon.kill()
    sender.wait(60)
    acknowledged = acknowledged_files(log.read_text())
    assert 20 <= len(acknowledged) < 60
    daemon.start()  # restart on the same store and spool
    store = daemon.store()
    spool = Path(daemon.sections["store"]["spool_dir"])
    for path in acknowledged:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert store.instance_exists(str(ds.SOPInstanceUID)), f"lost {path.name}"
        stored = pydicom.dcmread(spool / f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm")
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert not any((spool / "tmp").iterdir())  # temp files of the crash were cleaned
    # The rest is resent by the PACS and completes the study.
    rest = storescu(daemon.port, files)
    assert rest.acknowledged == 60
    assert len(store.study_instances(str(pydicom.dcmread(files[0]).StudyInstanceUID))) == 60
    assert daemon.stop() == 0


def _make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=msk-triage test CA",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        ext = folder / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            ext.name,
        )
    return {
        n: folder / n for n in ("ca.pem", "server.key", "server.pem", "client.key", "client.pem")
    }


def _mutual_tls(pki: dict[str, Path]) -> dict[str, Any]:
    """A daemon's [dicom] section for TLS with client certificates of *pki*'s CA."""
    return {
        "dicom": {
            "tls": True,
            "tls_cert": str(pki["server.pem"]),
            "tls_key": str(pki["server.key"]),
            "tls_ca": str(pki["ca.pem"]),
            "tls_verify_client": True,
        }
    }


def test_tls_echo_and_store_with_client_certificates(daemon_factory, tmp_path) -> None:
    pki = _make_pki(tmp_path / "pki")
    daemon = daemon_factory(_mutual_tls(pki)).start()
    tls = ["+tls", str(pki["client.key"]), str(pki["client.pem"]), "+cf", str(pki["ca.pem"])]
    echo = echoscu(daemon.port, extra=tls)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    files = study_files(tmp_path / "in", views=2)
    run = storescu(daemon.port, files, extra=tls)
    assert run.acknowledged == 2, run.output
    # Without a client certificate the handshake fails; plain DICOM is refused too.
    anonymous = echoscu(daemon.port, extra=["+tla", "+cf", str(pki["ca.pem"])])
    assert anonymous.returncode != 0
    assert echoscu(daemon.port).returncode != 0
    # The listener survived all of it.
    assert echoscu(daemon.port, extra=tls).returncode == 0
    records = daemon.store().associations()
    assert any(r.tls and r.instances_stored == 2 for r in records)
    # The test CA gives two days: said at start, and served for an alert.
    from tests.test_http import log_events, scrape, value
    from triage.tls_expiry import not_after

    [soon] = log_events(daemon, "tls_certificate_expires_soon")
    assert (soon["role"], soon["days_left"]) == ("listener", 1)
    assert soon["path"] == str(pki["server.pem"])
    end = not_after(pki["server.pem"])
    assert end is not None
    expiry = value(
        scrape(daemon),
        "triage_tls_certificate_expiry_timestamp_seconds",
        role="listener",
        destination="",
    )
    assert expiry == (end - datetime(1970, 1, 1)).total_seconds()
    assert daemon.stop() == 0


def test_several_listener_processes_share_the_port(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory({"dicom": {"listener_processes": 2}}).start()
    daemon.wait_for_log('"event": "listener_started"', 60)
    studies = [study_files(tmp_path / f"s{n}", views=2, seed=200 + n) for n in range(6)]
    senders = [
        storescu_background(daemon.port, files, tmp_path / f"log{n}")
        for n, files in enumerate(studies)
    ]
    assert [s.wait(120) for s in senders] == [0] * 6
    store = daemon.store()
    for files in studies:
        uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert len(store.study_instances(uid)) == 2
    assert daemon.stop() == 0


def test_phi_never_reaches_the_log(daemon_factory, tmp_path) -> None:
    daemon = daemon_factory({"study": {"quiet_period_s": 0.5, "check_interval_s": 0.2}}).start()
    files = study_files(
        tmp_path / "in",
        views=2,
        patient_name="Zyxwv^Quentinella",
        patient_id="PID-99887766",
        patient_birth_date="19451231",
    )
    assert storescu(daemon.port, files).acknowledged == 2
    daemon.wait_for_log('"event": "study_queued"')
    assert daemon.stop() == 0
    log = daemon.log_text()
    for secret in ("Zyxwv", "Quentinella", "PID-99887766", "19451231"):
        assert secret not in log


def test_wrong_config_stops_with_one_line_naming_the_key(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dicom]\nport = 70000\n")
    result = subprocess.run(
        [sys.executable, "-m", "triage", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "triage: config error: [dicom] port: must be a TCP port 0..65535 (got 70000)"
    )
    config.write_text("[dicom]\nprot = 104\n")
    result = subprocess.run(
        [sys.executable, "-m", "triage", "--config", str(config), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "[dicom] prot: unknown key" in result.stderr


def test_port_in_use_fails_with_a_clear_message(daemon_factory) -> None:
    first = daemon_factory(name="first").start()
    second = daemon_factory({"dicom": {"port": first.port}}, name="second")
    second.start(wait=False)
    assert second.process.wait(60) == 1
    assert "cannot listen on 127.0.0.1:" in second.log_text()
    assert "listen_port_busy_retrying" in second.log_text()
    assert first.stop() == 0


def test_a_second_daemon_on_the_same_spool_is_refused_before_it_touches_anything(
    daemon_factory,
) -> None:
    # It used to clean the first one's temp folder (a file being received: 0xC000 to the
    # PACS) and take back its claims as a crash's leftovers, then fail on the port.
    first = daemon_factory(name="first").start()
    receiving = Path(first.sections["store"]["spool_dir"]) / "tmp" / "being-received.part"
    receiving.write_bytes(b"half a data set")
    second = daemon_factory(
        {"store": dict(first.sections["store"]), "dicom": {"port": first.port}}, name="second"
    )
    second.start(wait=False)
    assert second.process.wait(60) == 1
    assert "another `triage serve` is running on this spool" in second.log_text()
    assert "spool_temp_files_removed" not in second.log_text()
    assert receiving.read_bytes() == b"half a data set"
    assert echoscu(first.port).returncode == 0
    assert first.stop() == 0


def test_start_waits_for_a_port_that_is_released_soon(daemon_factory) -> None:
    """A restart right after a crash: the dead daemon's listener still holds the port for a
    moment. The new daemon waits for it instead of failing."""
    daemon = daemon_factory()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", daemon.port))
    holder.listen()
    try:
        daemon.start(wait=False)
        daemon.wait_for_log("listen_port_busy_retrying", 60)
    finally:
        holder.close()
    daemon.wait_for_log('"event": "ready"', 60)
    assert echoscu(daemon.port).returncode == 0
    assert daemon.stop() == 0


def test_associations_beyond_the_maximum_are_rejected(daemon_factory) -> None:
    from pynetdicom import AE

    daemon = daemon_factory({"dicom": {"max_associations": 1}}).start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert held.is_established
    try:
        result = echoscu(daemon.port)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr
    finally:
        held.release()
    assert echoscu(daemon.port).returncode == 0
    records = wait_until(
        lambda: [
            r for r in daemon.store().associations() if r.outcome is AssociationOutcome.REJECTED
        ],
        message="rejection audited",
    )
    assert records[0].reason == "local limit exceeded (maximum associations)"
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    "stalled",
    [
        pytest.param(b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 10, id="inside an A-ASSOCIATE-RQ"),
        pytest.param(b"\x01\x00\x00\x80\x00\x00", id="announcing an 8 MiB PDU"),
    ],
)
def test_a_peer_that_stops_sending_inside_a_pdu_loses_its_slot(daemon_factory, stalled) -> None:
    # A dead link that sends no RST, or a scanner: the connection is dropped after the
    # network timeout, instead of holding an association slot (here the only one) for ever.
    daemon = daemon_factory(
        {"dicom": {"max_associations": 1, "network_timeout_s": 2, "acse_timeout_s": 2}}
    ).start()
    with socket.create_connection(("127.0.0.1", daemon.port)) as peer:
        peer.sendall(stalled)
        time.sleep(0.5)  # accepted, and stuck reading the rest
        wait_until(
            lambda: echoscu(daemon.port).returncode == 0,
            timeout=20,
            message="the stalled connection's slot freed",
        )
    assert daemon.stop() == 0


def test_a_private_sop_class_in_extra_sop_classes_is_stored(daemon_factory, tmp_path) -> None:
    # pynetdicom serves C-STORE by SOP class: one it does not know (a vendor's private CR
    # class) was negotiated, then every C-STORE under it was aborted.
    private = "1.2.392.200036.9125.1.1.2"
    daemon = daemon_factory({"dicom": {"extra_sop_classes": [private]}}).start()
    [source] = study_files(tmp_path / "in", views=1, rows=64, cols=64)
    sent = rewrite(source, tmp_path / "private.dcm", SOPClassUID=private)
    ds = pydicom.dcmread(sent)
    ds.file_meta.MediaStorageSOPClassUID = private
    ds.save_as(sent)
    profile = tmp_path / "private.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Explicit]\nTransferSyntax1 = LittleEndianExplicit\n"
        "[[PresentationContexts]]\n[Private]\n"
        f"PresentationContext1 = {private}\\Explicit\n"
        "[[Profiles]]\n[Private]\nPresentationContexts = Private\n"
    )
    run = storescu(daemon.port, [sent], extra=["-xf", str(profile), "Private"])
    assert run.acknowledged == 1, run.output
    [instance] = daemon.store().study_instances(str(ds.StudyInstanceUID))
    assert instance.sop_class_uid == private
    assert daemon.stop() == 0


def test_a_listener_that_dies_has_its_open_associations_closed_in_the_audit(
    daemon_factory,
) -> None:
    # Killed mid-association (the OOM killer): the daemon starts another, and the rows of
    # the dead one's associations are ABORTED, not ACTIVE for ever.
    import os

    from pynetdicom import AE

    daemon = daemon_factory().start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert held.is_established
    try:
        [active] = wait_until(
            lambda: [
                r for r in daemon.store().associations() if r.outcome is AssociationOutcome.ACTIVE
            ],
            message="the association audited as active",
        )
        os.kill(active.listener_pid, signal.SIGKILL)
        record = wait_until(
            lambda: next(
                (
                    r
                    for r in daemon.store().associations()
                    if r.id == active.id and r.outcome is AssociationOutcome.ABORTED
                ),
                None,
            ),
            timeout=30,
            message="the dead listener's association closed",
        )
        assert record.reason == "listener stopped before the association ended"
    finally:
        held.abort()
    assert daemon.stop() == 0


@pytest.mark.postgres
def test_on_postgresql_serve_spares_the_temp_files_a_worker_may_be_staging(
    daemon_factory, pg_url
) -> None:
    """`triage worker` processes share the spool on PostgreSQL: a restart of `triage serve`
    removed the outputs they were staging, and their studies' commits failed (an attempt
    each). Only temp files old enough to be a crash's leftovers go."""
    daemon = daemon_factory({"store": {"url": pg_url}})
    temp = Path(daemon.sections["store"]["spool_dir"]) / "tmp"
    temp.mkdir(parents=True)
    staging, leftover = temp / "a1b2-staged-sr.dcm", temp / "crashed.part"
    staging.write_bytes(b"being staged")
    leftover.write_bytes(b"from a crash")
    two_hours_ago = time.time() - 7200
    os.utime(leftover, (two_hours_ago, two_hours_ago))
    daemon.start()
    assert staging.read_bytes() == b"being staged" and not leftover.exists()
    assert daemon.stop() == 0


@pytest.mark.postgres
def test_on_postgresql_an_old_spool_file_no_row_names_is_recorded_at_start(
    daemon_factory, pg_url, tmp_path
) -> None:
    """A listener killed between making an instance's file durable and committing its row
    left a file nobody acknowledged; spool recovery ran on SQLite only, so on PostgreSQL it
    stayed for good, patient data no purge removes. At start, one older than an hour is
    recorded like any arrival; a younger one may be another host's listener's, and stays."""
    daemon = daemon_factory({"store": {"url": pg_url}, "study": {"quiet_period_s": 0.5}})
    spool = Path(daemon.sections["store"]["spool_dir"])
    old, young = (pydicom.dcmread(f) for f in study_files(tmp_path / "in", views=2, seed=41))
    young.StudyInstanceUID = generate_uid()
    paths = []
    for dataset in (old, young):
        path = spool / f"{dataset.StudyInstanceUID}/{dataset.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(path)
        paths.append(path)
    two_hours_ago = time.time() - 7200
    os.utime(paths[0], (two_hours_ago, two_hours_ago))
    daemon.start()
    store = daemon.store()
    study = wait_until(
        lambda: (
            (s := store.get_study(str(old.StudyInstanceUID))) and s.state is StudyState.QUEUED and s
        ),
        message="the recovered study queued",
    )
    assert [i.sop_instance_uid for i in store.study_instances(study.study_uid)] == [
        str(old.SOPInstanceUID)
    ]
    assert store.get_study(str(young.StudyInstanceUID)) is None and paths[1].exists()
    assert '"instances_recorded": 1' in daemon.log_text()
    assert daemon.stop() == 0


@pytest.mark.postgres
def test_after_a_kill_9_on_postgresql_the_dead_listeners_associations_are_closed(
    daemon_factory, pg_url
) -> None:
    # Only the SQLite store closed every ACTIVE row at start (one daemon per store); a
    # PostgreSQL store is shared, so this host's rows whose listener is gone are closed.
    from pynetdicom import AE

    daemon = daemon_factory({"store": {"url": pg_url}}).start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert held.is_established
    [active] = wait_until(
        lambda: [
            r for r in daemon.store().associations() if r.outcome is AssociationOutcome.ACTIVE
        ],
        message="the association audited as active",
    )
    daemon.kill()
    held.abort()
    daemon.start()
    [record] = [r for r in daemon.store().associations() if r.id == active.id]
    assert record.outcome is AssociationOutcome.ABORTED
    assert daemon.stop() == 0


def test_a_c_store_sent_under_the_verification_context_leaves_no_temp_file(
    daemon_factory, tmp_path
) -> None:
    """A C-STORE whose command names Verification, sent under the Verification context:
    pynetdicom routes it to the Verification service, which does not store. The data set it
    wrote to the spool's temp folder is deleted when the request ends, not at the hourly
    sweep, and the daemon goes on."""
    from pynetdicom import AE

    daemon = daemon_factory().start()
    good = study_files(tmp_path / "in", views=1, modality="CR")[0]
    ds = pydicom.dcmread(good)
    verification = "1.2.840.10008.1.1"
    ds.SOPClassUID = verification
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(verification, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    temp = Path(daemon.sections["store"]["spool_dir"]) / "tmp"
    wait_until(lambda: not list(temp.iterdir()), timeout=10, message="temp file deleted")
    assert daemon.store().counts_by_state() == {}
    assert echoscu(daemon.port).returncode == 0
    assert daemon.stop() == 0


def test_a_peer_stalled_in_its_tls_handshake_does_not_hold_up_the_stop(
    daemon_factory, tmp_path
) -> None:
    """pynetdicom's shutdown joins every connection thread: one stalled in its handshake
    kept the stop waiting for the network timeout, past the grace, and the listener was
    killed (no listener_stopped, associations left ACTIVE)."""
    pki = _make_pki(tmp_path / "pki")
    daemon = daemon_factory(
        {
            "dicom": {
                "tls": True,
                "tls_cert": str(pki["server.pem"]),
                "tls_key": str(pki["server.key"]),
                "shutdown_grace_s": 2,
                "network_timeout_s": 60,
            }
        }
    ).start()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as stalled:
        stalled.sendall(bytes.fromhex("160301002a0100002603030000"))  # part of a ClientHello
        time.sleep(0.5)
        started = time.monotonic()
        assert daemon.stop(60) == 0
        took = time.monotonic() - started
    assert took < 10, f"the stop took {took:.0f} s"
    assert '"event": "listener_stopped"' in daemon.log_text()


def test_a_tls_failure_towards_a_peer_says_what_it_was(daemon_factory, tmp_path) -> None:
    """pynetdicom logs a requestor's TLS error and reports an aborted association: the
    delivery and `triage-admin echo` said "peer down or unreachable" for an unknown CA, a
    missing client certificate, a name or date that does not fit. The listener said nothing
    but a log line: its audit had no row for a peer refused in the handshake."""
    import ssl

    from triage.cli.admin import echo
    from triage.store.queries import AssociationFilter, list_associations

    pki = _make_pki(tmp_path / "pki")
    other = _make_pki(tmp_path / "other")  # another CA: its certificates mean nothing here
    daemon = daemon_factory(_mutual_tls(pki)).start()
    target = {"host": "127.0.0.1", "port": daemon.port, "ae_title": "TRIAGE"}

    def context(ca: Path, client: dict[str, Path] | None) -> ssl.SSLContext:
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        if client is not None:
            tls.load_cert_chain(str(client["client.pem"]), str(client["client.key"]))
        return tls

    unknown_ca = echo(target, "ROUTER", 10, context(other["ca.pem"], pki))
    assert unknown_ca["error"].startswith("TLS: the peer's certificate failed verification: ")
    no_client_cert = echo(target, "ROUTER", 10, context(pki["ca.pem"], None))
    assert no_client_cert["error"].startswith("TLS: "), no_client_cert
    assert "certificate" in no_client_cert["error"]
    assert echo(target, "ROUTER", 10, context(pki["ca.pem"], pki))["ok"]
    # The listener's side of each: a REJECTED audit row with the reason, and none for a
    # connection closed before any TLS (a port check).
    assert echoscu(daemon.port).returncode != 0  # plain DICOM on the TLS port
    with socket.create_connection(("127.0.0.1", daemon.port)):
        pass
    assert echo(target, "ROUTER", 10, context(pki["ca.pem"], pki))["ok"]
    store = daemon.store()

    def refused() -> list[str]:
        rows = list_associations(store, AssociationFilter(outcomes=(AssociationOutcome.REJECTED,)))
        return [r["reason"] for r in reversed(rows) if r["calling_ae"] == "" and r["tls"]]

    wait_until(lambda: len(refused()) >= 3, 10)
    time.sleep(0.5)  # a fourth, for the port check, would be a mistake
    assert refused() == [
        "TLS handshake failed: tlsv1 alert unknown ca",
        "TLS handshake failed: peer did not return a certificate",
        "TLS handshake failed: wrong version number",
    ]
    assert daemon.stop() == 0


def test_a_tls_client_on_the_plain_port_is_one_warning_naming_it(daemon_factory, tmp_path) -> None:
    """A modality set to TLS, sending to the plain port: its ClientHello, read as PDUs six
    bytes at a time, gave a dozen "Unable to decode the received PDU data: unknown PDU
    type 0x.." ERROR lines per attempt, none naming the peer or saying it was TLS."""
    from tests.test_http import log_events

    pki = _make_pki(tmp_path / "pki")
    daemon = daemon_factory({"dicom": {"max_associations": 1}}).start()
    tls = ["+tls", str(pki["client.key"]), str(pki["client.pem"]), "+cf", str(pki["ca.pem"])]
    for _ in range(3):
        assert echoscu(daemon.port, extra=tls).returncode != 0
    assert echoscu(daemon.port).returncode == 0  # the slot is free, the daemon answers
    warned = log_events(daemon, "tls_client_on_plain_port")
    assert len(warned) == 3, warned
    assert {(w["level"], w["peer_host"]) for w in warned} == {("warning", "127.0.0.1")}
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line[:1] == "{"]
    assert [r for r in records if r["level"] in ("error", "critical")] == []
    assert daemon.stop() == 0


def test_a_peer_that_stops_inside_its_answer_is_given_up_after_the_timeout() -> None:
    """pynetdicom clears a requestor's socket timeout once connected: a peer that sent part
    of a PDU and no more held the sender (or `triage-admin echo`) until it closed."""
    from triage.cli.admin import echo

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        held: list[socket.socket] = []

        def answer_three_bytes() -> None:
            peer, _ = server.accept()
            held.append(peer)
            peer.recv(65536)  # the A-ASSOCIATE-RQ
            peer.sendall(b"\x02\x00\x00")  # the start of an A-ASSOCIATE-AC, never the rest

        thread = threading.Thread(target=answer_three_bytes, daemon=True)
        thread.start()
        started = time.monotonic()
        result = echo({"host": "127.0.0.1", "port": port, "ae_title": "PACS"}, "TRIAGE", 2)
        took = time.monotonic() - started
        for peer in held:
            peer.close()
    assert not result["ok"]
    assert took < 15, f"echo returned after {took:.0f} s"


_RAISES_AFTER_START = textwrap.dedent(
    """
    import sys
    from triage.config import load_config
    from triage.dicom.listener_process import ListenerPool

    if __name__ == "__main__":
        pool = ListenerPool(load_config(sys.argv[1]))
        pool.start()
        print("listening", pool.port, flush=True)
        raise RuntimeError("unexpected")  # as any error after start-up in Daemon.run
    """
)


def test_an_unexpected_error_after_start_does_not_hang_the_exit(tmp_path) -> None:
    config = tmp_path / "triage.toml"
    config.write_text(
        "[dicom]\nport = 0\nshutdown_grace_s = 1\n"
        f'[store]\nurl = "sqlite:///{tmp_path}/var/triage.db"\nspool_dir = "{tmp_path}/var/spool"\n'
    )
    from triage.store.db import make_engine, upgrade_schema

    engine = make_engine(f"sqlite:///{tmp_path}/var/triage.db")
    upgrade_schema(engine)
    engine.dispose()
    script = tmp_path / "run.py"
    script.write_text(_RAISES_AFTER_START)
    process = subprocess.Popen(
        [sys.executable, str(script), str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()  # its listener follows (parent-death signal)
        process.wait()
        code = None
    output = process.stdout.read() if process.stdout else ""
    assert "listening" in output, output[-2000:]
    assert code == 1, f"still running 30 s after an unexpected error:\n{output[-2000:]}"


def test_an_allow_list_host_matches_an_ipv4_peer_seen_through_a_dual_stack_listener() -> None:
    """`[dicom] bind = "::"` takes IPv4 peers too, as IPv4-mapped IPv6 addresses
    (``::ffff:127.0.0.1``): ``AE@127.0.0.1`` must still let them in (it rejected them)."""
    from triage.dicom.listener import PeerPolicy

    policy = PeerPolicy(("ROUTER@127.0.0.1", "SIX@::1"))
    assert policy.allows("ROUTER", "::ffff:127.0.0.1")
    assert policy.allows("ROUTER", "127.0.0.1")
    assert policy.allows("SIX", "::1")
    assert not policy.allows("ROUTER", "::ffff:127.0.0.2")
    assert not policy.allows("ROUTER", "::1")
    assert not policy.allows("SIX", "::ffff:127.0.0.1")


def test_a_listener_that_cannot_be_replaced_is_mourned_once_and_retried_quietly(
    tmp_path, monkeypatch
) -> None:
    """While a dead listener process cannot be replaced (its port taken meanwhile), the
    daemon retries every second: its death was logged and its associations closed in the
    store every second too, with a failed restart each time."""
    import multiprocessing

    from structlog.testing import capture_logs

    from triage.config import load_config
    from triage.dicom.listener_process import ListenerPool, ListenerPortBusy

    context = multiprocessing.get_context("spawn")
    dead = context.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join(30)
    alive = context.Process(target=time.sleep, args=(30,), daemon=True)
    pool = ListenerPool(load_config(None, env={}, base_dir=tmp_path))
    pool._processes = [dead]
    attempts: list[int] = []

    def spawn() -> multiprocessing.process.BaseProcess:
        attempts.append(1)
        if len(attempts) < 4:
            raise ListenerPortBusy("cannot listen on 127.0.0.1:11112: Address already in use")
        alive.start()
        return alive

    monkeypatch.setattr(pool, "_spawn", spawn)
    mourned: list[int] = []
    try:
        with capture_logs() as logs:
            for _ in range(5):
                pool.supervise(on_died=mourned.append)
        events = [entry["event"] for entry in logs]
        assert mourned == [dead.pid] and len(attempts) == 4
        assert events == ["listener_process_died", "listener_restart_failed", "listener_restarted"]
        assert pool._processes == [alive]
    finally:
        alive.kill()


def test_a_listener_killed_mid_transfer_has_its_partial_files_removed(
    daemon_factory, tmp_path
) -> None:
    """A listener process killed (the OOM killer) in the middle of a data set: nothing was
    acknowledged for it, yet its partial file stayed in the spool's temp folder until the
    hourly sweep of old ones. The daemon removes it when it replaces the process."""
    from tests.test_http import log_events

    daemon = daemon_factory().start()
    [listener_pid] = [e["pid"] for e in log_events(daemon, "listener_started")]
    with _data_set_half_received(daemon, tmp_path) as (sender, temp):
        os.kill(listener_pid, signal.SIGKILL)
        assert sender.wait(60) != 0
    daemon.wait_for_log('"event": "listener_started"', 60, occurrence=2)
    assert not list(temp.iterdir())
    assert '"event": "listener_temp_files_removed"' in daemon.log_text()
    assert echoscu(daemon.port).returncode == 0
    assert daemon.stop() == 0


def test_a_hung_listener_process_is_killed_and_replaced(tmp_path, monkeypatch) -> None:
    """A listener process stopped (SIGSTOP) or deadlocked still gets its share of the
    associations from the kernel, which then wait unanswered: the daemon saw it alive,
    said ready and fed systemd's watchdog. One whose accept loop stopped turning is killed
    and replaced."""
    from structlog.testing import capture_logs

    from triage.config import load_config
    from triage.dicom import listener_process
    from triage.dicom.listener_process import ListenerPool
    from triage.store.db import upgrade_schema

    port = free_port()
    config_path = write_config(
        tmp_path / "triage.toml",
        {
            "dicom": {"bind": "127.0.0.1", "port": port, "shutdown_grace_s": 1},
            "store": {
                "url": f"sqlite:///{tmp_path}/triage.db",
                "spool_dir": str(tmp_path / "spool"),
                "min_free_mb": 1,
            },
        },
    )
    engine = make_engine(f"sqlite:///{tmp_path}/triage.db")
    upgrade_schema(engine)
    engine.dispose()
    monkeypatch.setattr(listener_process, "UNRESPONSIVE_S", 3.0, raising=False)
    pool = ListenerPool(load_config(config_path))
    pool.start()
    try:
        [healthy] = pool._processes
        deadline = time.monotonic() + 5  # past UNRESPONSIVE_S: a live one is left alone
        while time.monotonic() < deadline:
            pool.supervise()
            time.sleep(0.5)
        assert pool._processes == [healthy] and healthy.is_alive()
        os.kill(healthy.pid, signal.SIGSTOP)
        with capture_logs() as logs:
            wait_until(
                lambda: pool.supervise() or pool._processes[0] is not healthy,
                timeout=30,
                interval=0.5,
                message="the stopped listener process replaced",
            )
        events = [entry["event"] for entry in logs]
        assert events[:2] == ["listener_process_unresponsive", "listener_process_died"], events
        assert not healthy.is_alive()
        assert echoscu(port).returncode == 0
    finally:
        pool.stop(0)
