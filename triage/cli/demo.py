"""`triage demo`: send a few synthetic studies to the running daemon and show what came back.

For a newcomer after the README's first command: it checks the daemon answers C-ECHO, sends
synthetic upper-extremity studies (and one chest study, which is skipped), waits until each is
finished, then prints the worklist — most likely abnormal first — and where the SR and overlay
objects went.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from triage.config import Config
from triage.dicom.polling_socket import RequestorAE
from triage.dicom.sop import TRANSFER_SYNTAXES, VERIFICATION
from triage.store.models import Result, Study, StudyState
from triage.store.outbox import Outbox
from triage.store.repository import Store
from triage.testing.synth import make_study, write_study

#: (body part, abnormal phantom findings, views) of the demo studies, in sending order.
DEMO_STUDIES = [
    ("WRIST", True, 3),
    ("HAND", False, 3),
    ("ELBOW", True, 2),
    ("SHOULDER", False, 2),
    ("FINGER", True, 2),
    ("FOREARM", False, 2),
    ("HUMERUS", True, 2),
    ("CHEST", False, 1),
]
FINAL = {StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED, StudyState.CANCELLED}


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what to do."""


@dataclass(frozen=True)
class SentStudy:
    """A demo study sent to the daemon."""

    study_uid: str
    body_part: str
    views: int


def _address(config: Config, host: str | None) -> tuple[str, int]:
    bind = config.dicom.bind
    return host or ("127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind), config.dicom.port


def _association(  # type: ignore[no-untyped-def]
    config: Config, host: str, port: int, classes: set[str]
):
    ae = RequestorAE(ae_title="TRIAGEDEMO")
    ae.add_requested_context(VERIFICATION)
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES[:2]))
    try:
        assoc = ae.associate(host, port, ae_title=config.dicom.ae_title)
    except (OSError, ValueError) as exc:  # a host name that does not resolve …
        raise DemoError(f"cannot reach {host}:{port}: {exc}") from exc
    if not assoc.is_established:
        raise DemoError(
            f"no DICOM answer from {config.dicom.ae_title}@{host}:{port}: is the daemon running? "
            "Start it with ./deploy/quickstart.sh (or `triage serve`), and allow the calling AE "
            "TRIAGEDEMO in [dicom] allowed_peers if you set an allow list."
        )
    return assoc


def check_daemon(config: Config, host: str | None) -> None:
    """C-ECHO the daemon; :class:`DemoError` says what to do when it does not answer."""
    if config.dicom.tls:
        # Its plain association would fail the handshake and read as "not running".
        raise DemoError(
            f"the daemon's DICOM port {config.dicom.port} speaks TLS ([dicom] tls = true) and"
            " the demo sends plain DICOM: run it against a daemon configured without TLS"
        )
    host, port = _address(config, host)
    assoc = _association(config, host, port, set())
    try:
        assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()


def open_daemon_store(config: Config) -> Store:
    """The daemon's store, as `triage-admin` opens it: never created here (run elsewhere, a
    relative SQLite path would name an empty new file), its schema checked."""
    from triage.cli.admin import AdminError, open_store

    try:
        return open_store(config)
    except AdminError as exc:
        raise DemoError(exc.message) from exc


def send_demo_studies(config: Config, count: int, host: str | None) -> list[SentStudy]:
    """Write *count* synthetic studies and C-STORE them to the daemon over one association."""
    host, port = _address(config, host)
    plan = [DEMO_STUDIES[i % len(DEMO_STUDIES)] for i in range(count)]
    seed = int(time.time())  # new UIDs every run: a rerun is new studies, not duplicates
    sent: list[SentStudy] = []
    with tempfile.TemporaryDirectory(prefix="triage-demo-") as folder:
        files: list[Path] = []
        for n, (part, abnormal, views) in enumerate(plan):
            datasets = make_study(
                part, views=views, abnormal=abnormal, rows=1024, cols=832, seed=seed + n
            )
            files += write_study(datasets, Path(folder) / str(n))
            sent.append(SentStudy(str(datasets[0].StudyInstanceUID), part, views))
        classes = {str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
        assoc = _association(config, host, port, classes)
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                if getattr(status, "Status", None) != 0x0000:
                    raise DemoError(f"the daemon refused {path.name}: {status}")
        finally:
            assoc.release()
    return sent


def wait_for_results(store: Store, sent: list[SentStudy], timeout: float, quiet_s: float) -> None:
    """Poll the store until every demo study is finished, printing each as it finishes."""
    deadline = time.monotonic() + timeout
    pending = {s.study_uid: s for s in sent}
    print(f"waiting for the quiet period ({quiet_s:g} s) and for scoring …", flush=True)
    while pending and time.monotonic() < deadline:
        for uid in list(pending):
            study = store.get_study(uid)
            if study is not None and study.state in FINAL:
                print(f"  {pending.pop(uid).body_part:<9} {study.state.value}", flush=True)
        time.sleep(0.5)
    if pending:
        raise DemoError(
            f"{len(pending)} studies not finished after {timeout:g} s; "
            "see the daemon's log (`triage-admin status` shows the queue)"
        )


def print_worklist(store: Store, sent: list[SentStudy], spool_root: Path) -> None:
    """The scored studies, most likely abnormal first, then where every object went."""
    with store.read_session() as session:
        rows = []
        for item in sent:
            study = session.query(Study).filter(Study.study_uid == item.study_uid).one()
            result = (
                session.query(Result)
                .filter(Result.study_id == study.id, Result.revision == study.revision)
                .one_or_none()
            )
            rows.append((item, study, result))
    rows.sort(key=lambda row: -(row[2].probability if row[2] else -1.0))
    print()
    print("Worklist (most likely abnormal first)")
    print(f"{'#':>2}  {'type':<12} {'p(abnormal)':>11}  {'finding':<9} {'state':<10} study")
    for rank, (item, study, result) in enumerate(rows, start=1):
        if result:
            finding = "ABNORMAL" if result.abnormal else "normal"
            print(
                f"{rank:>2}  {result.study_type:<12} {result.probability:>11.3f}  {finding:<9} "
                f"{study.state.value:<10} …{item.study_uid[-12:]}"
            )
        else:
            reason = _clipped(study.state_reason, 120)
            print(
                f"{rank:>2}  {item.body_part:<12} {'-':>11}  {'-':<9} {study.state.value:<10} "
                f"…{item.study_uid[-12:]}  ({reason})"
            )
    print()
    print("Where the results went")
    outbox = Outbox(store)
    for item, study, result in rows:
        if result is None:
            continue
        outputs = store_outputs(store, study.id, study.revision)
        kinds = ", ".join(f"{n} {k.upper()}" for k, n in sorted(_count(o.kind for o in outputs)))
        deliveries = [
            d for d, o in outbox.deliveries(item.study_uid) if o.revision == study.revision
        ]
        if deliveries:
            places = sorted({f"{d.destination} ({d.state.value})" for d in deliveries})
            print(f"  …{item.study_uid[-12:]}  {kinds} → {', '.join(places)}")
        else:
            folder = spool_root / "outbox" / item.study_uid
            print(f"  …{item.study_uid[-12:]}  {kinds} → kept in {folder}")


def _clipped(text: str, limit: int) -> str:
    """*text*, cut to *limit* characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _count(kinds) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return list(counts.items())


def store_outputs(store: Store, study_id: int, revision: int) -> list:  # type: ignore[type-arg]
    """The output objects of one study revision."""
    from triage.store.models import Output

    with store.read_session() as session:
        return list(
            session.query(Output).filter(Output.study_id == study_id, Output.revision == revision)
        )


def run_demo(config: Config, studies: int, timeout: float, host: str | None) -> int:
    """The whole demo; returns the exit code."""
    try:
        # Before any study is made: the daemon answers, and its store is the one we read.
        check_daemon(config, host)
        store = open_daemon_store(config)
    except DemoError as exc:
        print(f"triage demo: {exc}", file=sys.stderr)
        return 1
    try:
        sent = send_demo_studies(config, studies, host)
        print(f"sent {len(sent)} synthetic studies ({sum(s.views for s in sent)} images)")
        wait_for_results(store, sent, timeout, config.study.quiet_period_s)
        print_worklist(store, sent, config.spool_path)
        if not config.destinations:
            print("  (no [[destinations]] configured: add your PACS to send results back)")
        return 0
    except DemoError as exc:
        print(f"triage demo: {exc}", file=sys.stderr)
        return 1
    finally:
        store.engine.dispose()
