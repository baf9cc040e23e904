"""The whole daemon: DCMTK storescu in, scoring on the CPU, results to DCMTK storescp.

Each test runs `triage serve` as a process with the demo model (allowed explicitly), a short
quiet period, and a storescp as the PACS that receives the SR and the CAM overlays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from tests.dicom_validate import dciodvfy, dsrdump
from tests.peers import Daemon, Storescp, storescu, wait_until
from triage.store.models import DeliveryState, StudyState
from triage.store.outbox import Outbox
from triage.testing.synth import make_study, write_study

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


def scoring_config(*destinations: dict[str, Any], **overrides: dict[str, Any]) -> dict[str, Any]:
    """A daemon that scores with the demo model and sends to *destinations*."""
    sections: dict[str, Any] = {
        "study": {"quiet_period_s": 0.5, "check_interval_s": 0.2},
        "worker": {"enabled": True, "decode_processes": 1, "poll_interval_s": 0.2},
        "model": {"allow_unvalidated": True, "batch_size": 4, "batch_wait_ms": 5.0},
        "delivery": {
            "backoff_start_s": 0.5,
            "backoff_factor": 2.0,
            "backoff_max_s": 2.0,
            "max_attempts": 8,
            "timeout_s": 5.0,
        },
        "log": {"level": "info"},
        "destinations": list(destinations),
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


def send_study(daemon: Daemon, folder: Path, **kwargs: Any) -> tuple[str, list[Path]]:
    kwargs.setdefault("rows", 320)
    kwargs.setdefault("cols", 256)
    datasets = make_study(**kwargs)
    files = write_study(datasets, folder)
    run = storescu(daemon.port, files)
    assert run.acknowledged == len(files), run.output
    return str(datasets[0].StudyInstanceUID), files


def wait_state(daemon: Daemon, study_uid: str, *states: StudyState, timeout: float = 180) -> Any:
    store = daemon.store()

    def reached() -> Any:
        study = store.get_study(study_uid)
        return study if study is not None and study.state in states else None

    return wait_until(
        reached, timeout, 0.2, f"{study_uid} in {states}: {daemon.log_text()[-3000:]}"
    )


# One decode process: the worker writes the outputs; two: the pool processes write them and
# the worker commits them (worker._build_outputs).
@pytest.mark.parametrize("decode_processes", [1, 2])
def test_scored_study_comes_back_as_sr_and_overlays_in_the_same_study(
    daemon_factory, tmp_path, decode_processes: int
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    config = scoring_config(
        pacs.destination(),
        outputs={"parametric_maps": True},
        worker={"decode_processes": decode_processes},
    )
    daemon = daemon_factory(config).start()
    study_uid, files = send_study(daemon, tmp_path / "in", body_part="WRIST", views=3, seed=11)
    wait_state(daemon, study_uid, StudyState.DONE)
    received = pacs.received()
    srs = [ds for ds in received if ds.SOPClassUID == SR_CLASS]
    scs = [ds for ds in received if ds.SOPClassUID == SC_CLASS]
    pms = [ds for ds in received if ds.SOPClassUID == PM_CLASS]
    assert len(srs) == 1 and len(scs) == 3 and len(pms) == 3
    assert {(ds.Rows, ds.Columns) for ds in pms} == {(320, 256)}
    sources = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    for ds in received:
        assert ds.StudyInstanceUID == study_uid
        assert ds.Manufacturer == "msk-triage"
    assert {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in scs} == sources
    assert {ds.SeriesInstanceUID for ds in srs}.isdisjoint(
        {str(pydicom.dcmread(f).SeriesInstanceUID) for f in files}
    )
    for path in sorted(p for p in pacs.folder.iterdir()):
        validation = dciodvfy(path)
        assert validation.errors == [], validation.output
    store = daemon.store()
    from triage.store.models import Result

    with store.read_session() as session:
        result = session.query(Result).one()
        view_probabilities = [v.probability for v in result.views]
    assert len(view_probabilities) == 3
    assert result.probability == pytest.approx(sum(view_probabilities) / 3)
    assert result.abnormal == (result.probability > 0.5)
    report = dsrdump(next(p for p in pacs.folder.iterdir() if p.name.startswith("SR")))
    finding = "Abnormal" if result.abnormal else "Normal"
    assert '"Finding")=(' in report and f'"{finding}")' in report
    assert f'"Probability")="{result.probability:.6f}'.rstrip("0") in report
    assert '"Algorithm Name")="mura-densenet169-demo"' in report
    assert '"Algorithm Version")="0.0.0-demo"' in report
    assert "NOT VALIDATED" in report
    assert daemon.stop() == 0
    spool = Path(daemon.sections["store"]["spool_dir"])
    assert list((spool / "tmp").iterdir()) == []  # nothing staged is left behind


def test_a_multi_frame_view_gets_no_parametric_map_and_the_rest_of_its_outputs(
    daemon_factory, tmp_path
) -> None:
    """Scored on its first frame; a parametric map (of single-frame sources only) used to
    fail the whole study's outputs, so it ended FAILED with no SR at all."""
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(
        scoring_config(pacs.destination(), outputs={"parametric_maps": True})
    ).start()
    datasets = make_study(body_part="WRIST", views=2, rows=256, cols=256, seed=14)
    datasets[1].NumberOfFrames = 2
    datasets[1].PixelData = datasets[1].PixelData * 2
    files = write_study(datasets, tmp_path / "in")
    assert storescu(daemon.port, files).acknowledged == 2
    study_uid = str(datasets[0].StudyInstanceUID)
    wait_state(daemon, study_uid, StudyState.DONE)
    received = pacs.received()
    assert len([d for d in received if d.SOPClassUID == SR_CLASS]) == 1
    assert len([d for d in received if d.SOPClassUID == SC_CLASS]) == 2
    [pm] = [d for d in received if d.SOPClassUID == PM_CLASS]
    source = pm.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert source == datasets[0].SOPInstanceUID
    from triage.store.models import Result

    with daemon.store().read_session() as session:
        notes = {v.sop_instance_uid: v.note for v in session.query(Result).one().views}
    assert notes[str(datasets[1].SOPInstanceUID)] == "first of 2 frames"
    assert "parametric_map_not_made" in daemon.log_text()
    assert daemon.stop() == 0


def test_chest_study_is_skipped_and_nothing_is_sent(daemon_factory, tmp_path) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="CHEST", views=2, seed=12)
    study = wait_state(daemon, study_uid, StudyState.SKIPPED)
    assert "CHEST" in study.state_reason.upper()
    assert pacs.received() == []
    assert daemon.stop() == 0


def test_a_view_that_cannot_be_decoded_is_reported_and_the_rest_scored(
    daemon_factory, tmp_path
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    datasets = make_study(body_part="HAND", views=2, rows=256, cols=256, seed=13)
    files = write_study(datasets[:1], tmp_path / "in")
    broken = write_study(datasets[1:], tmp_path / "rle", "rle")[0]
    ds = pydicom.dcmread(broken)
    # A well-formed encapsulation around an RLE frame whose segments are missing.
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (9000).to_bytes(4, "little")
    ds.PixelData = encapsulate([header + b"\x00" * 52 + b"\x7f" * 8])
    ds.save_as(broken)
    for path in (*files, broken):
        flags = ["-xr"] if path == broken else []
        assert storescu(daemon.port, [path], extra=flags).acknowledged == 1
    study_uid = str(datasets[0].StudyInstanceUID)
    wait_state(daemon, study_uid, StudyState.DONE)
    from triage.store.models import Result

    with daemon.store().read_session() as session:
        views = session.query(Result).one().views
        skipped = [v for v in views if v.skipped]
        assert len(views) == 2 and len(skipped) == 1
        assert skipped[0].sop_instance_uid == str(datasets[1].SOPInstanceUID)
        assert "undecodable" in skipped[0].note
    report = dsrdump(next(p for p in pacs.folder.iterdir() if p.name.startswith("SR")))
    assert "not scored" in report
    assert len([d for d in pacs.received() if d.SOPClassUID == SC_CLASS]) == 1
    # The undecodable view left the model's queue too: the count that lets the worker build
    # outputs in its own process while the model is idle is back at 0.
    from tests.test_http import assert_worker_idle, scrape_idle_worker

    assert_worker_idle(scrape_idle_worker(daemon), decode_processes=1, studies=1)
    assert daemon.stop() == 0


def test_late_instance_gives_a_second_sr_naming_the_first(daemon_factory, tmp_path) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    study_uid, files = send_study(daemon, tmp_path / "in", body_part="ELBOW", views=2, seed=14)
    wait_state(daemon, study_uid, StudyState.DONE)
    [first_sr] = [ds for ds in pacs.received() if ds.SOPClassUID == SR_CLASS]
    late = pydicom.dcmread(files[0])
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.InstanceNumber = 9
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    assert storescu(daemon.port, [late_path]).acknowledged == 1
    wait_until(lambda: daemon.store().get_study(study_uid).revision == 2, 30)
    study = wait_state(daemon, study_uid, StudyState.DONE)
    assert study.revision == 2
    srs = [ds for ds in pacs.received() if ds.SOPClassUID == SR_CLASS]
    assert len(srs) == 2
    [second] = [ds for ds in srs if ds.SOPInstanceUID != first_sr.SOPInstanceUID]
    predecessor = second.PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert len([d for d in pacs.received() if d.SOPClassUID == SC_CLASS]) == 2 + 3
    assert daemon.stop() == 0


def test_a_cancelled_study_sent_more_images_and_requeued_gets_new_output_uids(
    daemon_factory, tmp_path
) -> None:
    # A late instance leaves a CANCELLED study cancelled at its revision; a requeue then
    # scores that revision again with another set of images. Under the old SR's UID the
    # PACS (which keeps the first instance per UID) would go on showing the old finding.
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    study_uid, files = send_study(daemon, tmp_path / "in", body_part="HAND", views=2, seed=24)
    wait_state(daemon, study_uid, StudyState.DONE)
    first = {str(ds.SOPInstanceUID) for ds in pacs.received()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env["TRIAGE_CONFIG"] = str(daemon.config_path)
    admin = [str(Path(sys.prefix) / "bin" / "triage-admin")]
    cancel = [*admin, "cancel", study_uid, "--reason", "wrong side"]
    subprocess.run(cancel, check=True, env=env, capture_output=True, timeout=120)
    late = pydicom.dcmread(files[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm")
    assert storescu(daemon.port, [tmp_path / "late.dcm"]).acknowledged == 1
    assert daemon.store().get_study(study_uid).state is StudyState.CANCELLED
    subprocess.run([*admin, "requeue", study_uid], check=True, env=env, capture_output=True)
    study = wait_state(daemon, study_uid, StudyState.DONE)
    assert study.revision == 1
    received = pacs.received()
    second = {str(ds.SOPInstanceUID) for ds in received} - first
    assert len(second) == 4 and len(received) == 3 + 4  # an SR and three overlays, all new
    [sr] = [ds for ds in received if ds.SOPClassUID == SR_CLASS and ds.SOPInstanceUID in second]
    evidence = [
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert len(evidence) == 3  # the late image is in it
    assert daemon.stop() == 0


def test_destination_down_is_retried_with_backoff_until_it_comes_back(
    daemon_factory, tmp_path
) -> None:
    pacs = Storescp(tmp_path / "pacs")  # not started yet
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="FINGER", views=1, seed=15)
    wait_state(daemon, study_uid, StudyState.DELIVERING)
    outbox = Outbox(daemon.store())
    wait_until(
        lambda: all(d.attempts >= 2 for d, _ in outbox.deliveries(study_uid)),
        60,
        0.2,
        "two failed attempts",
    )
    [(delivery, _)] = [row for row in outbox.deliveries(study_uid) if row[1].kind == "sr"]
    assert delivery.state is DeliveryState.PENDING and "cannot connect" in delivery.last_error
    pacs.start()
    wait_state(daemon, study_uid, StudyState.DONE, timeout=60)
    kinds = sorted(str(ds.SOPClassUID) for ds in pacs.received())
    assert kinds == sorted([SR_CLASS, SC_CLASS])
    assert daemon.stop() == 0
    assert '"event": "delivery_failed"' in daemon.log_text()


def test_destination_refusing_the_association_fails_the_study_with_the_reason(
    daemon_factory, tmp_path
) -> None:
    pacs = Storescp(tmp_path / "pacs", extra=["--refuse"]).start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="FOREARM", views=1, seed=16)
    study = wait_state(daemon, study_uid, StudyState.FAILED)
    assert "delivery to pacs failed: association rejected permanently" in study.state_reason
    deliveries = Outbox(daemon.store()).deliveries(study_uid)
    assert {d.state for d, _ in deliveries} >= {DeliveryState.FAILED}
    assert daemon.stop() == 0


_SC_ONLY = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[SCOnly]
PresentationContext1 = SecondaryCaptureImageStorage\\Uncompressed
[[Profiles]]
[SCOnly]
PresentationContexts = SCOnly
"""


def test_a_destination_that_stores_no_sr_fails_for_good_and_holds_back_no_other(
    daemon_factory, tmp_path
) -> None:
    profile = tmp_path / "sc-only.cfg"
    profile.write_text(_SC_ONLY)
    archive = Storescp(tmp_path / "archive", extra=["-xf", str(profile), "SCOnly"]).start()
    pacs = Storescp(tmp_path / "pacs")  # down while the archive refuses
    daemon = daemon_factory(
        scoring_config(archive.destination("archive"), pacs.destination("pacs"))
    ).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="WRIST", views=1, seed=17)
    study = wait_state(daemon, study_uid, StudyState.FAILED)
    # Said as what it is, at once: a configuration to change, not a network to debug.
    assert study.state_reason == (
        "delivery to archive failed: the peer does not store Comprehensive 3D SR Storage "
        "(it does not accept the SOP class)"
    )
    pacs.start()
    outbox = Outbox(daemon.store())
    wait_until(
        lambda: all(
            d.state is DeliveryState.DONE
            for d, _ in outbox.deliveries(study_uid)
            if d.destination == "pacs"
        ),
        60,
        0.2,
        "the PACS to get its objects although the archive failed",
    )
    assert sorted(str(ds.SOPClassUID) for ds in pacs.received()) == sorted([SR_CLASS, SC_CLASS])
    # Retried, the SR goes alone: the peer accepts no context at all, and says so again.
    assert len(outbox.retry(study_uid=study_uid)) == 1
    study = wait_state(daemon, study_uid, StudyState.FAILED)
    assert study.state_reason == (
        "delivery to archive failed: the peer stores none of the SOP classes offered: "
        "Comprehensive 3D SR Storage (it does not accept the SOP class)"
    )
    [sr] = [
        d for d, o in outbox.deliveries(study_uid) if d.destination == "archive" and o.kind == "sr"
    ]
    assert sr.attempts == 1  # not retried as if the peer were down
    assert daemon.stop() == 0


def test_crash_between_send_and_bookkeeping_resends_the_same_instances(
    daemon_factory, tmp_path
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(
        scoring_config(pacs.destination()), env={"MSK_TRIAGE_FAILPOINTS": "after_send"}
    ).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="SHOULDER", views=2, seed=17)
    assert daemon.process.wait(180) == -9  # SIGKILL right after the first acknowledged C-STORE
    first_round = {str(ds.SOPInstanceUID) for ds in pacs.received()}
    assert len(first_round) == 1
    daemon.env = {}
    daemon.start()
    wait_state(daemon, study_uid, StudyState.DONE)
    received = pacs.received()
    outputs = {o.sop_instance_uid for _, o in Outbox(daemon.store()).deliveries(study_uid)}
    assert {str(ds.SOPInstanceUID) for ds in received} == outputs  # no new UIDs
    assert len(outputs) == 3  # one SR and two overlays
    assert pacs.log_text().count(sorted(first_round)[0]) >= 2  # the first object came twice
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_worker_killed_mid_study_is_scored_exactly_once_after_restart(
    daemon_factory, tmp_path, request, backend
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    # The lease outlasts the test: the restart, not its expiry, gives the study back (on
    # PostgreSQL because the claim's owner was a process of this host that is gone).
    config = scoring_config(pacs.destination(), worker={"lease_s": 3600.0})
    if backend == "postgresql":
        config["store"] = {"url": request.getfixturevalue("pg_url")}
    daemon = daemon_factory(config, env={"MSK_TRIAGE_FAILPOINTS": "before_complete"}).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="HUMERUS", views=2, seed=18)
    assert daemon.process.wait(180) == -9  # outputs built, result not yet recorded
    study = daemon.store().get_study(study_uid)
    assert study.state is StudyState.SCORING and study.attempts == 1
    daemon.env = {}
    daemon.start()
    study = wait_state(daemon, study_uid, StudyState.DONE)
    assert study.attempts == 2
    from triage.store.models import Result

    with daemon.store().read_session() as session:
        assert session.query(Result).count() == 1
    events = [(e.to_state.value, e.reason) for e in daemon.store().study_history(study_uid)]
    assert sum(1 for state, _ in events if state == "SCORING") == 2
    assert any("released at restart" in reason for _, reason in events)
    assert len({str(ds.SOPInstanceUID) for ds in pacs.received()}) == 3
    assert daemon.stop() == 0


def test_a_study_finished_in_the_stop_grace_reaches_the_pacs_before_the_daemon_exits(
    daemon_factory, tmp_path
) -> None:
    # The study's outputs are built and its result about to be recorded when SIGTERM comes:
    # the worker's grace lets it finish, and the sender, stopped last, delivers it in the
    # round it makes after the stop.
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(
        scoring_config(pacs.destination()), env={"MSK_TRIAGE_FAILPOINTS": "before_complete:3"}
    ).start()
    study_uid, _ = send_study(daemon, tmp_path / "in", body_part="ELBOW", views=2, seed=19)
    daemon.wait_for_log('"event": "failpoint_paused"', 180)
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert log.index('"event": "stopping"') < log.index('"event": "study_scored"')
    study = daemon.store().get_study(study_uid)
    assert study.state is StudyState.DONE, study.state_reason
    outputs = {o.sop_instance_uid for _, o in Outbox(daemon.store()).deliveries(study_uid)}
    assert len(outputs) == 3  # one SR and two overlays
    assert {str(ds.SOPInstanceUID) for ds in pacs.received()} == outputs


def test_a_decode_process_that_never_answers_does_not_keep_the_daemon_running(
    daemon_factory, tmp_path
) -> None:
    """A codec in an endless loop, or a process stopped by hand: at SIGTERM the worker kills
    what still runs after its grace, where the daemon stayed up after logging "stopped"."""
    import json
    import signal

    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(
        scoring_config(
            pacs.destination(), worker={"decode_processes": 2}, dicom={"shutdown_grace_s": 2}
        )
    ).start()
    listeners = {
        json.loads(line)["pid"]
        for line in daemon.log_text().splitlines()
        if '"event": "listener_started"' in line
    }
    decoders = []
    for pid in daemon.children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and pid not in listeners:
            decoders.append(pid)
    assert len(decoders) == 2, (daemon.children, listeners)
    for pid in decoders:
        os.kill(pid, signal.SIGSTOP)
    assert daemon.stop(timeout=60) == 0
    assert '"event": "decode_processes_killed"' in daemon.log_text()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in decoders), timeout=10)
    pacs.stop()
