"""The spool: durable writes, staged files and the clean-up of temp files at start."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from triage.scoring.outputs import StagedOutput, commit_outputs
from triage.store.spool import Spool, SpoolError
from triage.store.work_queue import OutputFile


def test_prepare_can_spare_the_temp_files_of_a_running_daemon(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    old = spool.temp_dir / "left-by-a-crash.part"
    old.write_bytes(b"partial")
    an_hour_ago = time.time() - 3601
    os.utime(old, (an_hour_ago, an_hour_ago))
    in_flight = spool.temp_dir / "being-written.part"
    in_flight.write_bytes(b"partial")

    assert spool.prepare(older_than_s=3600) == 1
    assert not old.exists() and in_flight.exists()
    assert spool.prepare() == 1
    assert not in_flight.exists()


def test_a_staged_file_is_invisible_until_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    staged = spool.stage([b"DICM", memoryview(b" data")])
    assert staged.parent == spool.temp_dir
    assert not spool.path("outbox/1.2/3.4.dcm").exists()
    assert spool.commit(staged, "outbox/1.2/3.4.dcm") == 9
    assert spool.path("outbox/1.2/3.4.dcm").read_bytes() == b"DICM data"
    assert not staged.exists()
    # A rebuild replaces what an earlier attempt committed under the same name.
    assert spool.write("outbox/1.2/3.4.dcm", [b"rebuilt"]) == 7
    assert spool.path("outbox/1.2/3.4.dcm").read_bytes() == b"rebuilt"
    assert list(spool.temp_dir.iterdir()) == []


def test_a_failed_commit_removes_the_staged_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    spool.path("outbox").write_bytes(b"a file where the outbox folder should be")
    staged = spool.stage([b"x"])
    with pytest.raises(SpoolError):
        spool.commit(staged, "outbox/1.2/3.4.dcm")
    assert list(spool.temp_dir.iterdir()) == []
    spool.discard(staged)  # gone already: no error


def test_outputs_staged_by_a_pool_process_are_committed_or_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()

    def staged(name: str) -> StagedOutput:
        path = f"outbox/1.2/{name}.dcm"
        file = OutputFile("sc", "1.2.840.10008.5.1.4.1.1.7", name, "1.9", None, path, 1)
        return StagedOutput(file, str(spool.stage([b"x"])))

    good = [staged("1.3"), staged("1.4")]
    committed = commit_outputs(spool, good)
    assert [f.path for f in committed] == ["outbox/1.2/1.3.dcm", "outbox/1.2/1.4.dcm"]
    spool.path("outbox/1.2/1.6.dcm").mkdir()  # a name that cannot be replaced by a file
    failing = [staged("1.5"), staged("1.6"), staged("1.7")]
    with pytest.raises(SpoolError):
        commit_outputs(spool, failing)
    assert spool.path("outbox/1.2/1.5.dcm").exists()
    assert not spool.path("outbox/1.2/1.7.dcm").exists()
    assert list(spool.temp_dir.iterdir()) == []  # nothing left behind


def _stage_then_die(root: str, prefix: str) -> None:
    Spool(root).stage([b"half of an overlay"], prefix=prefix)
    os._exit(1)  # as a pool process killed mid-study: nothing runs its clean-up


def test_what_a_dead_process_staged_is_removed_by_its_prefix(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    kept = spool.stage([b"another study's overlay"], prefix="bbbb-")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool, pytest.raises(BrokenProcessPool):
        pool.submit(_stage_then_die, str(tmp_path), "aaaa-").result()
    assert len(list(spool.temp_dir.glob("aaaa-*.part"))) == 1
    assert spool.discard_staged("aaaa-") == 1
    assert list(spool.temp_dir.iterdir()) == [kept]
    for bad in ("", "../x", "a*"):
        with pytest.raises(ValueError):
            spool.discard_staged(bad)
    with pytest.raises(ValueError):
        spool.stage([b"x"], prefix="../escape-")


def test_an_adopted_name_whose_folder_cannot_be_synced_is_not_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link is made, the folder's fsync fails (EIO): the C-STORE is refused (0xA700),
    and the name goes too, or the spool recovery would record what the PACS was told was
    not stored."""
    import errno

    from triage.store import spool as spool_module

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    first, second = spool.temp_dir / "a.part", spool.temp_dir / "b.part"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    spool.adopt(first, "1.2.3/1.2.3.1.dcm")  # the study folder exists from here on

    def failing_sync(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(spool_module, "_fsync_dir", failing_sync)
    with pytest.raises(SpoolError):
        spool.adopt(second, "1.2.3/1.2.3.2.dcm")
    assert not spool.holds("1.2.3/1.2.3.2.dcm")
    # A name another attempt linked (kept as the earlier copy) is not removed.
    with pytest.raises(SpoolError):
        spool.adopt(second, "1.2.3/1.2.3.1.dcm")
    assert (spool.root / "1.2.3/1.2.3.1.dcm").read_bytes() == b"first"


@pytest.mark.parametrize("lost", ["the old copy's removal", "the move's row"])
def test_a_moved_instances_old_copy_left_by_a_crash_is_removed_at_start(
    tmp_path: Path, lost: str
) -> None:
    """The listener commits an instance's move out of a cancelled study, then removes its copy
    there. A crash in between left that copy, which the start's spool recovery took for a
    lost row: a duplicate, counted as left and kept for good (the purge removes only files a
    row names), patient data past its retention. A power loss that took the move's row (the
    SQLite listener's commits do not wait for the disk) is still recovered: the move again."""
    import pydicom

    from triage.dicom.sop import DEFAULT_STORAGE_CLASSES
    from triage.dicom.spool_recovery import record_orphans
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.operations import cancel
    from triage.store.repository import InstanceMeta, Store
    from triage.testing.synth import make_study, write_study

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_schema(engine)
    store = Store(engine)
    [written] = write_study(make_study(views=1, rows=64, cols=64), tmp_path / "in")
    view = pydicom.dcmread(written)
    sop = str(view.SOPInstanceUID)
    mixed, corrected = str(view.StudyInstanceUID), pydicom.uid.generate_uid()

    def receive(study_uid: str, record: bool = True) -> str:
        view.StudyInstanceUID = study_uid
        relative = spool.relative_path(study_uid, sop)
        spool.path(relative).parent.mkdir(parents=True, exist_ok=True)
        view.save_as(spool.path(relative))
        if record:
            store.record_instance(
                InstanceMeta(
                    study_uid, str(view.SeriesInstanceUID), sop, str(view.SOPClassUID),
                    str(view.file_meta.TransferSyntaxUID), "DX", relative,
                    spool.path(relative).stat().st_size,
                ),
                None,
            )  # fmt: skip
        return relative

    old = receive(mixed)
    cancel(store, mixed, "two patients")
    moved = receive(corrected, record=lost == "the old copy's removal")

    report = record_orphans(store, spool, frozenset(DEFAULT_STORAGE_CLASSES))

    assert [i.path for i in store.study_instances(corrected)] == [moved]
    assert store.study_instances(mixed) == []
    assert not spool.holds(old) and spool.holds(moved)
    if lost == "the old copy's removal":
        assert (report.recorded, report.unreadable, report.removed) == (0, 0, 1)
    else:
        assert (report.recorded, report.unreadable, report.removed) == (1, 0, 0)
    engine.dispose()


@pytest.mark.parametrize("how", ["adopt", "commit"])
def test_a_study_folder_removed_just_before_the_link_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """remove() takes a study folder away once it is empty: another association's duplicate
    removal could do so between this one's check that the folder is there and its link, and
    the C-STORE was answered 0xA700 for nothing."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    temp = spool.temp_dir / "received.dcm"
    temp.write_bytes(b"data")
    relative = spool.relative_path("1.2.3", "1.2.3.4")
    real = Spool._make_folders
    raced: list[Path] = []

    def racing(self: Spool, folder: Path) -> None:
        real(self, folder)
        if folder.name == "1.2.3" and not raced:
            raced.append(folder)
            folder.rmdir()  # the other association's remove()

    monkeypatch.setattr(Spool, "_make_folders", racing)
    assert getattr(spool, how)(temp, relative) == 4
    assert raced and spool.path(relative).read_bytes() == b"data"
