"""The spool: received files, written atomically and durably before they are acknowledged."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from triage.store import direct_io
from triage.uids import is_valid_uid


class SpoolError(OSError):
    """A file could not be written to the spool."""


class Spool:
    """Files under one root: ``<study UID>/<SOP instance UID>.dcm``, temp files in ``tmp/``."""

    def __init__(self, root: str | os.PathLike[str], min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self._tmp = self.root / "tmp"

    def prepare(self, older_than_s: float = 0.0) -> int:
        """Create the folders and remove temp files a crash left behind; returns how many.

        With *older_than_s*, only temp files not modified for that long go: a process that
        shares the spool with a running daemon (``triage worker`` on the same host) must not
        remove the files the daemon is writing.
        """
        self._tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        cutoff = time.time() - older_than_s
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if older_than_s and leftover.stat().st_mtime > cutoff:
                    continue
                leftover.unlink()
                removed += 1
        return removed

    def is_prepared(self) -> bool:
        """Whether this root is a spool :meth:`prepare` made (its ``tmp/`` is there): a root
        resolved from another working directory is not, and nothing may be removed as if
        its files were gone."""
        return self._tmp.is_dir()

    def unwritable(self) -> list[str]:
        """The folders new files go to (the root, ``tmp/``, ``outbox/``) that this process
        cannot write to now (a read-only remount, changed permissions), by name."""
        folders = {"spool": self.root, "tmp": self._tmp, "outbox": self.root / "outbox"}
        return [
            name
            for name, folder in folders.items()
            if folder.is_dir() and not os.access(folder, os.W_OK)
        ]

    def free_bytes(self) -> int:
        """Free space available to this process on the spool's filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_room(self) -> bool:
        """False while free space is under the configured floor."""
        return self.free_bytes() >= self.min_free_bytes

    @staticmethod
    def relative_path(study_uid: str, sop_instance_uid: str) -> str:
        """Where an instance lives, relative to the root. Only valid UIDs ever become paths."""
        if not (is_valid_uid(study_uid) and is_valid_uid(sop_instance_uid)):
            raise ValueError("refusing to build a spool path from an invalid UID")
        return f"{study_uid}/{sop_instance_uid}.dcm"

    def path(self, relative: str) -> Path:
        """The absolute path of a spooled file."""
        return self.root / relative

    def write(
        self, relative: str, chunks: Iterable[bytes | memoryview], *, direct: bool = False
    ) -> int:
        """Write *chunks* to *relative* atomically and durably; returns the size in bytes.

        Temp file, fsync, rename over the final name, fsync of the folder (and of the root
        when the study folder is new): once this returns, the file survives a crash or a
        power cut, and a reader never sees a partial file. *direct*: see :meth:`stage`.
        """
        return self.commit(self.stage(chunks, direct=direct), relative)

    def stage(
        self, chunks: Iterable[bytes | memoryview], prefix: str = "", *, direct: bool = False
    ) -> Path:
        """Write *chunks* to a new temp file, not yet synced; returns its path.

        *direct* writes around the page cache (:mod:`triage.store.direct_io`), for files
        read once, later, with :func:`~triage.store.direct_io.read_whole`.

        The first half of :meth:`write`, for a process that builds a file while another one
        makes it durable (:meth:`commit`) or drops it (:meth:`discard`). The file name starts
        with *prefix* (letters, digits, ``-``), so that whoever asked for it can remove what a
        process that died before answering staged (:meth:`discard_staged`); a crash of the
        whole daemon leaves it to :meth:`prepare`.
        """
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid temp file prefix {prefix!r}")
        temp = self._tmp / f"{prefix}{uuid.uuid4().hex}.part"
        try:
            direct_io.write_new(temp, chunks, direct=direct)
        except OSError as exc:
            self.discard(temp)
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        return temp

    def commit(self, temp: str | os.PathLike[str], relative: str) -> int:
        """Make a temp file from :meth:`stage` durable as *relative*, replacing what is there;
        returns its size. The temp file is gone afterwards, committed or (on error) removed."""
        final = self.root / relative
        try:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            self._in_study_folder(final, lambda: os.replace(temp, final))
            _fsync_dir(final.parent)
        except OSError as exc:
            self.discard(temp)
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        return size

    @staticmethod
    def discard(temp: str | os.PathLike[str]) -> None:
        """Remove a staged temp file that will not be committed (gone already is fine)."""
        with contextlib.suppress(OSError):
            os.unlink(temp)

    def discard_staged(self, prefix: str, suffix: str = ".part") -> int:
        """Remove every temp file staged with *prefix* (not empty), or received under it
        (*suffix* ``.dcm``: see ``install_spool_temp_files``); returns how many."""
        if not prefix or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid temp file prefix {prefix!r}")
        removed = 0
        for temp in self._tmp.glob(f"{prefix}*{suffix}"):
            self.discard(temp)
            removed += 1
        return removed

    @property
    def temp_dir(self) -> Path:
        """Where files are written before they are adopted (same filesystem as the spool)."""
        return self._tmp

    def adopt(self, temp_path: str | os.PathLike[str], relative: str) -> int:
        """Make a fully written file under :attr:`temp_dir` durable at *relative*; returns size.

        fsync of the file, a hard link to the final name (the caller's temp name stays valid
        for whoever cleans it up), fsync of the folder. If the final name already exists it
        holds the same SOP instance, written and synced by an earlier attempt: it is kept.
        """
        final = self.root / relative
        linked = False
        try:
            fd = os.open(temp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)

            def link() -> None:
                nonlocal linked
                with contextlib.suppress(FileExistsError):
                    os.link(temp_path, final)
                    linked = True

            self._in_study_folder(final, link)
            _fsync_dir(final.parent)
        except OSError as exc:
            if linked:
                # Refused (0xA700): the name must not stay, or the spool recovery would
                # record what the PACS was told was not stored.
                with contextlib.suppress(OSError):
                    final.unlink()
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror}") from exc
        return size

    def _in_study_folder(self, final: Path, place: Callable[[], None]) -> None:
        """Make *final*'s folders, then *place* the file there (link or rename).

        :meth:`remove` takes a study folder away once it is empty: between the check that
        the folder is there and the link, another association's duplicate removal (or a
        purge) could take it, and the C-STORE was answered 0xA700 for nothing. The folder is
        made again then, a few times.
        """
        for attempt in range(3):
            self._make_folders(final.parent)
            try:
                place()
                return
            except FileNotFoundError:
                if attempt == 2 or final.parent.is_dir():
                    raise  # not the folder: the file itself is gone

    def _make_folders(self, folder: Path) -> None:
        """Create *folder* and missing parents under the root, each made durable in its parent."""
        if folder == self.root or folder.is_dir():
            return
        self._make_folders(folder.parent)
        # Made a moment ago by another association, whose fsync of the parent may not be
        # done yet: synced here too before this one's file is acknowledged.
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        _fsync_dir(folder.parent)

    def holds(self, relative: str) -> bool:
        """Whether the spool has a file at *relative*."""
        return (self.root / relative).is_file()

    def remove(self, relative: str) -> None:
        """Delete a spooled file (and its study folder when it becomes empty)."""
        path = self.root / relative
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()


_PREFIX = re.compile(r"[A-Za-z0-9-]*")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
