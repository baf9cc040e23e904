"""`triage-admin`: look at and act on a running msk-triage (SQLite or PostgreSQL store).

It reads the daemon's configuration (``--config FILE`` or ``$TRIAGE_CONFIG``, with the same
``TRIAGE_<SECTION>_<KEY>`` overrides) and works on the same store and spool while the daemon
runs: reads take no write lock, and every change is one transaction on the study it concerns.

Output is a table for people, or with ``--json`` one JSON object for scripts (schema in the
README; every object carries ``"schema": "msk-triage-admin/1"``; keys are only ever added).

Exit codes: 0 ok; 1 the operation failed or found nothing (unknown study, nothing to retry
for the study or delivery named (``retry --all-failed`` with nothing failed is 0), echo
failed, schema behind for ``db current``, ``db downgrade`` while a daemon or worker runs);
2 usage or configuration error; 3 the store cannot be used (unreachable, no such SQLite
file, schema missing, not current, or newer than this version knows).

Patient identity is not in the store and is never shown, except by ``study UID
--show-patient``, which reads it from the spooled files.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from triage import __version__
from triage.config import (
    MAX_RETENTION_DAYS,
    Config,
    ConfigError,
    display_url,
    is_valid_ae_title,
    load_config,
)

SCHEMA = "msk-triage-admin/1"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORE = 3

#: A PostgreSQL server that does not answer must not hang the command.
PG_CONNECT_TIMEOUT_S = 5


class AdminError(Exception):
    """Stops the command with a one-line message and an exit code."""

    def __init__(self, code: int, message: str, *, reported: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: The command already printed its JSON object (which says what failed).
        self.reported = reported


# --- arguments -----------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest age a filter or purge takes: a cutoff further back is no valid date.
MAX_AGE_DAYS = MAX_RETENTION_DAYS
#: Row ids are 64-bit integers in both stores (a larger one overflows the driver).
MAX_ID = 2**63 - 1


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` → seconds (at most :data:`MAX_AGE_DAYS`)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (a number and a unit: 90s, 30m, 2h, 7d, 1w)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if seconds > MAX_AGE_DAYS * 86400:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_AGE_DAYS}d (100 years) (got {text.strip()!r})"
        )
    return seconds


def parse_days(text: str) -> float:
    """``30`` or ``30d`` (days, 0..:data:`MAX_AGE_DAYS`), or any duration (``12h``) → days."""
    try:
        days = float(text)
    except ValueError:
        days = parse_duration(text) / 86400
    # float() reads "nan" and "inf" too.
    if not math.isfinite(days) or not 0 <= days <= MAX_AGE_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be 0..{MAX_AGE_DAYS} days (100 years) (got {text!r})"
        )
    return days


def parse_state(text: str) -> list[str]:
    """``queued`` or ``queued,failed`` → ``["QUEUED", "FAILED"]``."""
    from triage.store.models import StudyState

    return _names_of(text, StudyState, "state")


def _names_of(text: str, members: type[enum.Enum], what: str) -> list[str]:
    """The comma-separated member names in *text*, upper-cased; a usage error names the
    first that is not one of *members*."""
    names = []
    for item in text.split(","):
        name = item.strip().upper()
        if name not in members.__members__:
            known = ", ".join(str(member.value) for member in members)
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r} (one of {known})")
        names.append(name)
    return names


def parse_study_type(text: str) -> str:
    """``wrist``, ``WRIST`` or ``XR_WRIST`` → ``XR_WRIST``."""
    from triage.study_types import StudyType

    name = text.strip().upper().removeprefix("XR_")
    if name not in StudyType.__members__:
        known = ", ".join(t.name.lower() for t in StudyType)
        raise argparse.ArgumentTypeError(f"unknown study type {text!r} (one of {known})")
    return StudyType[name].value


def parse_uid(text: str) -> str:
    """A syntactically valid DICOM UID."""
    from triage.uids import is_valid_uid

    value = text.strip()
    if not is_valid_uid(value):
        raise argparse.ArgumentTypeError(f"not a DICOM UID: {text!r}")
    return value


def parse_outcome(text: str) -> list[str]:
    """``rejected`` or ``rejected,aborted`` → ``["REJECTED", "ABORTED"]``."""
    from triage.store.models import AssociationOutcome

    return _names_of(text, AssociationOutcome, "outcome")


def parse_limit(text: str) -> int:
    """A positive row limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_ID} (got {value})")
    return value


def parse_delivery_id(text: str) -> int:
    """A delivery id, as `triage-admin study` shows it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a delivery id: {text!r}") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"not a delivery id: {text!r} (1..{MAX_ID})")
    return value


def parse_ae_title(text: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash."""
    if not is_valid_ae_title(text):
        raise argparse.ArgumentTypeError(
            f"not a valid AE title (1-16 printable characters, no '\\'): {text!r}"
        )
    return text.strip()


def parse_timeout(text: str) -> float:
    """Seconds, more than 0 and at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds (got {text!r})")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("triage-admin").strip()
        raise AdminError(EXIT_USAGE, f"{where + ': ' if where else ''}{message} (see --help)")


# --- context: config, store, output --------------------------------------------------------


@dataclass
class Context:
    """What a command gets: the config, the arguments and the output channel."""

    config: Config
    args: argparse.Namespace
    json: bool
    _store: Any = None

    def store(self, *, create: bool = False) -> Any:
        """The store, opened once; raises AdminError(3) if it cannot be used."""
        if self._store is None:
            self._store = open_store(self.config, create=create, check_schema=not create)
        return self._store

    def emit(self, data: dict[str, Any], render: Callable[[Any, dict[str, Any]], None]) -> None:
        """Print *data* as JSON (``--json``) or through *render* for people."""
        if self.json:
            print(json.dumps({"schema": SCHEMA, **data}, indent=2, default=str))
            return
        render(_console(), data)


def _console() -> Any:
    from rich.console import Console

    # Not a terminal (a pipe, a file): wide enough that 64-character UIDs never wrap.
    # No markup, no emoji codes: what is printed comes from peers and operators (a calling
    # AE title may be "CT[/A]", a cancel reason anything), and read as markup "[/A]" stopped
    # the command with a traceback and "[bold]" vanished. Styles go in as rich Text.
    return Console(
        width=None if sys.stdout.isatty() else 220, highlight=False, markup=False, emoji=False
    )


def _styled(text: str, style: str) -> Any:
    """*text* printed in *style* (the console reads no markup)."""
    from rich.text import Text

    return Text(text, style=style)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_store(config: Config, *, create: bool = False, check_schema: bool = True) -> Any:
    """A :class:`~triage.store.repository.Store` on the configured database.

    Never creates a missing SQLite file unless *create* (``db upgrade``): a wrong working
    directory must say "no store here", not produce an empty one.
    """
    from sqlalchemy.engine import make_url

    from triage.store.db import (
        current_revision,
        head_revision,
        known_revisions,
        make_engine,
        normalise_url,
        schema_too_new,
    )
    from triage.store.repository import Store

    url = normalise_url(config.store.url)
    shown = display_url(config.store.url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).exists() and not create:
            raise AdminError(
                EXIT_STORE,
                f"no store at {database} (relative paths in the config resolve against the"
                " working directory: run from the daemon's, or pass --workdir)",
            )
    elif "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(PG_CONNECT_TIMEOUT_S)})
        url = parsed.render_as_string(hide_password=False)
    try:
        engine = make_engine(url, role="admin")
    except OSError as exc:  # the SQLite file's folder (`db upgrade` creates it)
        raise AdminError(
            EXIT_STORE,
            f"cannot create the SQLite store's folder {exc.filename}: {exc.strerror or exc}",
        ) from exc
    try:
        with engine.connect():
            pass
        revision = current_revision(engine) if check_schema else None
    except Exception as exc:
        engine.dispose()
        raise AdminError(EXIT_STORE, f"store unreachable: {shown}: {_first_line(exc)}") from exc
    if check_schema:
        head = head_revision()
        if revision is None:
            engine.dispose()
            raise AdminError(
                EXIT_STORE,
                f"store {shown} has no schema: start the daemon or run `triage-admin db upgrade`",
            )
        if revision not in known_revisions():
            engine.dispose()
            raise AdminError(EXIT_STORE, f"store {shown}: {schema_too_new(revision)}")
        if revision != head:
            engine.dispose()
            raise AdminError(
                EXIT_STORE,
                f"store {shown} is at schema {revision}, this msk-triage needs {head}:"
                " run `triage-admin db upgrade`",
            )
    return Store(engine)


# --- rendering helpers ---------------------------------------------------------------------


def _table(title: str, columns: Sequence[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def human_age(seconds: float | None) -> str:
    """``42s``, ``5m``, ``3h12m``, ``2d4h``."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def human_bytes(size: int | None) -> str:
    """``1.5 GiB``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# --- status --------------------------------------------------------------------------------


def model_summary(config: Config) -> dict[str, Any]:
    """The model the config names, from its card (no torch, weights not hashed)."""
    from triage.scoring.card import load_card

    summary: dict[str, Any] = {
        "card": config.model.card,
        "device": config.model.device,
        "allow_unvalidated": config.model.allow_unvalidated,
    }
    try:
        card = load_card(config.model.card, verify_weights=False)
    except Exception as exc:
        summary.update(name=None, version=None, validated=None, runs=False, error=str(exc))
        return summary
    summary.update(
        name=card.name,
        version=card.version,
        validated=card.validated,
        runs=card.validated or config.model.allow_unvalidated,
        error=None,
    )
    return summary


def cmd_status(ctx: Context) -> int:
    """Counts per state, oldest queued, workers, deliveries, model, spool."""
    from triage.store.db import current_revision, head_revision
    from triage.store.queries import status
    from triage.store.spool import Spool

    store = ctx.store()
    data: dict[str, Any] = {
        "store": {
            "engine": store.engine.dialect.name,
            "url": display_url(ctx.config.store.url),
            "schema_revision": current_revision(store.engine),
            "head_revision": head_revision(),
        }
    }
    data.update(status(store))
    data["model"] = model_summary(ctx.config)
    spool = Spool(ctx.config.spool_path, ctx.config.store.min_free_mb * 1024 * 1024)
    try:
        free: int | None = spool.free_bytes()
    except OSError:
        free = None
    data["spool"] = {
        "path": str(spool.root),
        "free_bytes": free,
        "min_free_bytes": spool.min_free_bytes,
        "below_floor": free is not None and free < spool.min_free_bytes,
    }
    ctx.emit(data, _render_status)
    return EXIT_OK


def _render_status(console: Any, data: dict[str, Any]) -> None:
    store, model, spool = data["store"], data["model"], data["spool"]
    console.print(f"store   {store['engine']} {store['url']} (schema {store['schema_revision']})")
    validated = "validated" if model["validated"] else "NOT VALIDATED"
    if model.get("error"):
        console.print(f"model   card {model['card']}: {model['error']}")
    else:
        console.print(
            f"model   {model['name']} {model['version']} ({validated}), device {model['device']}"
        )
    line = _styled(
        f"spool   {spool['path']}: {human_bytes(spool['free_bytes'])} free"
        f" (floor {human_bytes(spool['min_free_bytes'])})",
        "",
    )
    if spool["below_floor"]:
        line.append(" BELOW FLOOR", style="bold red")
    console.print(line)
    console.print(f"oldest queued study waits {human_age(data['oldest_queued_age_s'])}")
    studies = _table("Studies", ["state", "count"])
    for state, count in data["studies"].items():
        studies.add_row(state, str(count))
    console.print(studies)
    deliveries = _table("Deliveries", ["state", "count"])
    for state, count in data["deliveries"].items():
        deliveries.add_row(state, str(count))
    console.print(deliveries)
    workers = _table("Workers", ["id", "state", "device", "model", "heartbeat", "started"])
    for worker in data["workers"]:
        workers.add_row(
            worker["id"],
            worker["state"],
            worker["device"],
            worker["model_version"],
            f"{human_age(worker['heartbeat_age_s'])} ago",
            _cell(worker["started_at"]),
        )
    console.print(workers if data["workers"] else "no worker has reported")
    if data["failed_deliveries"]:
        failed = _table(
            "Failed deliveries (newest)", ["id", "study", "destination", "kind", "tries", "error"]
        )
        for item in data["failed_deliveries"]:
            failed.add_row(
                str(item["id"]),
                item["study_uid"],
                item["destination"],
                item["kind"],
                str(item["attempts"]),
                item["last_error"],
            )
        console.print(failed)


# --- studies, study, worklist --------------------------------------------------------------


def cmd_studies(ctx: Context) -> int:
    """Studies filtered by state, age and type, newest first."""
    from triage.store.models import StudyState
    from triage.store.queries import StudyFilter, list_studies

    args = ctx.args
    states = tuple(StudyState(s) for group in (args.state or []) for s in group)
    wanted = StudyFilter(
        states=states,
        older_than_s=args.older_than,
        newer_than_s=args.newer_than,
        study_types=tuple(args.study_type or ()),
        limit=args.limit,
    )
    rows = list_studies(ctx.store(), wanted)
    ctx.emit({"count": len(rows), "studies": rows}, _render_studies)
    return EXIT_OK


def _render_studies(console: Any, data: dict[str, Any]) -> None:
    table = _table(
        f"Studies ({data['count']}, newest first)",
        ["study", "state", "rev", "type", "inst", "probability", "finding", "age", "in state"],
    )
    for row in data["studies"]:
        table.add_row(
            row["study_uid"],
            row["state"],
            str(row["revision"]),
            _cell(row["study_type"]),
            str(row["instances"]),
            _cell(row["probability"]),
            _cell(row["finding"]),
            human_age(row["age_s"]),
            human_age(row["in_state_s"]),
        )
    console.print(table)


def cmd_associations(ctx: Context) -> int:
    """The association audit: who connected, from where, and how it ended; newest first."""
    from triage.store.models import AssociationOutcome
    from triage.store.queries import AssociationFilter, list_associations

    args = ctx.args
    wanted = AssociationFilter(
        outcomes=tuple(AssociationOutcome(o) for group in (args.outcome or []) for o in group),
        newer_than_s=args.newer_than,
        calling_ae=args.calling_ae,
        peer_host=args.peer_host,
        limit=args.limit,
    )
    rows = list_associations(ctx.store(), wanted)
    ctx.emit({"count": len(rows), "associations": rows}, _render_associations)
    return EXIT_OK


def _render_associations(console: Any, data: dict[str, Any]) -> None:
    table = _table(
        f"Associations ({data['count']}, newest first)",
        ["id", "age", "calling AE", "peer", "tls", "outcome", "stored", "dup", "failed", "reason"],
    )
    for row in data["associations"]:
        table.add_row(
            str(row["id"]),
            human_age(row["age_s"]),
            row["calling_ae"] or "-",
            f"{row['peer_host']}:{row['peer_port']}",
            _cell(row["tls"]),
            row["outcome"],
            str(row["stored"]),
            str(row["duplicate"]),
            str(row["failed"]),
            row["reason"] or "-",
        )
    console.print(table)


def read_patient(config: Config, store: Any, study_uid: str) -> dict[str, Any]:
    """PatientName, PatientID and PatientBirthDate from the first readable spooled file."""
    from pydicom import dcmread

    from triage.store.queries import instance_paths
    from triage.store.spool import Spool

    spool = Spool(config.spool_path)
    for relative in instance_paths(store, study_uid):
        try:
            ds = dcmread(
                spool.path(relative),
                stop_before_pixels=True,
                specific_tags=["PatientName", "PatientID", "PatientBirthDate"],
            )
        except Exception:
            continue
        return {
            "name": str(ds.get("PatientName", "") or ""),
            "id": str(ds.get("PatientID", "") or ""),
            "birth_date": str(ds.get("PatientBirthDate", "") or ""),
            "source": relative,
            "error": None,
        }
    return {
        "name": None,
        "id": None,
        "birth_date": None,
        "source": None,
        "error": "no spooled file of this study could be read (purged?)",
    }


def _delivery_note(item: dict[str, Any]) -> str:
    """The last error, or the warning status a stored object came back with (0xB000 …:
    stored, but the PACS changed or doubted something)."""
    if item["last_error"]:
        return str(item["last_error"])
    status = item.get("last_status")
    if status:
        return f"stored with warning 0x{status:04X}"
    return "-"


def cmd_study(ctx: Context) -> int:
    """One study: instances, views, result, deliveries, history."""
    from triage.store.queries import study_detail

    store = ctx.store()
    detail = study_detail(store, ctx.args.uid)
    if detail is None:
        raise AdminError(EXIT_FAILED, f"no study {ctx.args.uid}")
    if ctx.args.show_patient:
        detail["patient"] = read_patient(ctx.config, store, ctx.args.uid)
    ctx.emit(detail, _render_study)
    return EXIT_OK


def _render_study(console: Any, data: dict[str, Any]) -> None:
    study = data["study"]
    console.print(_styled(study["study_uid"], "bold"))
    console.print(
        f"state {study['state']} (revision {study['revision']}, for"
        f" {human_age(study['in_state_s'])}), type {_cell(study['study_type'])},"
        f" first instance {human_age(study['age_s'])} ago"
    )
    if study["reason"]:
        console.print(f"reason: {study['reason']}")
    if study.get("lease_owner"):
        console.print(f"held by {study['lease_owner']} until {study['lease_expires_at']}")
    if "patient" in data:
        patient = data["patient"]
        if patient["error"]:
            console.print(f"patient: {patient['error']}")
        else:
            console.print(
                f"patient: {patient['name']} / ID {patient['id']} / born {patient['birth_date']}"
            )
    result = data["result"]
    if result:
        validated = "" if result["model_validated"] else " NOT VALIDATED"
        console.print(
            f"result (revision {result['revision']}): {result['finding']} p="
            f"{result['probability']:.3f} (threshold {result['threshold']}),"
            f" {result['views_scored']} views scored, {result['views_skipped']} skipped,"
            f" model {result['model_name']} {result['model_version']}{validated},"
            f" {result['scoring_ms']:.0f} ms"
        )
    instances = _table(
        "Instances", ["sop instance", "series", "modality", "size", "rev", "received"]
    )
    for item in data["instances"]:
        instances.add_row(
            item["sop_instance_uid"],
            item["series_uid"],
            _cell(item["modality"]),
            human_bytes(item["size_bytes"]),
            str(item["revision"]),
            _cell(item["received_at"]),
        )
    console.print(instances)
    if data["views"]:
        views = _table("Views", ["sop instance", "probability", "note"])
        for view in data["views"]:
            note = ("skipped: " if view["skipped"] else "") + view["note"]
            views.add_row(view["sop_instance_uid"], _cell(view["probability"]), note)
        console.print(views)
    if data["deliveries"]:
        deliveries = _table(
            "Deliveries", ["id", "destination", "kind", "rev", "state", "tries", "last error"]
        )
        for item in data["deliveries"]:
            deliveries.add_row(
                str(item["id"]),
                item["destination"],
                item["kind"],
                str(item["revision"]),
                item["state"],
                str(item["attempts"]),
                _delivery_note(item),
            )
        console.print(deliveries)
    history = _table("History", ["at", "from", "to", "rev", "reason"])
    for event in data["history"]:
        history.add_row(
            _cell(event["at"]),
            _cell(event["from_state"]),
            event["to_state"],
            str(event["revision"]),
            event["reason"],
        )
    console.print(history)


def cmd_worklist(ctx: Context) -> int:
    """Scored studies, most likely abnormal first."""
    from triage.store.queries import worklist

    rows = worklist(
        ctx.store(),
        limit=ctx.args.limit,
        study_types=ctx.args.study_type or (),
        newer_than_s=ctx.args.newer_than,
    )
    ctx.emit({"count": len(rows), "worklist": rows}, _render_worklist)
    return EXIT_OK


def _render_worklist(console: Any, data: dict[str, Any]) -> None:
    table = _table(
        "Worklist (most likely abnormal first)",
        ["#", "study", "type", "probability", "finding", "state", "age"],
    )
    for row in data["worklist"]:
        finding = row["finding"]
        table.add_row(
            str(row["rank"]),
            row["study_uid"],
            row["study_type"],
            f"{row['probability']:.3f}",
            _styled(finding, "bold red" if finding == "abnormal" else ""),
            row["state"],
            human_age(row["age_s"]),
        )
    console.print(table)


# --- actions -------------------------------------------------------------------------------


def _render_change(console: Any, data: dict[str, Any]) -> None:
    if data["changed"]:
        console.print(f"{data['study_uid']}: {data['from_state']} → {data['to_state']}")
    else:
        console.print(f"{data['study_uid']}: already {data['to_state']}, nothing changed")


def cmd_requeue(ctx: Context) -> int:
    """Back to QUEUED (SCORING only with --force)."""
    from triage.store.operations import NotAllowed, StudyNotFound, operator_name, requeue

    try:
        change = requeue(ctx.store(), ctx.args.uid, force=ctx.args.force, actor=operator_name())
    except (StudyNotFound, NotAllowed) as exc:
        raise AdminError(EXIT_FAILED, str(exc)) from exc
    ctx.emit(change.as_dict(), _render_change)
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    """→ CANCELLED with a reason."""
    from triage.store.operations import StudyNotFound, cancel, operator_name

    reason = ctx.args.reason.strip()
    if not reason:
        raise AdminError(EXIT_USAGE, "cancel: --reason must not be empty")
    try:
        change = cancel(ctx.store(), ctx.args.uid, reason, actor=operator_name())
    except StudyNotFound as exc:
        raise AdminError(EXIT_FAILED, str(exc)) from exc
    ctx.emit({**change.as_dict(), "reason": reason}, _render_change)
    return EXIT_OK


def cmd_retry(ctx: Context) -> int:
    """Start FAILED deliveries again (Outbox.retry)."""
    from triage.store.outbox import Outbox

    args = ctx.args
    store = ctx.store()
    outbox = Outbox(store)
    # A destination no longer configured has no sender: retried, its deliveries would wait
    # for ever, and their studies in DELIVERING with them.
    configured = [destination.name for destination in ctx.config.destinations]
    not_retried: list[int] = []
    if args.delivery:
        selector: dict[str, Any] = {"deliveries": list(args.delivery)}
        restarted = outbox.retry(delivery_ids=args.delivery, configured=configured)
        if not restarted:
            raise AdminError(
                EXIT_FAILED,
                "no FAILED delivery of a current revision to a configured destination with id "
                + ", ".join(map(str, args.delivery)),
            )
        not_retried = sorted(set(args.delivery) - set(restarted))
    elif args.study:
        selector = {"study_uid": args.study}
        if store.get_study(args.study) is None:
            raise AdminError(EXIT_FAILED, f"no study {args.study}")
        restarted = outbox.retry(study_uid=args.study, configured=configured)
        if not restarted:
            raise AdminError(
                EXIT_FAILED,
                f"study {args.study} has no FAILED delivery to a configured destination to retry",
            )
    else:
        selector = {"all_failed": True}
        restarted = outbox.retry(configured=configured)
    ctx.emit(
        {"retried": len(restarted), "delivery_ids": restarted, "selector": selector},
        lambda console, data: console.print(f"{data['retried']} deliveries will be sent again"),
    )
    if not_retried:
        # Some of those named were retried: the operator must still learn of the others.
        raise AdminError(
            EXIT_FAILED,
            "no FAILED delivery of a current revision to a configured destination with id "
            + ", ".join(map(str, not_retried)),
            reported=True,
        )
    return EXIT_OK


def cmd_purge(ctx: Context) -> int:
    """Remove finished studies past the age (files and rows)."""
    from triage.store.operations import purge
    from triage.store.spool import Spool

    days = ctx.args.older_than
    if days is None:
        days = float(ctx.config.store.retention_days)
    spool = Spool(ctx.config.spool_path)
    if not spool.is_prepared():
        raise AdminError(
            EXIT_STORE,
            f"no spool at {spool.root}: nothing purged (relative paths in the config resolve"
            " against the working directory: run from the daemon's, or pass --workdir)",
        )
    report = purge(
        ctx.store(),
        spool,
        days,
        dry_run=ctx.args.dry_run,
        audit_older_than_days=float(ctx.config.store.audit_retention_days),
    )
    ctx.emit(report.as_dict(), _render_purge)
    if report.not_purged:
        # Typically run as another user than the daemon's: those studies keep their rows
        # and files for the next purge; the others are purged.
        first = next(iter(report.not_purged.values()))
        raise AdminError(
            EXIT_FAILED,
            f"{len(report.not_purged)} studies not purged, a file of theirs could not be"
            f" removed (run triage-admin as the daemon's user); first: {first}",
            reported=True,
        )
    return EXIT_OK


def _render_purge(console: Any, data: dict[str, Any]) -> None:
    verb = "would remove" if data["dry_run"] else "removed"
    console.print(
        f"{verb} {data['studies']} studies finished before {data['cutoff']}:"
        f" {data['instances']} instances, {data['outputs']} outputs,"
        f" {data['files']} files ({human_bytes(data['bytes'])}), {data['workers']} worker rows,"
        f" {data['associations']} association audit rows"
    )
    for uid in data["study_uids"][:50]:
        console.print(f"  {uid}")
    if data["studies"] > 50:
        console.print(f"  … and {data['studies'] - 50} more (--json lists all)")
    for entry in data["not_purged"][:50]:
        console.print(f"  not purged: {entry['study_uid']}: {entry['error']}")


# --- db --------------------------------------------------------------------------------------


def cmd_db_current(ctx: Context) -> int:
    """The schema revision of the store and the one this code needs."""
    from triage.store.db import current_revision, head_revision, known_revisions

    store = open_store(ctx.config, check_schema=False)
    current = current_revision(store.engine)
    head = head_revision()
    newer = current is not None and current not in known_revisions()
    data = {
        "engine": store.engine.dialect.name,
        "url": display_url(ctx.config.store.url),
        "current": current,
        "head": head,
        "up_to_date": current == head,
        "newer_than_head": newer,
    }

    def render(console: Any, d: dict[str, Any]) -> None:
        advice = ""
        if d["newer_than_head"]:
            advice = " — newer than this msk-triage: run the version that upgraded it"
        elif not d["up_to_date"]:
            advice = " — run `triage-admin db upgrade`"
        console.print(
            f"{d['engine']} {d['url']}: schema {d['current'] or '(none)'}, head {d['head']}"
            + advice
        )

    ctx.emit(data, render)
    if newer:  # this version cannot use it at all, as every other command says (see README)
        return EXIT_STORE
    return EXIT_OK if current == head else EXIT_FAILED


def cmd_db_downgrade(ctx: Context) -> int:
    """Take the schema back to an older migration, before going back to an older
    msk-triage; refused while a daemon or worker uses the store."""
    from triage.store.db import (
        DowngradeRefused,
        StoreUnavailable,
        check_downgrade,
        downgrade_schema,
        other_processes,
    )

    store = open_store(ctx.config, check_schema=False)
    target = ctx.args.revision
    try:
        before = check_downgrade(store.engine, target)
        if before != target:
            with _no_daemon_running(ctx.config) as running:
                if running:
                    raise AdminError(
                        EXIT_FAILED,
                        f"db downgrade: a `triage serve` is running on this {running}:"
                        " stop it first",
                    )
                connected = other_processes(store.engine)
                live = [] if ctx.args.force else _live_workers(store)
                if connected or live:
                    raise AdminError(
                        EXIT_FAILED,
                        "db downgrade: msk-triage is running on this store"
                        f" ({', '.join(connected or live)}): stop every `triage serve` and"
                        " `triage worker` first"
                        + ("" if connected else " (or --force for workers that are gone)"),
                    )
                downgrade_schema(store.engine, target)
    except DowngradeRefused as exc:
        raise AdminError(EXIT_USAGE, f"db downgrade: {exc}") from exc
    except StoreUnavailable as exc:
        raise AdminError(EXIT_STORE, str(exc)) from exc
    ctx.emit(
        {"from": before, "to": target, "changed": before != target},
        lambda console, d: console.print(
            f"schema {d['from']} → {d['to']}: install the msk-triage that needs it before"
            " starting it"
            if d["changed"]
            else f"schema already at {d['to']}"
        ),
    )
    return EXIT_OK


@contextlib.contextmanager
def _no_daemon_running(config: Config) -> Iterator[str]:
    """Hold the locks a running `triage serve` holds (spool, beside a SQLite store), so none
    starts meanwhile; yields what a running one holds ("spool", "SQLite store"), or "".

    Lock files are opened read-only and never created: they belong to the daemon's user,
    and one made by root here would stop the daemon from opening it."""
    from triage.daemon import serve_lock_places

    with contextlib.ExitStack() as held:
        for folder, name, what, _described in serve_lock_places(config):
            try:
                handle = held.enter_context(open(folder / name, "rb"))
            except FileNotFoundError:
                continue  # no daemon ever ran here
            except OSError as exc:
                raise AdminError(
                    EXIT_FAILED, f"db downgrade: cannot check {exc.filename}: {exc.strerror}"
                ) from exc
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield f"{what} ({folder})"
                return
        yield ""


def _live_workers(store: Any) -> list[str]:
    """Workers (host:pid) whose heartbeat is recent and that did not stop cleanly."""
    from triage.store.queries import workers

    with store.session() as session:
        rows = workers(session, store.database_now(session.connection()))
    return [f"{row['host']}:{row['pid']}" for row in rows if row["state"] == "alive"]


def cmd_db_upgrade(ctx: Context) -> int:
    """Bring the schema to the newest migration (Alembic)."""
    from triage.store.db import StoreUnavailable, current_revision, upgrade_schema

    store = ctx.store(create=True)
    before = current_revision(store.engine)
    try:
        after = upgrade_schema(store.engine)
    except StoreUnavailable as exc:
        raise AdminError(EXIT_STORE, str(exc)) from exc
    ctx.emit(
        {"from": before, "to": after, "changed": before != after},
        lambda console, d: console.print(
            f"schema {d['from'] or '(none)'} → {d['to']}"
            if d["changed"]
            else f"schema already at {d['to']}"
        ),
    )
    return EXIT_OK


# --- echo ------------------------------------------------------------------------------------

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def parse_target(config: Config, text: str) -> dict[str, Any]:
    """``AE@host:port`` (``AE@[::1]:104``), or the name of a ``[[destinations]]`` entry."""
    match = _TARGET.match(text.strip())
    if match:
        port = int(match.group("port"))
        if not 1 <= port <= 65535:
            raise AdminError(EXIT_USAGE, f"echo: port out of range in {text!r}")
        host = match.group("host").strip("[]")
        if not is_valid_ae_title(match.group("ae")):
            raise AdminError(EXIT_USAGE, f"echo: not a valid AE title in {text!r}")
        return {"ae_title": match.group("ae").strip(), "host": host, "port": port, "name": None}
    for destination in config.destinations:
        if destination.name == text:
            return {
                "ae_title": destination.ae_title,
                "host": destination.host,
                "port": destination.port,
                "name": destination.name,
            }
    raise AdminError(
        EXIT_USAGE,
        f"echo: {text!r} is neither AE@host:port nor a configured destination"
        + (f" ({', '.join(d.name for d in config.destinations)})" if config.destinations else ""),
    )


def echo(target: dict[str, Any], calling_ae: str, timeout: float, tls: Any = None) -> dict:
    """One C-ECHO with pynetdicom; returns ok, status, milliseconds and the error if any."""
    from triage.dicom.polling_socket import RequestorAE
    from triage.dicom.sender import _association_failure, associate

    ae = RequestorAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    started = time.monotonic()
    try:
        assoc, tls_error = associate(ae, target["host"], target["port"], target["ae_title"], tls)
    except Exception as exc:
        return {"ok": False, "status": None, "ms": None, "error": f"cannot connect: {exc}"}
    if not assoc.is_established:
        failure = _association_failure(assoc, tls_error)
        return {"ok": False, "status": None, "ms": None, "error": failure}
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ms = round((time.monotonic() - started) * 1000, 1)
    status = getattr(response, "Status", None)
    if status is None:
        return {"ok": False, "status": None, "ms": ms, "error": "no answer to the C-ECHO"}
    ok = status == 0x0000
    error = None if ok else f"C-ECHO answered with status 0x{status:04X}"
    return {"ok": ok, "status": f"0x{status:04X}", "ms": ms, "error": error}


def cmd_echo(ctx: Context) -> int:
    """C-ECHO a peer to check routing."""
    from triage.dicom.sender import client_tls_context

    target = parse_target(ctx.config, ctx.args.target)
    calling = ctx.args.calling_ae or ctx.config.dicom.ae_title
    tls = None
    if target["name"]:
        destination = next(d for d in ctx.config.destinations if d.name == target["name"])
        calling = ctx.args.calling_ae or destination.calling_ae or ctx.config.dicom.ae_title
        try:
            tls = client_tls_context(destination)
        except (OSError, ValueError) as exc:  # a TLS file changed since the config was read
            raise AdminError(
                EXIT_USAGE, f"echo: destination {destination.name}: cannot set up TLS: {exc}"
            ) from exc
    outcome = echo(target, calling, ctx.args.timeout, tls)
    data = {"target": target, "calling_ae": calling, **outcome}
    where = f"{target['ae_title']}@{target['host']}:{target['port']}"
    if ctx.json:
        ctx.emit(data, lambda console, d: None)
    elif outcome["ok"]:
        _console().print(f"{where}: C-ECHO ok ({outcome['ms']} ms) as {calling}")
    if not outcome["ok"]:
        raise AdminError(EXIT_FAILED, f"echo {where} failed: {outcome['error']}", reported=ctx.json)
    return EXIT_OK


# --- parser and main -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `triage-admin` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the command does not reset one given before it.
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object"
    )
    common.add_argument(
        "--config", "-c", default=argparse.SUPPRESS, help="TOML config (default $TRIAGE_CONFIG)"
    )
    common.add_argument(
        "--workdir",
        default=argparse.SUPPRESS,
        help="resolve relative config paths against DIR (the daemon's working directory,"
        " /var/lib/msk-triage under systemd; default: the current directory)",
    )
    parser = _Parser(
        prog="triage-admin",
        description="Look at and act on msk-triage's store while the daemon runs.",
        parents=[common],
        epilog="Exit codes: 0 ok, 1 failed or not found, 2 usage or config error,"
        " 3 store unusable (unreachable, missing, schema not current).",
    )
    parser.add_argument("--version", action="version", version=f"msk-triage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, func: Callable[[Context], int], help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(func=func)
        return sub

    command("status", cmd_status, "counts per state, workers, deliveries, model, spool")

    studies = command("studies", cmd_studies, "list studies, newest first")
    studies.add_argument(
        "--state", type=parse_state, action="append", help="e.g. queued or queued,failed"
    )
    studies.add_argument(
        "--older-than", type=parse_duration, help="first instance at least this old (2h, 7d)"
    )
    studies.add_argument(
        "--newer-than", type=parse_duration, help="first instance at most this old (30m)"
    )
    studies.add_argument(
        "--study-type", type=parse_study_type, action="append", help="wrist, XR_HAND …"
    )
    studies.add_argument("--limit", type=parse_limit, default=50, help="rows (default 50)")

    associations = command(
        "associations", cmd_associations, "the association audit: peers and how each ended"
    )
    associations.add_argument(
        "--outcome",
        type=parse_outcome,
        action="append",
        help="e.g. rejected or rejected,aborted",
    )
    associations.add_argument(
        "--newer-than", type=parse_duration, help="started at most this long ago (30m, 1d)"
    )
    associations.add_argument("--calling-ae", help="only this calling AE title")
    associations.add_argument("--peer-host", help="only this peer address")
    associations.add_argument("--limit", type=parse_limit, default=50, help="rows (default 50)")

    study = command("study", cmd_study, "one study: instances, views, result, deliveries")
    study.add_argument("uid", type=parse_uid, help="StudyInstanceUID")
    study.add_argument(
        "--show-patient",
        action="store_true",
        help="also show PatientName, PatientID, PatientBirthDate (read from the spooled files)",
    )

    worklist = command("worklist", cmd_worklist, "scored studies, most likely abnormal first")
    worklist.add_argument("--limit", type=parse_limit, default=50, help="rows (default 50)")
    worklist.add_argument("--study-type", type=parse_study_type, action="append")
    worklist.add_argument("--newer-than", type=parse_duration, help="first instance within")

    requeue = command("requeue", cmd_requeue, "put a study back in the queue to score again")
    requeue.add_argument("uid", type=parse_uid)
    requeue.add_argument(
        "--force",
        action="store_true",
        help="also a study being scored (its worker's result is discarded)",
    )

    cancel = command("cancel", cmd_cancel, "cancel a study (no scoring, no delivery)")
    cancel.add_argument("uid", type=parse_uid)
    cancel.add_argument("--reason", required=True, help="why (kept in the study's history)")

    retry = command("retry", cmd_retry, "send FAILED deliveries again")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--delivery", type=parse_delivery_id, action="append", metavar="ID", help="repeatable"
    )
    which.add_argument("--study", type=parse_uid, metavar="UID")
    which.add_argument("--all-failed", action="store_true")

    purge = command(
        "purge",
        cmd_purge,
        "remove finished studies (DONE, SKIPPED, CANCELLED, FAILED) and their files",
    )
    purge.add_argument(
        "--older-than",
        type=parse_days,
        metavar="DAYS",
        help="finished more than DAYS ago (default: [store] retention_days)",
    )
    purge.add_argument("--dry-run", action="store_true", help="only say what would go")

    db = command("db", lambda ctx: EXIT_USAGE, "the store's schema (Alembic)")
    db_commands = db.add_subparsers(
        dest="db_command",
        required=True,
        parser_class=_Parser,
        metavar="{upgrade,current,downgrade}",
    )
    db_commands.add_parser(
        "upgrade", help="migrate to the newest schema", parents=[common]
    ).set_defaults(func=cmd_db_upgrade)
    db_commands.add_parser(
        "current", help="show the schema revision (exit 1 when behind)", parents=[common]
    ).set_defaults(func=cmd_db_current)
    downgrade = db_commands.add_parser(
        "downgrade",
        help="take the schema back to REVISION, before installing an older msk-triage",
        parents=[common],
    )
    downgrade.add_argument("revision", help="a migration this msk-triage knows (`db current`)")
    downgrade.add_argument(
        "--force",
        action="store_true",
        help="even if workers' heartbeats look alive (workers killed without stopping)",
    )
    downgrade.set_defaults(func=cmd_db_downgrade)

    echo_cmd = command("echo", cmd_echo, "C-ECHO a DICOM peer (check routing)")
    echo_cmd.add_argument("target", help="AE@host:port, or the name of a [[destinations]] entry")
    echo_cmd.add_argument(
        "--calling-ae", type=parse_ae_title, help="our AE title (default: [dicom] ae_title)"
    )
    echo_cmd.add_argument(
        "--timeout", type=parse_timeout, default=10.0, help="seconds (default 10)"
    )
    return parser


def _fail(code: int, message: str, as_json: bool, reported: bool = False) -> int:
    if as_json and not reported:
        print(json.dumps({"schema": SCHEMA, "error": message, "exit_code": code}))
    print(f"triage-admin: {message}", file=sys.stderr)
    return code


def _reader_gone() -> int:
    """Exit status 1 for output whose reader closed the pipe, as rich does for a table: the
    rest of the output (and the flush at exit, which would print a traceback of its own)
    goes to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `triage-admin` command."""
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except AdminError as exc:
        return _fail(exc.code, exc.message, as_json)
    as_json = bool(getattr(args, "json", False))
    path = getattr(args, "config", None)
    if path is None:  # --config "" is an error (load_config); TRIAGE_CONFIG empty is unset
        path = os.environ.get("TRIAGE_CONFIG") or None
    try:
        # Operators may not read the daemon's TLS key: `echo` loads a destination's TLS
        # files itself, with its own one-line error.
        config = load_config(path, base_dir=getattr(args, "workdir", None), load_tls=False)
    except ConfigError as exc:
        return _fail(EXIT_USAGE, str(exc), as_json)
    ctx = Context(config=config, args=args, json=as_json)
    # pynetdicom logs a refused association itself; the one-line error says it already.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        return int(args.func(ctx))
    except AdminError as exc:
        return _fail(exc.code, exc.message, as_json, exc.reported)
    except KeyboardInterrupt:
        return _fail(EXIT_FAILED, "interrupted", as_json)
    except BrokenPipeError:
        # The reader stopped early (`| head`): nothing is wrong that a line could tell it.
        return _reader_gone()
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return _fail(EXIT_STORE, f"store unreachable: {_first_line(exc)}", as_json)
        if isinstance(exc, DBAPIError):
            return _fail(EXIT_FAILED, f"store error: {_first_line(exc)}", as_json)
        raise
    finally:
        if ctx._store is not None:
            ctx._store.engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
