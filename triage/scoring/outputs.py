"""The objects sent back for a scored study: SR, CAM overlays, parametric maps, in the outbox.

Files go to ``<spool>/outbox/<study UID>/<SOP instance UID>.dcm`` with durable
writes; their SOP Instance UIDs are deterministic, so rebuilding after a crash writes the same
instances again.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread

from triage.config import Config
from triage.dicom.part10 import encode_part10
from triage.dicom.pmap import build_parametric_map, has_one_frame
from triage.dicom.sc import build_cam_overlay
from triage.dicom.sr import build_sr
from triage.logs import get_logger
from triage.scoring.result import ModelInfo, StudyResult
from triage.store.direct_io import read_whole
from triage.store.spool import Spool
from triage.store.work_queue import OutputFile
from triage.uids import derived_uid

log = get_logger(__name__)


def installation_uid(config: Config) -> str:
    """The device UID of this msk-triage installation (the SR's observer)."""
    return derived_uid("msk-triage device", socket.gethostname(), config.dicom.ae_title)


@dataclass(frozen=True)
class ViewPixels:
    """What the outputs of one view need: its header, and its display image (uint8) when
    overlays are drawn (None otherwise)."""

    header: Dataset
    display: np.ndarray | None
    #: The decoded frame's (rows, columns), which the overlay's layout is computed for.
    view_shape: tuple[int, int] | None = None


@dataclass(frozen=True)
class EncodedOutput:
    """An output object encoded as a Part 10 file, not yet written: its bytes and what the
    store records about it once written."""

    file: OutputFile
    data: bytes


def _encode(dataset: Dataset, kind: str, source_uid: str | None) -> EncodedOutput:
    data = encode_part10(dataset)
    study_uid = str(dataset.StudyInstanceUID)
    sop_uid = str(dataset.SOPInstanceUID)
    return EncodedOutput(
        OutputFile(
            kind=kind,
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=sop_uid,
            series_uid=str(dataset.SeriesInstanceUID),
            source_sop_instance_uid=source_uid,
            path=f"outbox/{study_uid}/{sop_uid}.dcm",
            size_bytes=len(data),
        ),
        data,
    )


@dataclass(frozen=True)
class OutputRequest:
    """What building a scored study's outputs takes (picklable, for a pool process)."""

    config: Config
    spool: Spool
    result: StudyResult
    model: ModelInfo
    #: The scored views' headers and display images, by SOP Instance UID.
    views: Mapping[str, ViewPixels]
    #: The outbox path of the previous revision's SR, which the new one names.
    predecessor_path: str | None = None
    #: What the names of files :func:`stage_outputs` writes start with (see Spool.stage).
    stage_prefix: str = ""


def encode_outputs(request: OutputRequest) -> list[EncodedOutput]:
    """Build and encode the SR (always), overlays and parametric maps (as configured).

    Top-level and picklable: the worker runs it in its process pool (building SRs and
    overlays is CPU-bound Python that would hold the worker's GIL) and writes the result
    itself (:func:`write_outputs`), so the fsyncs wait in one of its threads, not in a pool
    process that could be building the next study's outputs.
    """
    config, result, model, views = request.config, request.result, request.model, request.views
    path = request.predecessor_path
    # Outbox files are written around the page cache (write_outputs): read the same way.
    predecessor = dcmread(BytesIO(read_whole(request.spool.path(path)))) if path else None
    headers: Sequence[Dataset] = [views[v.sop_instance_uid].header for v in result.views]
    device_uid = installation_uid(config)
    sr = build_sr(headers, result, model, device_uid=device_uid, predecessor=predecessor)
    outputs = [_encode(sr, "sr", None)]
    for view in result.views:
        pixels = views[view.sop_instance_uid]
        if config.outputs.overlays:
            if pixels.display is None:
                raise ValueError(f"no display image of view {view.sop_instance_uid} to overlay")
            overlay = build_cam_overlay(
                pixels.header,
                pixels.display,
                view,
                result,
                model,
                opacity=config.outputs.opacity,
                max_side=config.outputs.max_side,
                view_shape=pixels.view_shape,
            )
            outputs.append(_encode(overlay, "sc", view.sop_instance_uid))
        if config.outputs.parametric_maps:
            if not has_one_frame(pixels.header):
                # Scored on its first frame (the view's note says so); the SR and the overlay
                # still go, and must not wait on a map that cannot be made.
                log.warning(
                    "parametric_map_not_made",
                    study_uid=result.study_uid,
                    sop_instance_uid=view.sop_instance_uid,
                    reason="multi-frame source",
                )
                continue
            pmap = build_parametric_map(pixels.header, view, result, model, device_uid=device_uid)
            outputs.append(_encode(pmap, "pm", view.sop_instance_uid))
    return outputs


def write_outputs(spool: Spool, encoded: Sequence[EncodedOutput]) -> list[OutputFile]:
    """Write encoded outputs to the outbox, each atomically and durably, around the page
    cache: the sender reads each once (:mod:`triage.store.direct_io`)."""
    for item in encoded:
        spool.write(item.file.path, (item.data,), direct=True)
    return [item.file for item in encoded]  # size_bytes is already len(data)


@dataclass(frozen=True)
class StagedOutput:
    """An output object written to a spool temp file, not yet synced nor in the outbox."""

    file: OutputFile
    temp_path: str


def stage_outputs(request: OutputRequest) -> list[StagedOutput]:
    """:func:`encode_outputs`, each written to a temp file (:meth:`Spool.stage`).

    Top-level and picklable, for the worker's process pool: the process that builds the
    objects writes them too, and the worker gets back their names, not their bytes (a few MB
    per study through a pipe, copied and unpickled under the worker's GIL); the worker's
    thread makes them durable (:func:`commit_outputs`), so no pool process waits on fsync.
    """
    spool = request.spool
    staged: list[StagedOutput] = []
    try:
        for item in encode_outputs(request):
            temp = spool.stage((item.data,), prefix=request.stage_prefix, direct=True)
            staged.append(StagedOutput(item.file, str(temp)))
    except BaseException:
        discard_outputs(spool, staged)
        raise
    return staged


def commit_outputs(spool: Spool, staged: Sequence[StagedOutput]) -> list[OutputFile]:
    """Move staged outputs into the outbox, each durably (fsync, rename, fsync of the folder).

    On an error the staged files not yet committed are removed, and the error raised.
    """
    for index, item in enumerate(staged):
        try:
            spool.commit(item.temp_path, item.file.path)
        except BaseException:
            discard_outputs(spool, staged[index + 1 :])
            raise
    return [item.file for item in staged]


def discard_outputs(spool: Spool, staged: Sequence[StagedOutput]) -> None:
    """Remove staged outputs that will not be committed."""
    for item in staged:
        spool.discard(item.temp_path)


def build_outputs(request: OutputRequest) -> list[OutputFile]:
    """Build and durably write the SR (always), overlays and parametric maps (as configured)."""
    return write_outputs(request.spool, encode_outputs(request))


def warm_up_builders(config: Config, model: ModelInfo) -> None:
    """Build (and discard) an SR and an overlay for a tiny synthetic view.

    The first SR a process builds costs about 1.5 s more than the next ones (highdicom loads
    the standard's IOD tables); a daemon pays that at start, not on its first study.
    """
    from triage.scoring.result import ViewResult
    from triage.study_types import StudyType
    from triage.testing.synth import make_study

    [dataset] = make_study(StudyType.WRIST, views=1, rows=64, cols=64, seed=0)
    view = ViewResult(str(dataset.SOPInstanceUID), 0.5, np.zeros((7, 7), np.float32))
    result = StudyResult(str(dataset.StudyInstanceUID), 1, StudyType.WRIST, 0.5, 0.5, (view,))
    build_sr([dataset], result, model, device_uid=installation_uid(config))
    if config.outputs.overlays:
        build_cam_overlay(dataset, np.zeros((64, 64), np.float32), view, result, model)
