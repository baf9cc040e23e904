"""Benchmark and test studies recorded as received: files already in a spool, recorded in the
store as the listener records the instances it stores (not yet queued)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.engine import Engine

from triage.config import Config, load_config
from triage.dicom.sop import DX_FOR_PRESENTATION
from triage.store.db import make_engine, upgrade_schema
from triage.store.repository import InstanceMeta, Store
from triage.store.spool import Spool


def record_received(store: Store, spool_dir: Path, files: Iterable[Path]) -> None:
    """Record each of *files* (``<spool_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, as
    :func:`~triage.testing.synth.write_benchmark_files` writes them) as a received DX
    instance, with no association."""
    for path in files:
        relative = path.relative_to(spool_dir)
        store.record_instance(
            InstanceMeta(
                relative.parent.name,
                "1.2.3",
                relative.stem,
                DX_FOR_PRESENTATION,
                str(ExplicitVRLittleEndian),
                "DX",
                str(relative),
                path.stat().st_size,
            ),
            None,
        )


def received_store(url: str, spool_dir: Path, files: Iterable[Path]) -> tuple[Engine, Store, Spool]:
    """A store at *url* (schema made) and the spool at *spool_dir* (prepared), with *files*
    recorded as received (:func:`record_received`); dispose of the engine when done."""
    engine = make_engine(url)
    upgrade_schema(engine)
    store = Store(engine)
    spool = Spool(spool_dir)
    spool.prepare()
    record_received(store, spool_dir, files)
    return engine, store, spool


def local_worker_config(
    work: Path, *, model: dict[str, Any], worker: dict[str, Any], overlays: bool = False
) -> Config:
    """The daemon's defaults with an SQLite store and a spool in *work*, no free-space floor,
    no HTTP endpoint, the demo model allowed, and these ``[model]`` and ``[worker]`` values."""
    base = load_config(None, env={}, base_dir=work)
    return dataclasses.replace(
        base,
        store=dataclasses.replace(
            base.store,
            url=f"sqlite:///{work / 'triage.db'}",
            spool_dir=str(work / "spool"),
            min_free_mb=0,
        ),
        model=dataclasses.replace(base.model, allow_unvalidated=True, **model),
        worker=dataclasses.replace(base.worker, **worker),
        outputs=dataclasses.replace(base.outputs, overlays=overlays),
        # Nothing scrapes it, and several workers would share one port.
        http=dataclasses.replace(base.http, enabled=False),
    )
