"""Orthanc as the PACS: studies go to msk-triage the way a routing rule sends them, and the
SR and CAM overlays come back into the same study in Orthanc.

Two Orthanc + daemon pairs, each started once per module (a scoring daemon takes 20–40 s to
start here):

- ``routed``: Orthanc runs the shipped Lua rule (``deploy/orthanc/route-to-triage.lua``) that
  sends stable studies' radiographs to triage; the tests only upload over REST and wait.
- ``manual``: no Lua; a test sends with ``POST /modalities/triage/store``, as an operator or an
  external router would, which also lets it stop Orthanc at a chosen moment.

Every wait is bounded; contents are checked over Orthanc's REST API (``/tags?simplify``) against
what triage recorded in its store.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.orthanc import Orthanc
from tests.peers import Daemon, Storescp, free_port, wait_until
from triage.store.models import AssociationRecord, Result, StudyState
from triage.store.outbox import Outbox
from triage.study_types import StudyType
from triage.testing.synth import make_study, write_study

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OWN_MANUFACTURER = "msk-triage"
ABNORMAL, NORMAL = "263654008", "17621005"  # SNOMED CT
FINDING, PROBABILITY, MEASUREMENT_GROUP = "121071", "122157", "125007"  # DCM
#: Small images keep scoring and overlays fast; the model resizes to 224² anyway.
ROWS, COLS = 256, 208
TRIAGE_AE, ORTHANC_AE = "TRIAGE", "ORTHANC"


@dataclass
class Pair:
    """One Orthanc and the triage daemon that knows it as its destination."""

    orthanc: Orthanc
    daemon: Daemon

    def stop(self) -> None:
        """Stop both at once (each takes seconds to exit); a daemon that does not exit cleanly
        is killed, listener children too, so nothing outlives the module."""
        process = self.daemon.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            self.orthanc.stop()
        finally:
            try:
                clean = process is None or process.wait(60) == 0
            except subprocess.TimeoutExpired:
                clean = False
            if not clean:
                self.daemon.kill()


def _triage_sections(orthanc: Orthanc, port: int, quiet_period_s: float) -> dict[str, Any]:
    """A scoring daemon (demo model allowed) on *port* that sends results to *orthanc*."""
    return {
        "dicom": {"port": port, "allowed_peers": [ORTHANC_AE]},
        "study": {"quiet_period_s": quiet_period_s, "check_interval_s": 0.2},
        "worker": {"enabled": True, "decode_processes": 1, "poll_interval_s": 0.2},
        "model": {"allow_unvalidated": True, "batch_size": 4, "batch_wait_ms": 5.0},
        "delivery": {
            "backoff_start_s": 0.5,
            "backoff_factor": 2.0,
            "backoff_max_s": 2.0,
            "max_attempts": 30,
            "timeout_s": 5.0,
        },
        "log": {"level": "info"},
        "destinations": [orthanc.destination()],
    }


def _start_pair(folder: Path, *, routing: bool, quiet_period_s: float) -> Pair:
    port = free_port()
    orthanc = Orthanc(folder / "orthanc", (TRIAGE_AE, port), routing=routing, stable_age_s=1)
    daemon = Daemon(folder / "triage", _triage_sections(orthanc, port, quiet_period_s))
    pair = Pair(orthanc, daemon)
    try:
        orthanc.start()
        daemon.start()
    except BaseException:
        pair.stop()
        raise
    return pair


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Orthanc with the Lua auto-routing rule, and triage."""
    pair = _start_pair(tmp_path_factory.mktemp("routed"), routing=True, quiet_period_s=0.5)
    yield pair
    pair.stop()


@pytest.fixture(scope="module")
def manual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Orthanc without routing rules, and triage. The quiet period leaves a test time to stop
    Orthanc after its store to triage returned and before the results are ready."""
    pair = _start_pair(tmp_path_factory.mktemp("manual"), routing=False, quiet_period_s=5.0)
    yield pair
    pair.stop()


# --- helpers -----------------------------------------------------------------------------


@dataclass
class Sent:
    """A synthetic study as written to disk and uploaded to Orthanc."""

    study_uid: str
    files: list[Path]
    #: Orthanc's IDs of the uploaded instances, and of the study.
    instance_ids: list[str]
    study_id: str

    @property
    def sop_uids(self) -> set[str]:
        return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in self.files}


def upload(orthanc: Orthanc, datasets: list[pydicom.Dataset], folder: Path) -> Sent:
    """Write *datasets* and ``POST /instances`` them to Orthanc."""
    files = write_study(datasets, folder)
    answers = orthanc.upload(files)
    return Sent(
        str(datasets[0].StudyInstanceUID),
        files,
        [a["ID"] for a in answers],
        answers[0]["ParentStudy"],
    )


def study(body_part: StudyType | str, views: int, seed: int) -> list[pydicom.Dataset]:
    return make_study(body_part=body_part, views=views, rows=ROWS, cols=COLS, seed=seed)


def scanned_document(source: pydicom.Dataset) -> pydicom.Dataset:
    """A secondary capture (Modality OT) in the same study: a scanned requisition, say. It is
    no radiograph, so the routing rule must not send it."""
    ds = copy.deepcopy(source)
    ds.SOPClassUID = SC_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 50
    ds.SeriesDescription = "Scanned requisition"
    ds.Manufacturer = "Document Scanners Inc"
    return ds


@dataclass
class Outputs:
    """msk-triage's objects in one Orthanc study, with their simplified tags."""

    srs: list[dict[str, Any]]
    scs: list[dict[str, Any]]


def outputs_in_orthanc(orthanc: Orthanc, study_id: str) -> Outputs:
    """The SRs and overlays msk-triage stored in the study (series by Manufacturer)."""
    srs, scs = [], []
    for series in orthanc.series(study_id):
        if series["MainDicomTags"].get("Manufacturer") != OWN_MANUFACTURER:
            continue
        for instance_id in series["Instances"]:
            tags = orthanc.instance_tags(instance_id)
            (srs if tags["SOPClassUID"] == SR_CLASS else scs).append(tags)
    return Outputs(srs, scs)


def wait_outputs(
    orthanc: Orthanc, daemon: Daemon, sent: Sent, srs: int, scs: int, timeout: float = 240
) -> Outputs:
    """Wait, bounded, until Orthanc's study holds *srs* SRs and *scs* overlays."""

    def ready() -> Outputs | None:
        outputs = outputs_in_orthanc(orthanc, sent.study_id)
        return outputs if len(outputs.srs) >= srs and len(outputs.scs) >= scs else None

    outputs = wait_until(
        ready,
        timeout,
        0.25,
        f"{srs} SR and {scs} SC in Orthanc study {sent.study_uid}\n"
        f"triage log:\n{daemon.log_text()[-3000:]}\nOrthanc log:\n{orthanc.log_text()[-2000:]}",
    )
    assert len(outputs.srs) == srs and len(outputs.scs) == scs
    return outputs


def content_items(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every SR content item below *items*, depth first."""
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def concept(item: dict[str, Any]) -> str:
    """The code value of a content item's concept name."""
    return str(item["ConceptNameCodeSequence"][0]["CodeValue"])


@dataclass
class Group:
    """One TID 1501 measurement group of the SR: its probability, finding and source images."""

    probability: float
    finding: str | None
    sources: set[str]
    finding_site: str | None


def measurement_groups(sr: dict[str, Any]) -> list[Group]:
    """The measurement groups of an SR's simplified tags."""
    groups = []
    for item in content_items(sr["ContentSequence"]):
        if item.get("ValueType") != "CONTAINER" or concept(item) != MEASUREMENT_GROUP:
            continue
        children = item.get("ContentSequence", [])
        [probability] = [
            float(c["MeasuredValueSequence"][0]["NumericValue"])
            for c in children
            if c["ValueType"] == "NUM" and concept(c) == PROBABILITY
        ]
        findings = [
            c["ConceptCodeSequence"][0]["CodeValue"]
            for c in children
            if c["ValueType"] == "CODE" and concept(c) == FINDING
        ]
        sites = [
            c["ConceptCodeSequence"][0]["CodeValue"]
            for c in children
            if c["ValueType"] == "CODE" and concept(c) == "363698007"  # Finding Site
        ]
        sources = {
            ref["ReferencedSOPInstanceUID"]
            for c in children
            if c["ValueType"] == "IMAGE"
            for ref in c["ReferencedSOPSequence"]
        }
        groups.append(
            Group(probability, findings[0] if findings else None, sources, next(iter(sites), None))
        )
    return groups


def evidence(sr: dict[str, Any]) -> dict[str, set[str]]:
    """StudyInstanceUID → SOP instance UIDs of the SR's current requested procedure evidence."""
    found: dict[str, set[str]] = {}
    for study_item in sr["CurrentRequestedProcedureEvidenceSequence"]:
        uids = found.setdefault(study_item["StudyInstanceUID"], set())
        for series_item in study_item["ReferencedSeriesSequence"]:
            uids |= {i["ReferencedSOPInstanceUID"] for i in series_item["ReferencedSOPSequence"]}
    return found


def stored_result(daemon: Daemon, study_uid: str, revision: int) -> tuple[Result, dict[str, float]]:
    """triage's result for a study revision, and its view probabilities by SOP instance UID."""
    from triage.store.models import Study

    with daemon.store().read_session() as session:
        result = (
            session.query(Result)
            .join(Study, Study.id == Result.study_id)
            .filter(Study.study_uid == study_uid, Result.revision == revision)
            .one()
        )
        views = {v.sop_instance_uid: v.probability for v in result.views if not v.skipped}
        session.expunge(result)
    return result, views


def check_sr(
    sr: dict[str, Any], daemon: Daemon, sent: Sent, sources: set[str], revision: int = 1
) -> None:
    """The SR is in the source study, says what triage decided, and references its sources."""
    result, views = stored_result(daemon, sent.study_uid, revision)
    assert sr["StudyInstanceUID"] == sent.study_uid
    assert sr["Manufacturer"] == OWN_MANUFACTURER
    assert sr["Modality"] == "SR"
    assert set(views) == sources
    [study_group] = [g for g in measurement_groups(sr) if g.finding is not None]
    assert study_group.finding == (ABNORMAL if result.abnormal else NORMAL)
    assert study_group.probability == pytest.approx(result.probability, abs=1e-6)
    assert study_group.sources == sources
    view_groups = [g for g in measurement_groups(sr) if g.finding is None]
    assert {next(iter(g.sources)): g.probability for g in view_groups} == pytest.approx(views)
    assert evidence(sr) == {sent.study_uid: sources}


def check_overlays(scs: list[dict[str, Any]], sent: Sent, sources: set[str]) -> None:
    """One overlay per scored view, in the source study, each naming its view."""
    referenced = [sc["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for sc in scs]
    assert sorted(referenced) == sorted(sources)
    for sc in scs:
        assert sc["StudyInstanceUID"] == sent.study_uid
        assert sc["SOPClassUID"] == SC_CLASS
        assert sc["Manufacturer"] == OWN_MANUFACTURER


def wait_state(daemon: Daemon, study_uid: str, *states: StudyState, timeout: float = 180) -> Any:
    store = daemon.store()

    def reached() -> Any:
        found = store.get_study(study_uid)
        return found if found is not None and found.state in states else None

    return wait_until(
        reached, timeout, 0.2, f"{study_uid} in {states}: {daemon.log_text()[-3000:]}"
    )


def orthanc_associations(daemon: Daemon) -> list[AssociationRecord]:
    return [a for a in daemon.store().associations(1000) if a.calling_ae.strip() == ORTHANC_AE]


def assert_nothing_routed_back(pair: Pair) -> None:
    """No SR, overlay, re-sent or foreign instance ever reached triage from Orthanc: the
    listener counts own outputs and already-held instances as duplicates."""
    associations = orthanc_associations(pair.daemon)
    assert sum(a.instances_duplicate for a in associations) == 0
    assert sum(a.instances_failed for a in associations) == 0
    assert not [line for line in pair.orthanc.lua_log() if "FAILED" in line]


def wait_lua(orthanc: Orthanc, pattern: str, timeout: float = 30) -> list[str]:
    """Wait until the routing script logged a line matching *pattern*."""
    regex = re.compile(pattern)
    return wait_until(
        lambda: [line for line in orthanc.lua_log() if regex.search(line)],
        timeout,
        0.2,
        f"routing script line {pattern!r}; it logged: {orthanc.lua_log()}",
    )


# --- the Lua auto-routing rule -------------------------------------------------------------


def test_one_study_per_mura_type_routed_by_the_lua_rule_comes_back_without_loop(
    routed: Pair, tmp_path: Path
) -> None:
    orthanc, daemon = routed.orthanc, routed.daemon
    sent: dict[StudyType, Sent] = {}
    radiographs: dict[StudyType, set[str]] = {}
    for index, study_type in enumerate(StudyType):
        datasets = study(study_type, views=1 + index % 2, seed=100 + index)
        radiographs[study_type] = {str(ds.SOPInstanceUID) for ds in datasets}
        if study_type is StudyType.WRIST:  # plus a series the rule must not send
            datasets.append(scanned_document(datasets[0]))
        sent[study_type] = upload(orthanc, datasets, tmp_path / study_type.value)
    for study_type, one in sent.items():
        views = radiographs[study_type]
        outputs = wait_outputs(orthanc, daemon, one, srs=1, scs=len(views))
        check_sr(outputs.srs[0], daemon, one, views)
        check_overlays(outputs.scs, one, views)
        assert daemon.store().get_study(one.study_uid).study_type == study_type.value
        [group] = [g for g in measurement_groups(outputs.srs[0]) if g.finding is not None]
        assert group.finding_site == study_type.finding_site[0]
        # triage got the radiographs, each once, and not the scanned document.
        instances = daemon.store().study_instances(one.study_uid)
        assert sorted(i.sop_instance_uid for i in instances) == sorted(views)
    # Our results made every study stable once more: the rule ran again and sent nothing.
    for one in sent.values():
        wait_lua(orthanc, f"study {one.study_id}: nothing to send")
    for one in sent.values():
        assert len(wait_lua(orthanc, f"study {one.study_id}: sent ")) == 1
        found = daemon.store().get_study(one.study_uid)
        assert (found.state, found.revision) == (StudyState.DONE, 1)
        assert len(outputs_in_orthanc(orthanc, one.study_id).srs) == 1
    assert_nothing_routed_back(routed)
    # Exactly what went is marked: every radiograph, not the document.
    document_id = sent[StudyType.WRIST].instance_ids[-1]
    for one in sent.values():
        for instance_id in one.instance_ids:
            marked = "MskTriageRouted" in orthanc.instance_metadata(instance_id)
            assert marked == (instance_id != document_id)


def test_non_eligible_study_is_skipped_and_nothing_comes_back(routed: Pair, tmp_path: Path) -> None:
    orthanc, daemon = routed.orthanc, routed.daemon
    sent = upload(orthanc, study("KNEE", views=2, seed=200), tmp_path / "knee")
    wait_lua(orthanc, f"study {sent.study_id}: sent 2 instances")
    skipped = wait_state(daemon, sent.study_uid, StudyState.SKIPPED)
    assert "KNEE" in skipped.state_reason.upper()
    assert Outbox(daemon.store()).deliveries(sent.study_uid) == []
    # Longer than a stable age and a sender round: still only the knee's two series.
    time.sleep(3)
    series = orthanc.series(sent.study_id)
    assert len(series) == 2
    assert {s["MainDicomTags"]["Modality"] for s in series} == {"DX"}
    assert_nothing_routed_back(routed)


def test_study_sent_in_two_bursts_gets_a_second_sr_naming_the_first(
    routed: Pair, tmp_path: Path
) -> None:
    orthanc, daemon = routed.orthanc, routed.daemon
    datasets = study(StudyType.ELBOW, views=3, seed=300)
    first = upload(orthanc, datasets[:2], tmp_path / "burst1")
    outputs = wait_outputs(orthanc, daemon, first, srs=1, scs=2)
    check_sr(outputs.srs[0], daemon, first, first.sop_uids)
    [first_sr] = outputs.srs
    # The technologist adds a view after the results came back: a second stable event.
    late = upload(orthanc, datasets[2:], tmp_path / "burst2")
    assert late.study_id == first.study_id
    wait_lua(orthanc, f"study {first.study_id}: sent 1 instances")
    everything = Sent(
        first.study_uid,
        first.files + late.files,
        first.instance_ids + late.instance_ids,
        first.study_id,
    )
    outputs = wait_outputs(orthanc, daemon, everything, srs=2, scs=2 + 3)
    [second_sr] = [sr for sr in outputs.srs if sr["SOPInstanceUID"] != first_sr["SOPInstanceUID"]]
    found = wait_state(daemon, first.study_uid, StudyState.DONE)
    assert found.revision == 2
    check_sr(second_sr, daemon, everything, everything.sop_uids, revision=2)
    [predecessor] = second_sr["PredecessorDocumentsSequence"]
    assert predecessor["StudyInstanceUID"] == first.study_uid
    [series_item] = predecessor["ReferencedSeriesSequence"]
    assert series_item["SeriesInstanceUID"] == first_sr["SeriesInstanceUID"]
    [referenced] = series_item["ReferencedSOPSequence"]
    assert referenced["ReferencedSOPInstanceUID"] == first_sr["SOPInstanceUID"]
    # Only the late view went the second time; the results of revision 2 sent nothing back.
    instances = daemon.store().study_instances(first.study_uid)
    assert sorted(i.revision for i in instances) == [1, 1, 2]
    wait_lua(orthanc, f"study {first.study_id}: nothing to send")
    assert daemon.store().get_study(first.study_uid).revision == 2
    assert_nothing_routed_back(routed)


# --- an explicit store, as an operator or an external router does ---------------------------


def test_explicit_store_to_the_triage_modality_comes_back_as_sr_and_overlays(
    manual: Pair, tmp_path: Path
) -> None:
    orthanc, daemon = manual.orthanc, manual.daemon
    sent = upload(orthanc, study(StudyType.HAND, views=3, seed=400), tmp_path / "hand")
    answer = orthanc.store_to_modality([sent.study_id])
    assert answer["InstancesCount"] == 3 and answer["FailedInstancesCount"] == 0
    outputs = wait_outputs(orthanc, daemon, sent, srs=1, scs=3)
    check_sr(outputs.srs[0], daemon, sent, sent.sop_uids)
    check_overlays(outputs.scs, sent, sent.sop_uids)
    assert wait_state(daemon, sent.study_uid, StudyState.DONE).revision == 1
    # The whole study again, our SR and overlays in it (the manual re-send of
    # deploy/orthanc/README.md): every object goes, and nothing is scored again.
    again = orthanc.store_to_modality([sent.study_id])
    assert again["InstancesCount"] == 3 + 1 + 3 and again["FailedInstancesCount"] == 0
    assert wait_state(daemon, sent.study_uid, StudyState.DONE).revision == 1


def test_results_ready_while_orthanc_is_stopped_are_delivered_when_it_returns(
    manual: Pair, tmp_path: Path
) -> None:
    orthanc, daemon = manual.orthanc, manual.daemon
    sent = upload(orthanc, study(StudyType.SHOULDER, views=2, seed=500), tmp_path / "shoulder")
    answer = orthanc.store_to_modality([sent.study_id])
    assert answer["InstancesCount"] == 2 and answer["FailedInstancesCount"] == 0
    assert orthanc.stop() == 0  # before the quiet period is over: the results are not ready
    outbox = Outbox(daemon.store())
    wait_state(daemon, sent.study_uid, StudyState.DELIVERING)
    deliveries = wait_until(
        lambda: (
            (rows := outbox.deliveries(sent.study_uid))
            and all(d.attempts >= 2 for d, _ in rows)
            and rows
        ),
        90,
        0.2,
        f"two failed attempts per output: {daemon.log_text()[-3000:]}",
    )
    assert all("cannot connect" in d.last_error for d, _ in deliveries)
    built = {o.sop_instance_uid for _, o in deliveries}
    assert len(built) == 1 + 2
    orthanc.start()
    outputs = wait_outputs(orthanc, daemon, sent, srs=1, scs=2, timeout=60)
    wait_state(daemon, sent.study_uid, StudyState.DONE, timeout=60)
    delivered = {tags["SOPInstanceUID"] for tags in outputs.srs + outputs.scs}
    assert delivered == built  # the objects built before the outage, not new ones
    check_sr(outputs.srs[0], daemon, sent, sent.sop_uids)
    check_overlays(outputs.scs, sent, sent.sop_uids)
    # The study survived the restart in Orthanc, sources and results together.
    assert orthanc.study_id(sent.study_uid) == sent.study_id
    assert len(orthanc.get(f"/studies/{sent.study_id}/instances")) == 2 + 3


def test_orthanc_refusing_an_unknown_calling_ae_is_reported_as_such(tmp_path: Path) -> None:
    """Orthanc accepts an association from an AE title missing from DicomModalities and
    aborts it at the first C-STORE: the delivery's error names the calling AE title to add
    there, not a timeout, and stays due (retried after its backoff)."""
    from tests.test_admin import sender_site
    from triage.dicom.sender import Sender
    from triage.store.models import DeliveryState

    orthanc = Orthanc(tmp_path / "orthanc", triage=("TRIAGE", free_port())).start()
    try:
        _path, config, store, spool, study_uid = sender_site(
            tmp_path,
            {"port": orthanc.dicom_port, "ae_title": orthanc.ae_title, "calling_ae": "STRANGER"},
        )
        try:
            Sender(config, store, spool).deliver_once(config.destinations[0])
            deliveries = [delivery for delivery, _ in Outbox(store).deliveries(study_uid)]
        finally:
            store.engine.dispose()
        stored = orthanc.get("/instances")
    finally:
        orthanc.stop()
    assert stored == []
    assert {d.state for d in deliveries} == {DeliveryState.PENDING}
    errors = sorted(d.last_error for d in deliveries)
    assert any("calling AE title it does not know (STRANGER)" in e for e in errors), errors


# --- the routing rule against a plain storescp as msk-triage (no scoring daemon) -----------


def _storescp_triage(folder: Path, port: int | None = None) -> Storescp:
    """DCMTK storescp answering as msk-triage: it acknowledges whatever the rule sends."""
    return Storescp(folder, ae_title=TRIAGE_AE, port=port or free_port())


def _received_uids(peer: Storescp) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in peer.received()} if peer.folder.exists() else set()


def test_study_whose_routing_failed_is_sent_once_triage_is_back(tmp_path: Path) -> None:
    """msk-triage down (a restart, an upgrade) when a study became stable: the rule retries the
    study at a later stable event instead of leaving it for an operator to notice."""
    triage = _storescp_triage(tmp_path / "triage")
    orthanc = Orthanc(tmp_path / "orthanc", (TRIAGE_AE, triage.port), routing=True).start()
    try:
        missed = upload(orthanc, study(StudyType.WRIST, views=2, seed=600), tmp_path / "a")
        wait_lua(orthanc, f"study {missed.study_id}: sending 2 instances to triage FAILED")
        triage.start()
        later = upload(orthanc, study(StudyType.HAND, views=1, seed=601), tmp_path / "b")
        wait_until(
            lambda: _received_uids(triage) >= missed.sop_uids | later.sop_uids,
            30,
            0.2,
            f"both studies at triage; the rule logged {orthanc.lua_log()}",
        )
        for instance_id in missed.instance_ids + later.instance_ids:
            assert "MskTriageRouted" in orthanc.instance_metadata(instance_id)
    finally:
        orthanc.stop()
        triage.stop()


def test_study_not_yet_stable_when_orthanc_stops_is_routed_after_its_restart(
    tmp_path: Path,
) -> None:
    """Orthanc keeps the studies waiting for their stable age in memory only: a study received
    shortly before a restart never has a stable event. The rule routes it at start-up."""
    triage = _storescp_triage(tmp_path / "triage").start()
    orthanc = Orthanc(
        tmp_path / "orthanc", (TRIAGE_AE, triage.port), routing=True, stable_age_s=8
    ).start()
    try:
        sent = upload(orthanc, study(StudyType.ELBOW, views=2, seed=610), tmp_path / "a")
        assert orthanc.stop() == 0
        assert not [line for line in orthanc.lua_log() if ": sent " in line]  # not stable yet
        orthanc.start()
        # Longer than the stable age: Orthanc itself calls the rule no more for this study.
        wait_until(
            lambda: _received_uids(triage) >= sent.sop_uids,
            20,
            0.2,
            f"the study at triage; the rule logged {orthanc.lua_log()}",
        )
    finally:
        orthanc.stop()
        triage.stop()


def _store_from(orthanc: Orthanc, dataset: pydicom.Dataset, calling_ae: str, host: str) -> bool:
    """C-STORE *dataset* into Orthanc as *calling_ae* from the local address *host*; whether
    Orthanc answered Success."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(
        "127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title, bind_address=(host, 0)
    )
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_store(dataset)
    finally:
        if assoc.is_established:
            assoc.release()
    return status is not None and status.get("Status") == 0


def test_only_triage_s_host_may_store_into_orthanc_as_triage(tmp_path: Path) -> None:
    """The AE title alone is no credential: a node elsewhere calling itself TRIAGE must not
    store into the PACS (DicomCheckModalityHost)."""
    orthanc = Orthanc(tmp_path / "orthanc", (TRIAGE_AE, free_port())).start()
    try:
        files = write_study(study(StudyType.WRIST, views=2, seed=620), tmp_path / "a")
        first, second = (pydicom.dcmread(f) for f in files)
        assert not _store_from(orthanc, first, TRIAGE_AE, "127.0.0.2")
        assert orthanc.get("/instances") == []
        assert _store_from(orthanc, second, TRIAGE_AE, "127.0.0.1")
        assert len(orthanc.get("/instances")) == 1
    finally:
        orthanc.stop()


def test_an_instance_triage_refuses_does_not_hold_up_the_rest_of_its_study(
    tmp_path: Path,
) -> None:
    """One instance msk-triage refuses (here a DX without pixel data: 0xA900) failed Orthanc's
    whole store job, so none of the study was marked, and every later try sent it all again
    and failed again. The rule now sends one by one once msk-triage answers a C-ECHO: the rest
    are acknowledged and marked, the refused one is counted and tried again at most
    MaxAttempts times."""
    port = free_port()
    daemon = Daemon(tmp_path / "triage", {"dicom": {"port": port, "allowed_peers": [ORTHANC_AE]}})
    orthanc = Orthanc(tmp_path / "orthanc", (TRIAGE_AE, port), routing=True)
    settings = orthanc.configuration()["MskTriage"]
    orthanc.overrides = {"MskTriage": {**settings, "MaxAttempts": 2}}
    orthanc.config_path.write_text(json.dumps(orthanc.configuration(), indent=2) + "\n")
    try:
        daemon.start()
        orthanc.start()
        datasets = study(StudyType.WRIST, views=3, seed=630)
        del datasets[1].PixelData
        sent = upload(orthanc, datasets, tmp_path / "a")
        bad = sent.instance_ids[1]
        line = f"study {sent.study_id}: sent 2 instances to triage, 1 REFUSED \\({bad};"
        wait_lua(orthanc, line)
        held = {i.sop_instance_uid for i in daemon.store().study_instances(sent.study_uid)}
        assert held == sent.sop_uids - {str(datasets[1].SOPInstanceUID)}
        for instance_id in sent.instance_ids:
            metadata = orthanc.instance_metadata(instance_id)
            if instance_id == bad:
                assert metadata.get("MskTriageRefused") == 1  # the REST answer, as JSON
                assert "MskTriageRouted" not in metadata
            else:
                assert "MskTriageRouted" in metadata
        # Late images make the study stable again: the refused one is tried once more with
        # them, then no more (MaxAttempts 2).
        for attempt, seed in ((2, 631), (3, 632)):
            late = copy.deepcopy(study(StudyType.WRIST, views=1, seed=seed)[0])
            late.StudyInstanceUID = datasets[0].StudyInstanceUID
            late.PatientID = datasets[0].PatientID
            upload(orthanc, [late], tmp_path / f"late{seed}")
            if attempt == 2:
                line = f"study {sent.study_id}: sent 1 instances to triage, 1 REFUSED \\({bad};"
            else:
                line = f"study {sent.study_id}: sent 1 instances to triage \\(4 skipped\\)"
            wait_lua(orthanc, line)
        assert orthanc.instance_metadata(bad).get("MskTriageRefused") == 2
        assert not [line for line in orthanc.lua_log() if "FAILED" in line]
    finally:
        orthanc.stop()
        daemon.stop()


def test_priors_from_an_archive_s_ae_title_are_not_routed(tmp_path: Path) -> None:
    """A prior retrieved from the archive (C-MOVE: stored into Orthanc by the archive's AE)
    is no new acquisition: scored, its results would land in an old study. Instances from a
    calling AE title in SkipCallingAETs are never sent."""
    triage = _storescp_triage(tmp_path / "triage").start()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        (TRIAGE_AE, triage.port),
        routing=True,
        overrides={"DicomAlwaysAllowStore": True},
    )
    config = orthanc.configuration()
    config["MskTriage"]["SkipCallingAETs"] = ["ARCHIVE"]
    orthanc.overrides = {"DicomAlwaysAllowStore": True, "MskTriage": config["MskTriage"]}
    orthanc.config_path.write_text(json.dumps(orthanc.configuration(), indent=2) + "\n")
    orthanc.start()
    try:
        files = write_study(study(StudyType.HAND, views=2, seed=640), tmp_path / "prior")
        for path in files:
            assert _store_from(orthanc, pydicom.dcmread(path), "ARCHIVE", "127.0.0.1")
        new = upload(orthanc, study(StudyType.HAND, views=1, seed=641), tmp_path / "new")
        wait_until(
            lambda: _received_uids(triage) >= new.sop_uids,
            30,
            0.2,
            f"the new study at triage; the rule logged {orthanc.lua_log()}",
        )
        prior_id = orthanc.study_id(str(pydicom.dcmread(files[0]).StudyInstanceUID))
        wait_lua(orthanc, f"study {prior_id}: nothing to send \\(2 instances skipped\\)")
        assert _received_uids(triage) == new.sop_uids
    finally:
        orthanc.stop()
        triage.stop()
