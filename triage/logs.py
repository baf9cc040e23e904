"""Structured logging: JSON lines for machines, readable lines on a terminal, never PHI.

Events about a study carry ``study_uid``. Patient identity never reaches a log line: the code
does not log datasets, and :func:`drop_phi` removes any field that looks like patient identity
as a second line of defence (e.g. a future ``log.info(..., patient_name=...)`` by mistake).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
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


#: A quoted value in an exception's message: quotes not inside a word (so "can't" is none).
_QUOTED = re.compile(r"(?<!\w)(['\"])([^'\"\n]*)\1(?!\w)")
#: What a withheld value becomes: ASCII, as a reason may end up in an SR (a non-ASCII one
#: would make it UTF-8 for nothing).
_WITHHELD = "..."
#: A UID (at least two components: a bare number may be a patient ID or a date).
_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
#: Identity attributes whose values a failure reason must never carry.
_IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "PatientAddress",
    "PatientMotherBirthName",
)


def identity_values(datasets: Iterable[Any]) -> set[str]:
    """The patient-identity values of *datasets* (and a name's components), to withhold."""
    values: set[str] = set()
    for dataset in datasets:
        for keyword in _IDENTITY_KEYWORDS:
            value = dataset.get(keyword)
            for item in value if isinstance(value, list | tuple) or _multi(value) else [value]:
                text = str(item or "").strip()
                if len(text) >= 2:
                    values.add(text)
                    values.update(part for part in re.split(r"[\^=]", text) if len(part) >= 2)
    return values


def _multi(value: Any) -> bool:
    return type(value).__name__ == "MultiValue"


@functools.cache
def _dictionary_words() -> frozenset[str]:
    """DICOM keywords, element names and VRs, and the names of UIDs pydicom knows."""
    from pydicom.datadict import DicomDictionary
    from pydicom.uid import UID_dictionary
    from pydicom.valuerep import VR

    words = set(VR.__members__)
    words |= {entry[2] for entry in DicomDictionary.values()}
    words |= {entry[4] for entry in DicomDictionary.values()}
    words |= {entry[0] for entry in UID_dictionary.values()}
    return frozenset(words)


def _harmless(quoted: str) -> bool:
    """A quoted word that says what failed rather than whose data: a DICOM keyword, element
    name or VR, a UID, a transfer syntax's or SOP class's name, a path."""
    return quoted in _dictionary_words() or bool(_UID.fullmatch(quoted)) or quoted.startswith("/")


def error_text(exc: BaseException, withheld: Iterable[str] = ()) -> str:
    """An exception as ``Type: message`` for logs and stored reasons, identity withheld.

    Library errors quote the value they could not parse: pydicom's ``Unable to convert
    '1938-05-17' to 'DA' object`` is a birth date. A reason is logged, stored and printed by
    `triage-admin`: the *withheld* values (see :func:`identity_values`) become "..." wherever
    they appear, and so does any other quoted text that is not a keyword, VR, UID, UID name
    or path, so that the reason still says what failed.
    """
    return f"{type(exc).__name__}: {withheld_text(str(exc), withheld)}"


def withheld_text(text: str, withheld: Iterable[str] = ()) -> str:
    """*text* (an error message, a peer's ErrorComment) with identity withheld, as
    :func:`error_text` does it."""
    text = without_identity(text, withheld)

    def quoted(match: re.Match[str]) -> str:
        return match.group(0) if _harmless(match.group(2)) else _WITHHELD

    return _QUOTED.sub(quoted, text)


def without_identity(text: str, withheld: Iterable[str]) -> str:
    """*text* with each of the *withheld* values (see :func:`identity_values`) made "...",
    wherever it stands as a whole word, in any case and re-encoded (see :func:`_as_quoted`);
    other text, quoted or not, is kept (a reason that quotes a series description still says
    what it named)."""
    for value in sorted(set(withheld), key=len, reverse=True):
        # As a whole word: a two-letter name part must not eat the middle of other words.
        text = re.sub(rf"(?<!\w){_as_quoted(value)}(?!\w)", _WITHHELD, text, flags=re.IGNORECASE)
    return text


def _as_quoted(value: str) -> str:
    """A pattern for *value* as others may quote it: a PACS's ErrorComment is ASCII, so its
    "Müller" comes back as "M?ller", "MÃ¼ller" (UTF-8 read as Latin-1), "Muller" or
    "MUELLER". Each non-ASCII character matches up to three other characters, when enough
    of the value is ASCII that the pattern still names it."""
    if value.isascii() or sum(ch.isascii() and ch.isalnum() for ch in value) < 2:
        return re.escape(value)
    return "".join(re.escape(ch) if ch.isascii() else r"[^\s^=]{0,3}" for ch in value)


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


#: Libraries that log the values they read or check: pydicom's "Invalid value for VR DA:
#: '19380517'" (a birth date), and with its debug switch whole data sets.
_VALUE_QUOTING_LOGGERS = frozenset({"pydicom", "highdicom"})


class WithholdLibraryText(logging.Filter):
    """A handler filter: records of the value-quoting libraries keep their level, logger and
    origin but not their text, as :func:`hide_warning_texts` does for warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _VALUE_QUOTING_LOGGERS:
            origin = "/".join(Path(record.pathname).parts[-2:])
            record.msg = "%s message at %s:%d (text withheld: it may quote patient data)"
            record.args = (record.name, origin, record.lineno)
            record.exc_info = record.exc_text = None
        return True


class ConnectFailuresAtDebug(logging.Filter):
    """A filter for ``pynetdicom.transport``: its ERROR lines for each connection our
    requests could not make go down to DEBUG.

    A destination down for three minutes gave hundreds of ERROR lines (two per attempt of
    every delivery), paging whoever alerts on errors for an outage the sender retries and
    reports itself (``delivery_failed``, and the delivery's error in `triage-admin`). A TLS
    failure (a PACS certificate we do not trust, one that wants ours) added a third: the
    SSLError itself with a Python traceback, at every attempt. It keeps no traceback: the
    line before says the same, and the sender says what it means.
    """

    _PREFIXES = ("Association request failed: unable to connect", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        # pynetdicom's LOGGER.exception(exc) after a failed TLS connect: the message is the
        # exception itself.
        raised = isinstance(record.msg, BaseException)
        if record.levelno < logging.ERROR or not (
            raised or str(record.msg).startswith(self._PREFIXES)
        ):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if raised:
            record.exc_info = record.exc_text = None
        return True


def withhold_in_exception(_logger: Any, _name: str, event_dict: Any) -> Any:
    """structlog processor, after ``format_exc_info``: a logged traceback's messages with
    quoted values withheld (see :func:`withheld_text`), its file and source lines kept.

    ``log.exception`` put the message of whatever raised in the log as it was: a pydicom
    error quotes the value it could not parse, which may be a name or a birth date.
    """
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = "\n".join(
            line if line.startswith(("  File ", "    ")) else withheld_text(line)
            for line in text.split("\n")
        )
    return event_dict


def _log_uncaught_thread_exception(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: an exception that ends a thread goes to the log (its messages
    withheld like any other), not printed raw to stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    get_logger("triage.thread").error(
        "thread_died",
        thread=name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


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
            withhold_in_exception,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(WithholdLibraryText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs PDUs and, at debug level, whole datasets (PHI): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    transport = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, ConnectFailuresAtDebug) for f in transport.filters):
        transport.addFilter(ConnectFailuresAtDebug())
    # APScheduler warns about every late or coalesced run; our jobs log their own failures.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    hide_warning_texts()
    threading.excepthook = _log_uncaught_thread_exception
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger for one component (``triage.listener`` …)."""
    return structlog.get_logger(name)


class RepeatedFailure:
    """The log of one loop that fails the same way round after round (the store down, a
    peer unreachable): the first failure is logged (with its traceback when *traceback*),
    then one line per *every_s* while it goes on, saying how many rounds failed since the
    last line, and one line (*recovered_event*) when a round succeeds again. A ten-minute
    store outage was otherwise a line every 0.25–1 s from each loop, the sender's with a
    whole traceback each time.

    One instance per loop (it is not locked): call :meth:`failed` from the loop's error
    handler and :meth:`succeeded` after each round that went through.
    """

    def __init__(
        self,
        logger: Any,
        event: str,
        recovered_event: str,
        *,
        every_s: float = 60.0,
        traceback: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        self._log = logger.bind(**fields) if fields else logger
        self._event = event
        self._recovered_event = recovered_event
        self._every_s = every_s
        self._traceback = traceback
        self._clock = clock
        self._since: float | None = None  # when the failures began
        self._logged_at = 0.0
        self._unlogged = 0

    def failed(self, error: str, **fields: Any) -> None:
        """A round failed with *error* (a one-line text without patient identity)."""
        now = self._clock()
        if self._since is None:
            self._since = self._logged_at = now
            self._log.error(self._event, error=error, exc_info=self._traceback, **fields)
            return
        self._unlogged += 1
        if now - self._logged_at >= self._every_s:
            self._log.error(
                self._event,
                error=error,
                failed_rounds=self._unlogged,
                failing_for_s=round(now - self._since, 1),
                **fields,
            )
            self._logged_at, self._unlogged = now, 0

    def succeeded(self) -> None:
        """A round went through: after failures, say so once."""
        if self._since is None:
            return
        self._log.info(self._recovered_event, failed_for_s=round(self._clock() - self._since, 1))
        self._since, self._unlogged = None, 0
