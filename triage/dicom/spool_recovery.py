"""Record again the spooled instances the store does not list (after a power loss).

The listener acknowledges an instance once its spool file is durable and its row committed.
On SQLite the listener commits without waiting for the disk (see
:func:`triage.store.db.make_engine`), so a power loss can take the last rows back while their
files stay. At start, before any listener runs, the daemon walks the spool and records every
instance file no row points at, exactly as if it had just arrived: its study is opened (or
re-opened at a new revision), completes after the quiet period and is scored.

On PostgreSQL every commit waits for the disk, so a file no row points at is an instance
whose listener died between making its file durable and committing its row: never
acknowledged, and left for good (patient data no purge would ever remove) unless the PACS
sends it again. It is recorded the same way, once older than an hour (another host's
listener may be committing a younger one's row now).

A file of an instance that another study holds (not a cancelled one), with its file there, is
no lost row but a copy the listener was about to remove when the daemon stopped: its instance
had just moved out of a cancelled study, or was a duplicate of one held elsewhere. It goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from triage.dicom.validation import Accepted, check_instance, read_header
from triage.logs import get_logger
from triage.store.repository import InstanceMeta, Store
from triage.store.spool import Spool
from triage.uids import is_valid_uid

log = get_logger("triage.spool")

#: Spool folders that hold no received instances.
_NOT_STUDIES = frozenset({"tmp", "outbox"})


@dataclass
class RecoveryReport:
    """What :func:`record_orphans` found."""

    recorded: int = 0
    unreadable: int = 0
    #: Copies of instances that a row records in another study (see the module).
    removed: int = 0
    study_uids: list[str] = field(default_factory=list)


def record_orphans(
    store: Store, spool: Spool, image_classes: frozenset[str], older_than_s: float = 0.0
) -> RecoveryReport:
    """Record every instance file in *spool* that the store does not list; see the module.

    With *older_than_s*, only files last written longer ago than that: on a spool other
    hosts' listeners share, a younger file may be one whose row is being committed now.
    """
    report = RecoveryReport()
    written_before = time.time() - older_than_s
    if not spool.root.is_dir():
        return report
    for folder in sorted(spool.root.iterdir()):
        if folder.name in _NOT_STUDIES or not folder.is_dir() or not is_valid_uid(folder.name):
            continue
        files = sorted(
            f
            for f in folder.iterdir()
            if f.suffix == ".dcm" and f.is_file() and _written_before(f, written_before)
        )
        if not files:
            continue
        known = store.instance_paths(folder.name)
        for file in files:
            relative = f"{folder.name}/{file.name}"
            if relative in known:
                continue
            outcome = _record(store, spool, file, relative, image_classes)
            if outcome == "removed":
                report.removed += 1
                continue
            if outcome == "left":
                report.unreadable += 1
                continue
            report.recorded += 1
            if folder.name not in report.study_uids:
                report.study_uids.append(folder.name)
    return report


def _written_before(file: Path, moment: float) -> bool:
    try:
        return file.stat().st_mtime < moment
    except FileNotFoundError:  # removed meanwhile (a duplicate's copy, a purge)
        return False


def _record(
    store: Store, spool: Spool, file: Path, relative: str, image_classes: frozenset[str]
) -> Literal["recorded", "left", "removed"]:
    try:
        meta = read_header(file).file_meta
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
    except Exception as exc:  # a file the listener wrote is readable; anything else is left
        log.error("spool_file_unreadable", path=relative, error=type(exc).__name__)
        return "left"
    verdict = check_instance(file, sop_class, sop_instance, image_classes)
    if not isinstance(verdict, Accepted) or verdict.own_output:
        log.error("spool_file_not_recordable", path=relative, reason=getattr(verdict, "reason", ""))
        return "left"
    if spool.relative_path(verdict.study_uid, verdict.sop_instance_uid) != relative:
        log.error("spool_file_misplaced", path=relative, study_uid=verdict.study_uid)
        return "left"
    held = store.held_path(verdict.sop_instance_uid, verdict.study_uid)
    if held is not None and held != relative and spool.holds(held):
        # Recorded again, it was a duplicate, counted as left and kept for good: no purge
        # removes a file no row names. (One held by a cancelled study is recorded: a power
        # loss may have taken the row of its move here, the old copy's removal with it.)
        spool.remove(relative)
        log.warning(
            "spool_stale_copy_removed",
            study_uid=verdict.study_uid,
            sop_instance_uid=verdict.sop_instance_uid,
            held_in=held.partition("/")[0],
        )
        return "removed"
    result = store.record_instance(
        InstanceMeta(
            study_uid=verdict.study_uid,
            series_uid=verdict.series_uid,
            sop_instance_uid=verdict.sop_instance_uid,
            sop_class_uid=verdict.sop_class_uid,
            transfer_syntax_uid=transfer_syntax,
            modality=verdict.modality,
            path=relative,
            size_bytes=file.stat().st_size,
        ),
        None,
    )
    if result.moved_from is not None:  # from a cancelled study: its copy there is no row's
        spool.remove(result.moved_from)
    log.warning(
        "spool_instance_recorded_again",
        study_uid=verdict.study_uid,
        sop_instance_uid=verdict.sop_instance_uid,
        revision=result.revision,
        duplicate=result.duplicate,
    )
    return "left" if result.duplicate else "recorded"
