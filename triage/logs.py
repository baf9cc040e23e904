"""Structured logging: JSON lines for machines, readable lines on a terminal, never PHI.

Events about a study carry ``study_uid``. Patient identity never reaches a log line: the code
does not log datasets, and :func:`drop_phi` removes any field that looks like patient identity
as a second line of defence (e.g. a future ``log.info(..., patient_name=...)`` by mistake).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import structlog

#: Field names (lower-cased, underscores removed) that must never be logged.
_PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientbirthdate",
        "patientsname",
        "patientsbirthdate",
        "otherpatientids",
        "otherpatientnames",
        "patientaddress",
        "accessionnumber",
        "issuerofpatientid",
    }
)


def drop_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: drop patient-identity fields and never render a whole dataset."""
    for key in list(event_dict):
        if key.replace("_", "").lower() in _PHI_KEYS:
            event_dict[key] = "[redacted]"
            continue
        value = event_dict[key]
        if type(value).__name__ in {"Dataset", "FileDataset"}:
            event_dict[key] = "[dataset]"
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]


#: A quoted value in an exception's message ('…' or "…").
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def error_text(exc: BaseException) -> str:
    """An exception as ``Type: message`` for logs and stored reasons, quoted values withheld.

    Library errors quote the value they could not parse: pydicom's ``Unable to convert
    '1938-05-17' to 'DA' object`` is a birth date. A reason is logged, stored, and printed by
    `triage-admin`, so no quoted text goes into one.
    """
    return f"{type(exc).__name__}: {_QUOTED.sub('…', str(exc))}"


def _show_warning_without_its_text(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` that logs a warning's category and origin, never its text.

    Library warnings quote the values they complain about: highdicom warns with the whole
    PatientName when it has no ``^``, pydicom with the invalid date. Shown as Python shows
    them, they reached the journal verbatim, and not as JSON.
    """
    origin = "/".join(Path(filename).parts[-2:])
    logging.getLogger("py.warnings").warning(
        "%s at %s:%d (text withheld: it may quote patient data)",
        category.__name__,
        origin,
        lineno,
    )


def hide_warning_texts() -> None:
    """Route Python warnings of this process to the log without their text (see above).

    Called by :func:`configure_logging`, and by pool processes that build outputs.
    """
    warnings.showwarning = _show_warning_without_its_text


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Route structlog and the standard library (pynetdicom, APScheduler, Alembic) to *stream*.

    *fmt* ``auto`` writes JSON lines unless the stream is a terminal.
    """
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs PDUs and, at debug level, whole datasets (PHI): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # APScheduler warns about every late or coalesced run; our jobs log their own failures.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    hide_warning_texts()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger for one component (``triage.listener`` …)."""
    return structlog.get_logger(name)
