"""`triage-admin` against real stores (SQLite and PostgreSQL) holding studies in every state.

The store is filled through the same APIs the daemon uses (Store, WorkQueue, Outbox, the
operator actions), with real DICOM files in the spool; the commands run through `main()` (and
once as the installed `triage-admin` script beside a running daemon). Every command is checked
in both output forms, its JSON schema and its exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from tests.peers import Storescp, free_port, write_config
from triage import __version__
from triage.cli.admin import echo, main
from triage.scoring.result import ModelInfo, SkippedView, StudyResult, ViewResult
from triage.store.db import make_engine, upgrade_schema
from triage.store.models import Delivery, DeliveryState, Study, StudyState, utcnow
from triage.store.operations import cancel
from triage.store.outbox import Backoff, Outbox
from triage.store.repository import InstanceMeta, Store
from triage.store.spool import Spool
from triage.store.work_queue import OutputFile, WorkQueue
from triage.study_types import StudyType
from triage.testing.synth import make_study, write_study
from triage.uids import derived_uid

MODEL = ModelInfo(name="mura-densenet169-demo", version="0.0.0-demo", validated=False)
PATIENT = {"name": "Quixote^Alonso", "id": "PID-7741-ZZ", "birth": "19470913"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Site:
    """A config file, its store and spool, and which study is in which state."""

    config: Path
    store: Store
    spool: Spool
    url: str
    uids: dict[str, str] = field(default_factory=dict)
    failed_delivery_id: int = 0
    #: Runs `triage-admin --config … ARGS` in-process: (exit code, stdout, stderr).
    admin: Callable[..., tuple[int, str, str]] = field(default=lambda *args: (0, "", ""))


def _spool_study(spool: Spool, seed: int, body_part: str = "WRIST", views: int = 2) -> list:
    """Write a small synthetic study into the spool; returns its data sets."""
    datasets = make_study(
        body_part=body_part,
        views=views,
        rows=64,
        cols=64,
        seed=seed,
        patient_name=PATIENT["name"],
        patient_id=PATIENT["id"],
        patient_birth_date=PATIENT["birth"],
    )
    written = write_study(datasets, spool.root / "incoming")
    for ds, path in zip(datasets, written, strict=True):
        relative = spool.relative_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        (spool.root / relative).parent.mkdir(parents=True, exist_ok=True)
        path.rename(spool.root / relative)
    return datasets


def _receive(store: Store, spool: Spool, seed: int, **kwargs: Any) -> tuple[str, list[str]]:
    datasets = _spool_study(spool, seed, **kwargs)
    for ds in datasets:
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        relative = spool.relative_path(study, sop)
        store.record_instance(
            InstanceMeta(
                study,
                str(ds.SeriesInstanceUID),
                sop,
                str(ds.SOPClassUID),
                "1.2.840.10008.1.2.1",
                str(ds.Modality),
                relative,
                (spool.root / relative).stat().st_size,
            ),
            None,
        )
    return str(datasets[0].StudyInstanceUID), [str(ds.SOPInstanceUID) for ds in datasets]


def _claim(store: Store) -> Any:
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    [claim] = WorkQueue(store).claim("test-worker", 1, 60)
    return claim


def _complete(
    store: Store, spool: Spool, claim: Any, probability: float, destinations: list[str]
) -> None:
    sops = [i.sop_instance_uid for i in claim.instances]
    views = tuple(
        ViewResult(sop, probability + 0.01 * k, np.zeros((7, 7), np.float32))
        for k, sop in enumerate(sops[:-1])
    )
    skipped = (SkippedView(sops[-1], "undecodable: test"),)
    mean = float(np.mean([v.probability for v in views]))
    result = StudyResult(
        claim.study_uid, claim.revision, StudyType.WRIST, mean, 0.5, views, skipped
    )
    outputs = []
    for kind, sop_class, suffix in (("sr", SR_CLASS, "1"), ("sc", SC_CLASS, "2")):
        uid = derived_uid("test output", claim.study_uid, kind, suffix)
        relative = f"outbox/{claim.study_uid}/{uid}.dcm"
        spool.write(relative, [b"output " + kind.encode()])
        outputs.append(OutputFile(kind, sop_class, uid, "2.25.9", None, relative, 9))
    assert WorkQueue(store).complete(claim, result, MODEL, outputs, destinations, 12.5)


def build_site(tmp_path: Path, url: str) -> Site:
    """A store with one study in each state (two FAILED: scoring and delivery), old ones too."""
    engine = make_engine(url)
    upgrade_schema(engine)
    store = Store(engine)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    uids: dict[str, str] = {}
    queue = WorkQueue(store)
    outbox = Outbox(store)
    # DONE, scored abnormal, finished 40 days ago (purge candidate).
    uids["DONE_OLD"], _ = _receive(store, spool, 1)
    _complete(store, spool, _claim(store), 0.91, [])
    # DONE, scored normal, recent.
    uids["DONE"], _ = _receive(store, spool, 2)
    _complete(store, spool, _claim(store), 0.12, [])
    # DELIVERING, scored 0.55 (abnormal), two outputs to "pacs".
    uids["DELIVERING"], _ = _receive(store, spool, 3)
    _complete(store, spool, _claim(store), 0.55, ["pacs"])
    # FAILED by delivery: the SR was refused for good.
    uids["FAILED_DELIVERY"], _ = _receive(store, spool, 4)
    _complete(store, spool, _claim(store), 0.33, ["pacs"])
    [(sr, _)] = [(d, o) for d, o in outbox.deliveries(uids["FAILED_DELIVERY"]) if o.kind == "sr"]
    outbox.claim_due("pacs", 10, 60)
    outbox.failed(
        sr.id, "status 0xC000: refused", Backoff(1, 2, 4, 3), status=0xC000, permanent=True
    )
    site_failed_delivery = sr.id
    # FAILED by scoring, old.
    uids["FAILED_OLD"], _ = _receive(store, spool, 5)
    queue.fail_attempt(_claim(store), "model forward failed: test", max_attempts=1)
    # SKIPPED (a chest), old.
    uids["SKIPPED_OLD"], _ = _receive(store, spool, 6, body_part="CHEST", views=1)
    queue.skip(_claim(store), "not an upper-extremity radiograph: chest")
    # CANCELLED, old.
    uids["CANCELLED_OLD"], _ = _receive(store, spool, 7)
    cancel(store, uids["CANCELLED_OLD"], "duplicate order", actor="admin:test")
    # SCORING (held by a worker).
    uids["SCORING"], _ = _receive(store, spool, 8, body_part="HAND")
    _claim(store)
    # QUEUED.
    uids["QUEUED"], _ = _receive(store, spool, 9, body_part="ELBOW")
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    # RECEIVING, the newest.
    uids["RECEIVING"], _ = _receive(store, spool, 10, body_part="FINGER")
    # Age the "old" ones: received 41 days ago, finished 40 days ago. The SCORING study is
    # old too: purge must still never touch it.
    long_ago = utcnow() - timedelta(days=40)
    with store.session() as session, session.begin():
        for key in ("DONE_OLD", "FAILED_OLD", "SKIPPED_OLD", "CANCELLED_OLD", "SCORING"):
            session.execute(
                update(Study)
                .where(Study.study_uid == uids[key])
                .values(
                    state_changed_at=long_ago,
                    created_at=long_ago - timedelta(days=1),
                    last_instance_at=long_ago - timedelta(days=1),
                )
            )
    config = write_config(
        tmp_path / "triage.toml",
        {
            "store": {"url": url, "spool_dir": str(spool.root), "retention_days": 30},
            "model": {"allow_unvalidated": True},
            # Where the site's deliveries go: `retry` restarts only those to a destination
            # the config names.
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
            ],
        },
    )
    site = Site(config, store, spool, url, uids)
    site.failed_delivery_id = site_failed_delivery
    return site


@pytest.fixture
def site(store_url: str, tmp_path: Path, capsys, monkeypatch) -> Site:
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    built = build_site(tmp_path, store_url)

    def admin(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--config", str(built.config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    built.admin = admin
    yield built
    built.store.engine.dispose()


def as_json(site: Site, *args: str, code: int = 0) -> dict[str, Any]:
    exit_code, out, err = site.admin(*args, "--json")
    assert exit_code == code, (out, err)
    data = json.loads(out)
    assert data["schema"] == "msk-triage-admin/1"
    return data


STUDY_ROW_KEYS = {
    "study_uid",
    "state",
    "revision",
    "study_type",
    "instances",
    "probability",
    "finding",
    "reason",
    "created_at",
    "last_instance_at",
    "state_changed_at",
    "age_s",
    "in_state_s",
}


def no_patient_identity(text: str) -> None:
    for value in (PATIENT["name"], "Quixote", "Alonso", PATIENT["id"], PATIENT["birth"]):
        assert value not in text


# --- status --------------------------------------------------------------------------------


def test_status_counts_every_state_and_reports_model_spool_and_deliveries(site: Site) -> None:
    data = as_json(site, "status")
    assert set(data) == {
        "schema",
        "store",
        "studies",
        "oldest_queued_at",
        "oldest_queued_age_s",
        "workers",
        "deliveries",
        "failed_deliveries",
        "model",
        "spool",
    }
    assert data["studies"] == {
        "RECEIVING": 1,
        "QUEUED": 1,
        "SCORING": 1,
        "DELIVERING": 1,
        "DONE": 2,
        "FAILED": 2,
        "SKIPPED": 1,
        "CANCELLED": 1,
    }
    assert data["oldest_queued_age_s"] is not None and data["oldest_queued_age_s"] >= 0
    assert data["deliveries"] == {"PENDING": 3, "DONE": 0, "FAILED": 1, "CANCELLED": 0}
    [failed] = data["failed_deliveries"]
    assert failed["study_uid"] == site.uids["FAILED_DELIVERY"]
    assert failed["id"] == site.failed_delivery_id
    assert failed["last_error"] == "status 0xC000: refused" and failed["last_status"] == 0xC000
    assert data["model"]["name"] == "mura-densenet169-demo"
    assert data["model"]["validated"] is False and data["model"]["runs"] is True
    assert data["spool"]["free_bytes"] > 0 and data["spool"]["below_floor"] is False
    assert data["store"]["schema_revision"] == data["store"]["head_revision"]
    assert data["workers"] == []
    code, out, _ = site.admin("status")
    assert code == 0
    assert "mura-densenet169-demo" in out and "NOT VALIDATED" in out
    assert site.uids["FAILED_DELIVERY"] in out and "0xC000" in out
    for state in ("RECEIVING", "CANCELLED"):
        assert state in out


def test_status_shows_worker_heartbeats(site: Site) -> None:
    queue = WorkQueue(site.store)
    queue.heartbeat("host-a:1:abc", "cpu", "0.0.0-demo")
    queue.heartbeat("host-b:2:def", "cuda:0", "0.0.0-demo")
    queue.worker_stopped("host-b:2:def")
    workers = {w["id"]: w for w in as_json(site, "status")["workers"]}
    assert workers["host-a:1:abc"]["state"] == "alive"
    assert workers["host-a:1:abc"]["device"] == "cpu"
    assert workers["host-b:2:def"]["state"] == "stopped"
    assert workers["host-a:1:abc"]["heartbeat_age_s"] < 60


# --- studies -------------------------------------------------------------------------------


def test_studies_newest_first_with_filters(site: Site) -> None:
    data = as_json(site, "studies")
    rows = data["studies"]
    assert data["count"] == len(rows) == 10
    assert set(rows[0]) == STUDY_ROW_KEYS
    assert rows[0]["study_uid"] == site.uids["RECEIVING"]
    created = [r["created_at"] for r in rows]
    assert created == sorted(created, reverse=True)
    failed = as_json(site, "studies", "--state", "failed")["studies"]
    assert {r["study_uid"] for r in failed} == {
        site.uids["FAILED_OLD"],
        site.uids["FAILED_DELIVERY"],
    }
    several = as_json(site, "studies", "--state", "queued,scoring", "--state", "RECEIVING")
    assert {r["state"] for r in several["studies"]} == {"QUEUED", "SCORING", "RECEIVING"}
    old = {r["study_uid"] for r in as_json(site, "studies", "--older-than", "30d")["studies"]}
    assert old == {
        site.uids[k] for k in ("DONE_OLD", "FAILED_OLD", "SKIPPED_OLD", "CANCELLED_OLD", "SCORING")
    }
    new = as_json(site, "studies", "--newer-than", "1h")["count"]
    assert new == 10 - 5
    scored = as_json(site, "studies", "--study-type", "wrist", "--state", "done")["studies"]
    assert {r["study_uid"] for r in scored} == {site.uids["DONE"], site.uids["DONE_OLD"]}
    assert {r["finding"] for r in scored} == {"abnormal", "normal"}
    assert as_json(site, "studies", "--limit", "2")["count"] == 2
    code, out, _ = site.admin("studies", "--state", "done")
    assert code == 0 and site.uids["DONE"] in out and site.uids["QUEUED"] not in out


def test_studies_bad_filters_are_usage_errors(site: Site) -> None:
    for args in (
        ["--state", "sleeping"],
        ["--older-than", "3"],
        ["--study-type", "knee"],
        ["--limit", "0"],
    ):
        code, out, err = site.admin("studies", *args)
        assert code == 2, (args, out, err)
        assert out == "" and len(err.strip().splitlines()) == 1


# --- associations --------------------------------------------------------------------------


def test_associations_lists_the_audit_newest_first_with_filters(site: Site) -> None:
    from triage.store.models import AssociationOutcome, AssociationRecord

    store = site.store
    released = store.open_association("MODALITY1", "TRIAGE", "10.0.0.5", 40000, False, 123)
    store.close_association(released, AssociationOutcome.RELEASED, stored=3, bytes_stored=900)
    refused = store.record_refused_connection(
        "TRIAGE", "10.0.0.9", 40001, 123, "TLS handshake failed: certificate has expired"
    )
    active = store.open_association("SCANNER", "TRIAGE", "10.0.0.7", 40002, True, 123)
    with store.session() as session, session.begin():
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id == released)
            .values(started_at=utcnow() - timedelta(days=2))
        )
    rows = as_json(site, "associations")["associations"]
    assert [r["id"] for r in rows] == [active, refused, released]
    assert set(rows[0]) == {
        "id",
        "started_at",
        "ended_at",
        "age_s",
        "calling_ae",
        "called_ae",
        "peer_host",
        "peer_port",
        "tls",
        "outcome",
        "stored",
        "duplicate",
        "failed",
        "bytes_stored",
        "echoes",
        "reason",
        "listener_host",
        "listener_pid",
    }
    assert rows[0]["outcome"] == "ACTIVE" and rows[0]["ended_at"] is None
    [row] = as_json(site, "associations", "--outcome", "rejected")["associations"]
    assert (row["id"], row["calling_ae"], row["tls"]) == (refused, "", True)
    assert row["reason"] == "TLS handshake failed: certificate has expired"
    [row] = as_json(site, "associations", "--calling-ae", "MODALITY1")["associations"]
    assert (row["stored"], row["bytes_stored"], row["outcome"]) == (3, 900, "RELEASED")
    assert row["age_s"] >= 2 * 86400
    recent = as_json(site, "associations", "--newer-than", "1d", "--outcome", "released,active")
    assert [r["id"] for r in recent["associations"]] == [active]
    by_host = as_json(site, "associations", "--peer-host", "10.0.0.9", "--limit", "1")
    assert [r["id"] for r in by_host["associations"]] == [refused]
    code, out, err = site.admin("associations")
    assert code == 0 and err == ""
    assert "MODALITY1" in out and "REJECTED" in out and "10.0.0.9:40001" in out
    code, out, err = site.admin("associations", "--outcome", "lost")
    assert code == 2 and out == "" and "unknown outcome 'lost'" in err


def test_tables_show_stored_text_as_it_is_never_as_markup(site: Site) -> None:
    """Text from peers and operators (a calling AE title is any printable ASCII, a cancel
    reason anything) reaches the tables: read as rich markup, "[/x]" crashed the command
    with a traceback and "[bold]" vanished."""
    from triage.store.models import AssociationOutcome

    store = site.store
    odd = store.open_association("CT[/A]", "TRIAGE", "10.0.0.5", 40000, False, 123)
    store.close_association(odd, AssociationOutcome.ABORTED, reason="peer said [bold]bye")
    code, out, err = site.admin("associations")
    assert code == 0 and err == "", err
    assert "CT[/A]" in out and "peer said [bold]bye" in out
    uid = site.uids["QUEUED"]
    reason = "wrong patient [/ordered twice] :warning: [red]"
    assert site.admin("cancel", uid, "--reason", reason)[0] == 0
    code, out, err = site.admin("study", uid)
    assert code == 0 and err == "", err
    assert reason in out


@pytest.mark.parametrize("form", [[], ["--json"]])
def test_a_reader_that_stops_early_gets_no_traceback(site: Site, form: list[str]) -> None:
    """`triage-admin studies | head -1`: the reader closes the pipe before the output is
    written; the command ended with a BrokenPipeError traceback on the operator's terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    command = [sys.executable, "-m", "triage.cli.admin", "--config", str(site.config)]
    process = subprocess.Popen(
        [*command, "studies", *form], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line
    err = process.stderr.read().decode()
    code = process.wait(120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == "" and code == 1


# --- study ---------------------------------------------------------------------------------


def test_study_shows_instances_views_result_deliveries_and_history(site: Site) -> None:
    uid = site.uids["FAILED_DELIVERY"]
    data = as_json(site, "study", uid)
    assert set(data) == {"schema", "study", "instances", "result", "views", "deliveries", "history"}
    assert set(data["study"]) == STUDY_ROW_KEYS | {"attempts", "lease_owner", "lease_expires_at"}
    assert data["study"]["state"] == "FAILED"
    assert "delivery to pacs failed" in data["study"]["reason"]
    assert len(data["instances"]) == 2
    assert {i["modality"] for i in data["instances"]} == {"DX"}
    result = data["result"]
    assert result["finding"] == "normal" and result["probability"] == pytest.approx(0.33)
    assert result["views_scored"] == 1 and result["views_skipped"] == 1
    assert result["model_version"] == "0.0.0-demo" and result["model_validated"] is False
    assert [v["skipped"] for v in data["views"]] == [False, True]
    assert data["views"][0]["probability"] == pytest.approx(0.33)
    assert data["views"][1]["note"] == "undecodable: test"
    by_kind = {d["kind"]: d for d in data["deliveries"]}
    assert by_kind["sr"]["state"] == "FAILED" and by_kind["sr"]["attempts"] == 1
    assert by_kind["sr"]["last_error"] == "status 0xC000: refused"
    assert by_kind["sc"]["state"] == "PENDING"
    states = [e["to_state"] for e in data["history"]]
    assert states == ["RECEIVING", "QUEUED", "SCORING", "DELIVERING", "FAILED"]
    code, out, _ = site.admin("study", uid)
    assert code == 0
    assert uid in out and "status 0xC000: refused" in out and "undecodable: test" in out
    assert "DELIVERING" in out and "0.330" in out
    # A warning status (stored, but the PACS changed or doubted something) is shown too.
    Outbox(site.store).delivered(by_kind["sc"]["id"], 0xB000)
    code, out, _ = site.admin("study", uid)
    assert code == 0 and "stored with warning 0xB000" in out


def test_study_unknown_or_malformed_uid_is_one_line(site: Site) -> None:
    code, out, err = site.admin("study", "1.2.3.4.5")
    assert code == 1 and out == ""
    assert err.strip() == "triage-admin: no study 1.2.3.4.5"
    code, out, err = site.admin("study", "1.2.3.4.5", "--json")
    assert code == 1
    assert json.loads(out) == {
        "schema": "msk-triage-admin/1",
        "error": "no study 1.2.3.4.5",
        "exit_code": 1,
    }
    code, _, err = site.admin("study", "not-a-uid")
    assert code == 2 and "not a DICOM UID" in err and len(err.strip().splitlines()) == 1


def test_patient_identity_only_with_the_explicit_flag(site: Site) -> None:
    uid = site.uids["DONE"]
    outputs = []
    for args in (
        ["status"],
        ["studies"],
        ["worklist"],
        ["study", uid],
        ["purge", "--dry-run"],
    ):
        for form in ([], ["--json"]):
            code, out, err = site.admin(*args, *form)
            assert code == 0, (args, err)
            outputs.append(out + err)
    for text in outputs:
        no_patient_identity(text)
    data = as_json(site, "study", uid, "--show-patient")
    assert data["patient"]["name"] == PATIENT["name"]
    assert data["patient"]["id"] == PATIENT["id"]
    assert data["patient"]["birth_date"] == PATIENT["birth"]
    assert data["patient"]["source"].startswith(uid + "/")
    code, out, _ = site.admin("study", uid, "--show-patient")
    assert code == 0 and PATIENT["name"] in out and PATIENT["id"] in out


# --- worklist ------------------------------------------------------------------------------


def test_worklist_puts_the_most_likely_abnormal_first(site: Site) -> None:
    data = as_json(site, "worklist")
    rows = data["worklist"]
    assert [r["study_uid"] for r in rows] == [
        site.uids["DONE_OLD"],
        site.uids["DELIVERING"],
        site.uids["FAILED_DELIVERY"],
        site.uids["DONE"],
    ]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {
        "rank",
        "study_uid",
        "study_type",
        "probability",
        "threshold",
        "finding",
        "state",
        "revision",
        "model_version",
        "model_validated",
        "scored_at",
        "created_at",
        "age_s",
    }
    assert [r["finding"] for r in rows] == ["abnormal", "abnormal", "normal", "normal"]
    assert rows[0]["study_type"] == "XR_WRIST" and rows[0]["age_s"] > 40 * 86400
    assert as_json(site, "worklist", "--newer-than", "1d")["count"] == 3
    assert as_json(site, "worklist", "--study-type", "hand")["count"] == 0
    code, out, _ = site.admin("worklist")
    assert code == 0
    assert out.index(site.uids["DONE_OLD"]) < out.index(site.uids["DONE"])
    assert "XR_WRIST" in out and "abnormal" in out


# --- requeue, cancel -----------------------------------------------------------------------


def test_requeue_moves_back_to_queued_and_scoring_needs_force(site: Site) -> None:
    uid = site.uids["FAILED_OLD"]
    data = as_json(site, "requeue", uid)
    assert data == {
        "schema": "msk-triage-admin/1",
        "study_uid": uid,
        "from_state": "FAILED",
        "to_state": "QUEUED",
        "changed": True,
        "revision": 1,
    }
    study = site.store.get_study(uid)
    assert study.state is StudyState.QUEUED and study.attempts == 0
    assert "requeued by admin:" in site.store.study_history(uid)[-1].reason
    assert as_json(site, "requeue", uid)["changed"] is False
    scoring = site.uids["SCORING"]
    code, _, err = site.admin("requeue", scoring)
    assert code == 1 and "being scored by test-worker" in err and "--force" in err
    assert site.store.get_study(scoring).state is StudyState.SCORING
    assert as_json(site, "requeue", scoring, "--force")["to_state"] == "QUEUED"
    study = site.store.get_study(scoring)
    assert study.state is StudyState.QUEUED and study.lease_token is None
    code, _, err = site.admin("requeue", "1.2.3")
    assert code == 1 and "no study 1.2.3" in err


def test_cancel_needs_a_reason_and_stops_pending_deliveries(site: Site) -> None:
    uid = site.uids["DELIVERING"]
    code, _, err = site.admin("cancel", uid)
    assert code == 2 and "--reason" in err
    data = as_json(site, "cancel", uid, "--reason", "wrong patient")
    assert data["from_state"] == "DELIVERING" and data["to_state"] == "CANCELLED"
    assert data["reason"] == "wrong patient"
    study = site.store.get_study(uid)
    assert study.state is StudyState.CANCELLED and "wrong patient" in study.state_reason
    deliveries = Outbox(site.store).deliveries(uid)
    assert {d.state for d, _ in deliveries} == {DeliveryState.CANCELLED}
    assert as_json(site, "cancel", uid, "--reason", "again")["changed"] is False
    code, out, _ = site.admin("cancel", site.uids["QUEUED"], "--reason", "test order")
    assert code == 0 and "QUEUED → CANCELLED" in out
    # A cancelled study leaves the worklist.
    assert uid not in [r["study_uid"] for r in as_json(site, "worklist")["worklist"]]


# --- retry ---------------------------------------------------------------------------------


def test_retry_one_delivery_a_study_or_all_failed(site: Site) -> None:
    uid = site.uids["FAILED_DELIVERY"]
    code, _, err = site.admin("retry")
    assert code == 2 and "one of the arguments" in err
    code, _, err = site.admin("retry", "--delivery", "99999")
    assert code == 1 and "no FAILED delivery" in err
    code, _, err = site.admin("retry", "--study", site.uids["DONE"])
    assert code == 1 and "has no FAILED delivery" in err
    # One of two named cannot be retried: the other is, and the command still fails.
    code, out, err = site.admin(
        "--json", "retry", "--delivery", str(site.failed_delivery_id), "--delivery", "99999"
    )
    assert code == 1 and err.strip() == (
        "triage-admin: no FAILED delivery of a current revision to a configured destination"
        " with id 99999"
    )
    assert json.loads(out) == {
        "schema": "msk-triage-admin/1",
        "retried": 1,
        "delivery_ids": [site.failed_delivery_id],
        "selector": {"deliveries": [site.failed_delivery_id, 99999]},
    }
    assert site.store.get_study(uid).state is StudyState.DELIVERING
    [(sr, _)] = [(d, o) for d, o in Outbox(site.store).deliveries(uid) if o.kind == "sr"]
    assert sr.state is DeliveryState.PENDING and sr.attempts == 0
    assert as_json(site, "retry", "--all-failed") == {
        "schema": "msk-triage-admin/1",
        "retried": 0,
        "delivery_ids": [],
        "selector": {"all_failed": True},
    }
    # Fail it again, then retry the whole study.
    outbox = Outbox(site.store)
    outbox.claim_due("pacs", 10, 60)
    outbox.failed(sr.id, "status 0xC000: refused", Backoff(1, 2, 4, 3), permanent=True)
    assert as_json(site, "retry", "--study", uid)["retried"] == 1
    code, out, _ = site.admin("retry", "--all-failed")
    assert code == 0 and "0 deliveries" in out
    # A destination the config no longer names: nothing would send them.
    outbox.claim_due("pacs", 10, 60)
    outbox.failed(sr.id, "status 0xC000: refused", Backoff(1, 2, 4, 3), permanent=True)
    with site.store.session() as session, session.begin():
        session.execute(update(Delivery).where(Delivery.id == sr.id).values(destination="gone"))
    code, _, err = site.admin("retry", "--delivery", str(sr.id))
    assert code == 1 and "to a configured destination" in err
    assert as_json(site, "retry", "--all-failed")["retried"] == 0
    assert site.store.get_study(uid).state is StudyState.FAILED


# --- purge ---------------------------------------------------------------------------------


def test_purge_removes_only_finished_old_studies_files_and_rows(site: Site) -> None:
    old = {site.uids[k] for k in ("DONE_OLD", "FAILED_OLD", "SKIPPED_OLD", "CANCELLED_OLD")}
    WorkQueue(site.store).heartbeat("gone:1:x", "cpu", "0")
    WorkQueue(site.store).worker_stopped("gone:1:x")
    with site.store.session() as session, session.begin():
        from triage.store.models import WorkerRecord

        session.execute(update(WorkerRecord).values(stopped_at=utcnow() - timedelta(days=40)))
    files_before = sorted(p for p in site.spool.root.rglob("*.dcm"))
    dry = as_json(site, "purge", "--older-than", "30", "--dry-run")
    assert dry["dry_run"] is True and set(dry["study_uids"]) == old
    assert dry["studies"] == 4 and dry["instances"] == 2 + 2 + 1 + 2
    assert dry["outputs"] == 2 and dry["files"] == 9 and dry["bytes"] > 0
    assert dry["workers"] == 1
    assert set(dry) == {
        "schema",
        "dry_run",
        "older_than_days",
        "cutoff",
        "studies",
        "study_uids",
        "instances",
        "outputs",
        "files",
        "bytes",
        "workers",
        "associations",
        "not_purged",
    }
    assert dry["not_purged"] == []
    assert dry["associations"] == 0  # audit_retention_days = 0: the audit is kept
    assert sorted(p for p in site.spool.root.rglob("*.dcm")) == files_before
    assert all(site.store.get_study(uid) is not None for uid in old)
    done = as_json(site, "purge", "--older-than", "30")
    assert done["dry_run"] is False and set(done["study_uids"]) == old
    assert done["files"] == 9 and done["workers"] == 1
    for uid in old:
        assert site.store.get_study(uid) is None
        assert not (site.spool.root / uid).exists()
        assert not (site.spool.root / "outbox" / uid).exists()
    # The SCORING study is just as old but in flight: untouched, files and all.
    scoring = site.uids["SCORING"]
    assert site.store.get_study(scoring).state is StudyState.SCORING
    assert len(list((site.spool.root / scoring).iterdir())) == 2
    assert as_json(site, "studies")["count"] == 10 - 4
    # Nothing left past 30 days; with 0 days every finished study goes, nothing in flight.
    assert as_json(site, "purge")["studies"] == 0
    code, out, _ = site.admin("purge", "--older-than", "0", "--dry-run")
    assert code == 0 and "would remove 2 studies" in out
    gone = as_json(site, "purge", "--older-than", "0")
    assert set(gone["study_uids"]) == {site.uids["DONE"], site.uids["FAILED_DELIVERY"]}
    left = {r["state"] for r in as_json(site, "studies")["studies"]}
    assert left == {"RECEIVING", "QUEUED", "SCORING", "DELIVERING"}


def test_purge_removes_association_audit_rows_past_their_retention(site: Site) -> None:
    import tomllib

    from triage.store.models import AssociationOutcome, AssociationRecord

    sections = tomllib.loads(site.config.read_text())
    sections["store"]["audit_retention_days"] = 90
    write_config(site.config, sections)
    store = site.store
    old_ended = store.open_association("CR1", "TRIAGE", "10.0.0.5", 1, False, 1)
    store.close_association(old_ended, AssociationOutcome.RELEASED, stored=1)
    old_active = store.open_association("CR1", "TRIAGE", "10.0.0.5", 2, False, 1)
    recent = store.open_association("CR1", "TRIAGE", "10.0.0.5", 3, False, 1)
    store.close_association(recent, AssociationOutcome.RELEASED, stored=1)
    with store.session() as session, session.begin():
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id.in_([old_ended, old_active]))
            .values(started_at=utcnow() - timedelta(days=100))
        )
    assert as_json(site, "purge", "--dry-run")["associations"] == 1
    assert len(as_json(site, "associations")["associations"]) == 3
    code, out, _ = site.admin("purge")
    assert code == 0 and "1 association audit rows" in out
    left = [r["id"] for r in as_json(site, "associations")["associations"]]
    assert left == [recent, old_active]  # an association still open is never removed
    assert as_json(site, "purge")["associations"] == 0


def test_purge_with_a_spool_that_is_not_there_removes_nothing_and_exits_3(
    site: Site, tmp_path: Path
) -> None:
    """The config's relative spool_dir resolved from another directory (the store's URL
    absolute): the rows went and the files stayed, and SQLite's spool recovery brought the
    purged studies back at the next start."""
    relative = write_config(
        tmp_path / "relative.toml",
        {
            "store": {"url": site.url, "spool_dir": "var/spool", "retention_days": 30},
            "model": {"allow_unvalidated": True},
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for dry in ([], ["--dry-run"]):
        code, out, err = site.admin(
            "--config", str(relative), "--workdir", str(elsewhere), "purge", *dry
        )
        assert code == 3, out + err
        assert f"no spool at {elsewhere / 'var' / 'spool'}: nothing purged" in err
        assert "--workdir" in err
    assert all(site.store.get_study(uid) is not None for uid in site.uids.values())
    from triage.store.operations import purge
    from triage.store.spool import SpoolError

    with pytest.raises(SpoolError, match="no spool at"):
        purge(site.store, Spool(elsewhere / "var" / "spool"), 30)


def test_purge_that_may_not_remove_a_study_s_file_purges_the_others_and_says_so(
    site: Site, monkeypatch
) -> None:
    """Run as another user than the daemon's (README: run it as the service user), the
    purge may not remove a spooled file: that study keeps its rows and files for the next
    purge, the others go, and one line says so (it was a traceback; and the daemon's hourly
    purge met the same study first each hour and never purged anything again)."""
    real_unlink = Path.unlink
    stuck = site.uids["DONE_OLD"]

    def refused(path: Path, missing_ok: bool = False) -> None:
        if stuck in path.parts:
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    code, out, err = site.admin("purge", "--older-than", "30")
    assert code == 1, out + err
    [line] = err.strip().splitlines()
    assert line.startswith("triage-admin: 1 studies not purged") and "daemon's user" in line
    assert "Permission denied" in line and f"not purged: {stuck}" in out
    assert site.store.get_study(stuck) is not None
    for key in ("FAILED_OLD", "SKIPPED_OLD", "CANCELLED_OLD"):
        assert site.store.get_study(site.uids[key]) is None, key
    code, out, err = site.admin("purge", "--older-than", "30", "--json")
    report = json.loads(out)
    assert code == 1 and report["not_purged"][0]["study_uid"] == stuck
    assert report["study_uids"] == []
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert as_json(site, "purge", "--older-than", "30")["study_uids"] == [stuck]


def test_purge_keeps_a_late_instance_of_a_cancelled_study_for_the_retention_period(
    site: Site,
) -> None:
    cancelled = site.uids["CANCELLED_OLD"]
    datasets = _spool_study(site.spool, 7)  # the same study: a view the PACS sent again today
    late = datasets[0]
    late.SOPInstanceUID = generate_uid()
    relative = site.spool.relative_path(cancelled, str(late.SOPInstanceUID))
    [written] = write_study([late], site.spool.root / "incoming")
    written.rename(site.spool.root / relative)
    site.store.record_instance(
        InstanceMeta(
            cancelled,
            str(late.SeriesInstanceUID),
            str(late.SOPInstanceUID),
            str(late.SOPClassUID),
            "1.2.840.10008.1.2.1",
            "DX",
            relative,
            (site.spool.root / relative).stat().st_size,
        ),
        None,
    )
    assert site.store.get_study(cancelled).state is StudyState.CANCELLED  # acknowledged, kept
    purged = as_json(site, "purge", "--older-than", "30")
    assert cancelled not in purged["study_uids"] and len(purged["study_uids"]) == 3
    assert (site.spool.root / relative).exists()
    assert site.store.instance_exists(str(late.SOPInstanceUID))


# --- db ------------------------------------------------------------------------------------


def test_db_current_and_upgrade(site: Site, tmp_path: Path) -> None:
    current = as_json(site, "db", "current")
    assert current["current"] == current["head"] and current["up_to_date"] is True
    assert as_json(site, "db", "upgrade")["changed"] is False
    # A new SQLite file: upgrade creates it; before that, every command says there is none.
    fresh = write_config(
        tmp_path / "fresh.toml",
        {"store": {"url": f"sqlite:///{tmp_path / 'new' / 'x.db'}", "spool_dir": "spool"}},
    )
    code = main(["--config", str(fresh), "status"])
    assert code == 3
    assert main(["--config", str(fresh), "db", "upgrade"]) == 0
    assert main(["--config", str(fresh), "db", "current"]) == 0
    assert main(["--config", str(fresh), "status"]) == 0


def _set_schema_revision(site: Site, revision: str) -> None:
    from sqlalchemy import text

    with site.store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def test_db_downgrade_goes_back_for_an_older_version_and_upgrade_comes_back(site: Site) -> None:
    """A rollback: `db downgrade` (the newer version's) takes the schema back, only once no
    worker runs on the store; the store's rows survive the round trip."""
    studies = as_json(site, "status")["studies"]
    WorkQueue(site.store).heartbeat("gpu-host-worker", "cuda", "1.0")
    # This test's own connections would count as a daemon's (PostgreSQL: pg_stat_activity).
    site.store.engine.dispose()
    code, _out, err = site.admin("db", "downgrade", "0003")
    assert code == 1 and "msk-triage is running on this store" in err, err
    assert "or --force for workers that are gone" in err
    moved = as_json(site, "db", "downgrade", "0003", "--force")
    assert moved == {"schema": "msk-triage-admin/1", "from": "0004", "to": "0003", "changed": True}
    current = as_json(site, "db", "current", code=1)
    assert current["current"] == "0003" and current["newer_than_head"] is False
    code, _out, err = site.admin("status")
    assert code == 3 and "run `triage-admin db upgrade`" in err
    code, _out, err = site.admin("db", "downgrade", "0004", "--force")
    assert code == 2 and "0004 is newer than the store's schema 0003" in err
    code, _out, err = site.admin("db", "downgrade", "0000", "--force")
    assert code == 2 and "unknown schema revision '0000' (known: 0001, 0002, 0003, 0004)" in err
    site.store.engine.dispose()
    assert as_json(site, "db", "downgrade", "0001", "--force")["to"] == "0001"
    # Nothing to do is done, whatever runs (0001 has no workers table to look at).
    assert as_json(site, "db", "downgrade", "0001")["changed"] is False
    code, _out, err = site.admin("db", "downgrade", "0002")
    assert code == 2 and "0002 is newer than the store's schema 0001" in err
    assert as_json(site, "db", "upgrade")["to"] == "0004"
    assert sum(as_json(site, "status")["studies"].values()) == sum(studies.values())


def test_a_store_a_newer_version_upgraded_is_refused_with_the_way_back(
    site: Site, daemon_factory
) -> None:
    """Rolled back without `db downgrade`: the schema is at a migration this code does not
    know. The daemon stops with exit status 2 (systemd does not restart it: waiting will not
    help) and one line saying so and how to go back; triage-admin says the same, and
    `db current` does not advise an upgrade that cannot work."""
    _set_schema_revision(site, "0099")
    daemon = daemon_factory({"store": {"url": site.url, "spool_dir": str(site.spool.root)}})
    daemon.start(wait=False)
    assert daemon.process.wait(60) == 2
    expected = (
        f"the store's schema is at 0099, newer than this msk-triage {__version__} knows (its"
        " newest is 0004): a newer msk-triage upgraded it. Run that version, or go back with it"
        " first (`triage-admin db downgrade 0004`, every daemon and worker stopped)"
    )
    assert expected in daemon.log_text()
    for args in (["status"], ["db", "upgrade"], ["db", "downgrade", "0003", "--force"]):
        code, _out, err = site.admin(*args)
        assert code == 3 and expected in err, (args, err)
    current = as_json(site, "db", "current", code=3)
    assert current["current"] == "0099" and current["newer_than_head"] is True
    _code, out, _err = site.admin("db", "current")
    assert "newer than this msk-triage" in out and "db upgrade" not in out


# --- errors --------------------------------------------------------------------------------


def test_unreachable_store_and_config_errors_have_their_exit_codes(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    down = write_config(
        tmp_path / "down.toml",
        {"store": {"url": f"postgresql://postgres@127.0.0.1:{free_port()}/triage"}},
    )
    assert main(["--config", str(down), "status"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("triage-admin: store unreachable: postgresql://postgres@127.0.0.1:")
    assert len(err.strip().splitlines()) == 1
    assert main(["--config", str(down), "status", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["exit_code"] == 3
    missing = write_config(tmp_path / "m.toml", {"store": {"url": "sqlite:///nowhere/x.db"}})
    assert main(["--config", str(missing), "studies"]) == 3
    assert "no store at" in capsys.readouterr().err
    # `db upgrade` creates the SQLite file's folder; one it cannot create (no permission, a
    # file in the way) was a traceback.
    (tmp_path / "a-file").write_text("")
    blocked = write_config(
        tmp_path / "b.toml", {"store": {"url": f"sqlite:///{tmp_path / 'a-file' / 'x.db'}"}}
    )
    assert main(["--config", str(blocked), "db", "upgrade"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"triage-admin: cannot create the SQLite store's folder {tmp_path}")
    assert len(err.strip().splitlines()) == 1
    assert main(["--config", str(tmp_path / "absent.toml"), "status"]) == 2
    assert "config error: no such file" in capsys.readouterr().err
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "many")
    assert main(["--config", str(missing), "status"]) == 2
    assert "[dicom] port" in capsys.readouterr().err
    monkeypatch.delenv("TRIAGE_DICOM_PORT")
    # $TRIAGE_CONFIG is read like the daemon reads it; --workdir anchors relative paths.
    (tmp_path / "wd").mkdir()
    relative = write_config(tmp_path / "rel.toml", {"store": {"url": "sqlite:///var/t.db"}})
    monkeypatch.setenv("TRIAGE_CONFIG", str(relative))
    assert main(["db", "upgrade", "--workdir", str(tmp_path / "wd")]) == 0
    assert (tmp_path / "wd" / "var" / "t.db").is_file()
    capsys.readouterr()
    assert main(["--workdir", str(tmp_path / "wd"), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["store"]["url"].endswith("/wd/var/t.db")
    assert main(["bogus"]) == 2


# --- echo ----------------------------------------------------------------------------------


def test_echo_a_peer_by_address_or_destination_name(tmp_path: Path, capsys, monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    pacs = Storescp(tmp_path / "pacs").start()
    refusing = Storescp(tmp_path / "refusing", ae_title="NOPE", extra=["--refuse"]).start()
    try:
        config = write_config(
            tmp_path / "e.toml",
            {
                "store": {"url": f"sqlite:///{tmp_path / 'e.db'}"},
                "destinations": [pacs.destination("pacs")],
            },
        )
        base = ["--config", str(config)]
        assert main([*base, "echo", f"PACS@127.0.0.1:{pacs.port}"]) == 0
        assert "C-ECHO ok" in capsys.readouterr().out
        assert main([*base, "echo", "pacs", "--json", "--calling-ae", "CHECKER"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["ok"] is True and data["status"] == "0x0000"
        assert data["target"] == {
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": pacs.port,
            "name": "pacs",
        }
        assert data["calling_ae"] == "CHECKER"
        assert pacs.log_text().count("Received Echo Request") == 2
        assert main([*base, "echo", f"NOPE@127.0.0.1:{refusing.port}"]) == 1
        err = capsys.readouterr().err
        assert "failed: association rejected" in err and len(err.strip().splitlines()) == 1
        closed = free_port()
        assert main([*base, "echo", f"X@127.0.0.1:{closed}", "--timeout", "2", "--json"]) == 1
        out, err = capsys.readouterr()
        assert json.loads(out)["ok"] is False and "failed: cannot connect" in err
        assert main([*base, "echo", "nonsense"]) == 2
        assert "neither AE@host:port nor a configured destination (pacs)" in (
            capsys.readouterr().err
        )
    finally:
        pacs.stop()
        refusing.stop()


def test_a_rejection_is_reported_as_one_however_fast_the_peer_hangs_up(tmp_path: Path) -> None:
    """DCMTK closes the connection right after its A-ASSOCIATE-RJ; pynetdicom then sometimes
    reports an abort (about 1 attempt in 10 here). The RJ must still be what the user sees."""
    refusing = Storescp(tmp_path / "refusing", ae_title="NOPE", extra=["--refuse"]).start()
    try:
        target = {"ae_title": "NOPE", "host": "127.0.0.1", "port": refusing.port}
        errors = {echo(target, "TRIAGE", 5.0)["error"] for _ in range(40)}
    finally:
        refusing.stop()
    assert errors == {"association rejected permanently: no reason given"}


# --- the installed command, beside a running daemon ----------------------------------------


def test_installed_command_works_while_the_daemon_runs(site: Site, daemon_factory) -> None:
    """`triage-admin` as installed (console script), on the store a live daemon is using."""
    daemon = daemon_factory(
        {
            "store": {"url": site.url, "spool_dir": str(site.spool.root)},
            "study": {"quiet_period_s": 0.2, "check_interval_s": 0.2},
        }
    ).start()
    script = Path(sys.prefix) / "bin" / "triage-admin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env["TRIAGE_CONFIG"] = str(daemon.config_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, env=env, timeout=120
        )

    # The daemon's scheduler queues the RECEIVING study; admin sees it and acts beside it.
    from tests.peers import wait_until

    wait_until(lambda: json.loads(run("status", "--json").stdout)["studies"]["RECEIVING"] == 0, 30)
    requeued = run("requeue", site.uids["DONE"], "--json")
    assert requeued.returncode == 0, requeued.stderr
    assert json.loads(requeued.stdout)["to_state"] == "QUEUED"
    # The daemon purges at start what is past retention (30 days): the old finished ones.
    wait_until(lambda: site.store.get_study(site.uids["DONE_OLD"]) is None, 30)
    assert site.store.get_study(site.uids["SCORING"]) is not None
    assert '"event": "purged"' in daemon.log_text()
    wrong = run("study", "1.2.3.999")
    assert wrong.returncode == 1 and wrong.stderr == "triage-admin: no study 1.2.3.999\n"
    # Not while it runs, even with --force (that is for workers gone without a goodbye).
    refused = run("db", "downgrade", "0003", "--force")
    assert refused.returncode == 1
    assert refused.stderr.startswith("triage-admin: db downgrade: a `triage serve` is running")
    if site.url.startswith("postgresql"):
        # From another host (another spool, no lock file to find): its connections tell.
        env["TRIAGE_STORE_SPOOL_DIR"] = str(daemon.config_path.parent / "elsewhere")
        refused = run("db", "downgrade", "0003", "--force")
        assert refused.returncode == 1
        assert "db downgrade: msk-triage is running on this store (" in refused.stderr
        assert f"serve {socket.gethostname()}:{daemon.process.pid}" in refused.stderr
    assert daemon.stop() == 0


# --- argument values and TLS files that used to crash ---------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "X@127.0.0.1:1", "--calling-ae", "SEVENTEEN_CHARS_X"], "not a valid AE title"),
        (["echo", "X@127.0.0.1:1", "--calling-ae", "A\\B"], "not a valid AE title"),
        (["echo", "X\\Y@127.0.0.1:1"], "echo: not a valid AE title in"),
        (["echo", "X@127.0.0.1:1", "--timeout", "inf"], "must be > 0 and <= 3600 seconds"),
        (["purge", "--older-than", "inf"], "must be 0..36500 days (100 years)"),
        (["purge", "--older-than", "nan"], "must be 0..36500 days (100 years)"),
        (["purge", "--older-than", "1000000"], "must be 0..36500 days (100 years)"),
        (["studies", "--newer-than", "99999999999d"], "at most 36500d (100 years)"),
        (["studies", "--older-than", "99999999999d"], "at most 36500d (100 years)"),
        (["worklist", "--newer-than", "99999999999d"], "at most 36500d (100 years)"),
        (["studies", "--limit", "99999999999999999999"], "argument --limit: must be 1.."),
        (["retry", "--delivery", "99999999999999999999999"], "not a delivery id"),
    ],
)
def test_argument_values_that_would_crash_are_usage_errors(
    tmp_path: Path, capsys, monkeypatch, args: list[str], message: str
) -> None:
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    config = write_config(tmp_path / "c.toml", {"store": {"url": f"sqlite:///{tmp_path}/t.db"}})
    assert main(["--config", str(config), "db", "upgrade"]) == 0  # a store to crash on
    capsys.readouterr()
    assert main(["--config", str(config), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("triage-admin: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def _outbox_files(spool: Spool) -> None:
    """The SR and SC files tests.test_outbox.delivering_study points at, as real DICOM."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    (spool.root / "outbox").mkdir(parents=True, exist_ok=True)
    for name, sop_class in (("sr.dcm", SR_CLASS), ("sc.dcm", SC_CLASS)):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = "2.25.7"
        ds.PatientName = PATIENT["name"]
        ds.PatientID = PATIENT["id"]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = "2.25.7"
        ds.save_as(spool.root / "outbox" / name, enforce_file_format=True)


def sender_site(
    tmp_path: Path, destination: dict[str, Any], *more: dict[str, Any]
) -> tuple[Any, Any, Store, Spool, str]:
    """A config with destination "pacs" (and *more*, each with its own name), its migrated
    SQLite store and spool, and a study whose SR and SC (real DICOM files) are due to each:
    (config path, config, store, spool, study UID). The caller disposes of ``store.engine``."""
    from tests.test_outbox import delivering_study
    from triage.config import load_config

    config_path = write_config(
        tmp_path / "triage.toml",
        {
            "store": {"url": f"sqlite:///{tmp_path}/t.db", "spool_dir": str(tmp_path / "spool")},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1"} | destination,
                *({"ae_title": "PACS", "host": "127.0.0.1"} | other for other in more),
            ],
        },
    )
    config = load_config(config_path, env={})
    engine = make_engine(config.store.url)
    upgrade_schema(engine)
    store = Store(engine)
    spool = Spool(config.spool_path)
    spool.prepare()
    _outbox_files(spool)
    names = ("pacs", *(other["name"] for other in more))
    return config_path, config, store, spool, delivering_study(store, destinations=names)


def test_a_destination_tls_file_that_does_not_load(tmp_path: Path, capsys, monkeypatch) -> None:
    """Refused with the daemon's config; one that stops loading while the daemon runs counts
    as a failed attempt with the reason (retried after its backoff); triage-admin, whose
    operators may not read the daemon's key, still works, and echo says it in one line."""
    import ssl

    from tests.test_config import _self_signed
    from triage.config import ConfigError, load_config
    from triage.dicom.sender import Sender

    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    ca, _key = _self_signed(tmp_path / "pki", "ca")
    config_path, config, store, spool, study_uid = sender_site(
        tmp_path, {"port": free_port(), "tls": True, "tls_ca": str(ca)}
    )
    engine = store.engine
    good_ca = ca.read_bytes()
    ca.write_text("not a certificate\n")  # replaced after the daemon started
    try:
        assert Sender(config, store, spool).deliver_once(config.destinations[0]) == 2
        with pytest.raises(ConfigError, match=r"\[destinations.pacs\] tls_ca: cannot load"):
            load_config(config_path, env={})  # what `triage serve` reads
        capsys.readouterr()
        assert main(["--config", str(config_path), "study", study_uid, "--json"]) == 0
        deliveries = json.loads(capsys.readouterr().out)["deliveries"]
    finally:
        engine.dispose()
    # An attempt, retried after its backoff: a certificate being rotated is back soon.
    assert {d["state"] for d in deliveries} == {"PENDING"}
    assert all(
        d["last_error"].startswith(f"cannot set up TLS (tls_ca {ca}): SSLError:")
        for d in deliveries
    )
    assert all(d["attempts"] == 1 for d in deliveries)
    assert main(["--config", str(config_path), "echo", "pacs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("triage-admin: echo: destination pacs: cannot set up TLS:")
    assert len(err.strip().splitlines()) == 1

    # Between reading the config and echoing, the file may change: still one line.
    def broken(_destination: object) -> None:
        raise ssl.SSLError(136, "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found")

    ca.write_bytes(good_ca)
    monkeypatch.setattr("triage.dicom.sender.client_tls_context", broken)
    assert main(["--config", str(config_path), "echo", "pacs"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "triage-admin: echo: destination pacs: cannot set up TLS:"
        " [X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found\n"
    )
