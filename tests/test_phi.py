"""No patient identity in logs or operator output.

A study with a known PatientName, PatientID, PatientBirthDate (and AccessionNumber) goes all the
way through a scoring daemon at debug log level (DCMTK storescu in, scoring, SR and overlays to
storescp). None of them may appear in any log line of the daemon or its listener process, in the
HTTP endpoints, or in `triage-admin` output, unless the operator asks with ``--show-patient``.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.peers import Storescp, storescu
from tests.test_end_to_end import scoring_config, wait_state
from tests.test_http import http_port
from triage.cli.admin import main as admin
from triage.store.models import StudyState
from triage.testing.synth import make_study, write_study

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

NAME = "Wimbleworth^Ottoline^Q"
PATIENT_ID = "MRN-55501234"
BIRTH_DATE = "19380517"
ACCESSION = "ACC-7312298"
#: A name without "^", as legacy modalities and HL7 mappings write them: highdicom warns
#: about it, quoting it whole.
FLAT_NAME = "QUILLBERRY MARGOT"
#: Every piece of identity that must stay out (the names' parts too).
SECRETS = ("Wimbleworth", "Ottoline", "QUILLBERRY", "MARGOT", PATIENT_ID, BIRTH_DATE, ACCESSION)


def _assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} found in {where}"


def test_no_patient_identity_in_logs_http_or_admin_output(
    daemon_factory, tmp_path, capsys, monkeypatch
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    config = scoring_config(pacs.destination(), log={"level": "debug"})
    daemon = daemon_factory(config).start()
    datasets = make_study(
        body_part="WRIST",
        views=2,
        rows=320,
        cols=256,
        seed=31,
        patient_name=NAME,
        patient_id=PATIENT_ID,
        patient_birth_date=BIRTH_DATE,
        accession_number=ACCESSION,
    )
    files = write_study(datasets, tmp_path / "in")
    study_uid = str(datasets[0].StudyInstanceUID)
    flat = make_study(body_part="HAND", views=1, rows=256, cols=256, seed=32)
    for ds in flat:
        ds.PatientName, ds.PatientID = FLAT_NAME, PATIENT_ID
    files += write_study(flat, tmp_path / "flat")
    assert storescu(daemon.port, files).acknowledged == 3
    wait_state(daemon, study_uid, StudyState.DONE)
    wait_state(daemon, str(flat[0].StudyInstanceUID), StudyState.DONE)
    # The results did reach the PACS, with the patient module copied as DICOM requires.
    assert {str(ds.PatientID) for ds in pacs.received()} == {PATIENT_ID}
    for path in ("/metrics", "/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port(daemon)}{path}") as response:
            _assert_clean(response.read().decode(), path)

    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    base = ["--config", str(daemon.config_path)]
    outputs = {}
    for args in (["status"], ["studies"], ["worklist"], ["study", study_uid]):
        for form in ([], ["--json"]):
            capsys.readouterr()
            assert admin([*base, *args, *form]) == 0
            out, err = capsys.readouterr()
            outputs[" ".join(args + form)] = out + err
    for where, text in outputs.items():
        _assert_clean(text, f"triage-admin {where}")
    assert study_uid in outputs["study " + study_uid]

    # Only the explicit flag shows it, read from the spooled files.
    capsys.readouterr()
    assert admin([*base, "study", study_uid, "--show-patient", "--json"]) == 0
    patient = json.loads(capsys.readouterr().out)["patient"]
    assert (patient["name"], patient["id"], patient["birth_date"]) == (
        NAME,
        PATIENT_ID,
        BIRTH_DATE,
    )
    assert admin([*base, "study", study_uid, "--show-patient"]) == 0
    shown = capsys.readouterr().out
    assert NAME in shown and PATIENT_ID in shown and BIRTH_DATE in shown

    assert daemon.stop() == 0
    pacs.stop()
    log = daemon.log_text()
    lines = log.splitlines()
    assert len(lines) > 30, "the debug log is suspiciously short"
    assert '"event": "study_scored"' in log and '"event": "study_done"' in log
    assert '"event": "instance_stored"' in log  # debug lines from the listener process too
    for number, line in enumerate(lines, 1):
        _assert_clean(line, f"log line {number}")


def test_library_warnings_and_errors_reach_the_log_without_the_values_they_quote(
    tmp_path,
) -> None:
    """highdicom warns with the whole PatientName, pydicom raises with the unparsable birth
    date: in a process whose logging is configured (the daemon, the listener) and in the
    worker's pool processes, where outputs are built, only the warning's kind is logged."""
    import subprocess
    import sys

    script = """
import io, sys, warnings
from highdicom.valuerep import check_person_name
if sys.argv[1] == "daemon":
    from triage.logs import configure_logging
    configure_logging("info", "json")
else:
    from triage.scoring.worker import _init_decode_process
    _init_decode_process()
warnings.simplefilter("always")
check_person_name("QUILLBERRY MARGOT")
from pydicom import config
from pydicom.valuerep import validate_value
validate_value("DA", "1938-05-17", config.WARN)  # logged by pydicom's logger, and warned
import logging
logging.getLogger("highdicom.sr").warning("name %s", "QUILLBERRY MARGOT")
"""
    for process in ("daemon", "pool"):
        run = subprocess.run(
            [sys.executable, "-c", script, process], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        _assert_clean(run.stdout + run.stderr, f"the {process} process's output")
        assert "UserWarning at" in run.stderr and "text withheld" in run.stderr
        assert "1938" not in run.stderr
        assert "pydicom message at pydicom/" in run.stderr
        assert "highdicom.sr message at" in run.stderr

    from pydicom import Dataset

    from triage.logs import error_text, identity_values

    reason = error_text(ValueError("Unable to convert '19380517' to 'DA' object"))
    _assert_clean(reason, "a stored failure reason")
    assert reason == "ValueError: Unable to convert ... to 'DA' object"
    header = Dataset()
    header.PatientName, header.PatientID = NAME, PATIENT_ID
    header.PatientBirthDate, header.AccessionNumber = BIRTH_DATE, ACCESSION
    unquoted = ValueError(f"no view of Wimbleworth in {ACCESSION} for {PATIENT_ID}")
    _assert_clean(error_text(unquoted, identity_values([header])), "a reason naming them")
    # What failed stays readable: keywords, element and UID names, UIDs, paths, "can't".
    for kept in (
        "KeyError: 'PixelData'",
        "ValueError: The dataset's 'BitsStored' value can't be 0",
        "ValueError: a (0002,0010) 'Transfer Syntax UID' value of 'MPEG2 Main Profile / Main"
        " Level' is not supported",
        "ValueError: no such file '/var/lib/msk-triage/var/spool/1.2.3/4.5.6.dcm'",
        "ValueError: SOP class '1.2.840.10008.5.1.4.1.1.1' not stored",
    ):
        kind, message = kept.split(": ", 1)
        assert (
            error_text(ValueError(message) if kind == "ValueError" else KeyError("PixelData"))
            == kept
        )


def test_a_name_a_peer_quotes_re_encoded_or_in_another_case_is_withheld() -> None:
    """A PACS's ErrorComment is ASCII: it quotes "Müller^Jürgen" as "M?ller^J?rgen", as UTF-8
    read as Latin-1, transliterated, or upper-cased as its database holds names."""
    from pydicom import Dataset

    from triage.logs import identity_values, withheld_text

    header = Dataset()
    header.PatientName, header.PatientID = "Müller^Jürgen", "mrn-55501234"
    withheld = identity_values([header])
    for quoted in ("M?ller^J?rgen", "MÃ¼ller^JÃ¼rgen", "Muller^Jurgen", "MUELLER^JUERGEN"):
        text = withheld_text(f"patient {quoted} exists with another birth date", withheld)
        assert text == "patient ... exists with another birth date", quoted
    assert withheld_text("MRN-55501234, müller", withheld) == "..., ..."
    # Other words stay, even those a name part begins.
    assert withheld_text("Jürgens jpeg", withheld) == "Jürgens jpeg"


def test_a_logged_traceback_and_a_thread_s_death_keep_their_lines_not_quoted_values() -> None:
    """``log.exception`` wrote the message of whatever raised as it was, and an exception
    that ended a thread was printed raw to stderr: a pydicom error quotes the value it could
    not parse. Both now reach the log with quoted values withheld, file lines kept."""
    import subprocess
    import sys

    script = """
import threading
from triage.logs import configure_logging, get_logger
configure_logging("info", "json")
try:
    raise ValueError("Unable to convert '19380517' to 'DA' object")
except ValueError:
    get_logger("triage.test").exception("convert_failed")
def die():
    raise KeyError("QUILLBERRY MARGOT")
thread = threading.Thread(target=die, name="doomed")
thread.start()
thread.join()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    _assert_clean(run.stdout + run.stderr, "the logged tracebacks")
    assert "Exception in thread" not in run.stderr
    convert, died = (json.loads(line) for line in run.stderr.splitlines())
    assert convert["event"] == "convert_failed"
    assert 'File "<string>", line 6, in <module>' in convert["exception"]
    assert convert["exception"].endswith("ValueError: Unable to convert ... to 'DA' object")
    assert (died["event"], died["thread"]) == ("thread_died", "doomed")
    assert died["exception"].endswith("KeyError: ...")
