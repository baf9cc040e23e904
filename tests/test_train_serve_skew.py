"""Train/serve skew: ``triage evaluate`` and the daemon's worker score the same DICOM studies
alike (study type, views, model input, normalisation, threshold), and a PNG is trained on as
the daemon shows the same pixels.

Both paths run here on the same files, with a card that is not the MURA default (64-px input,
non-ImageNet normalisation, per-type thresholds), so that a consumer reading a constant instead
of the card shows up as a different probability.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from triage.dicom.sop import CR_IMAGE_STORAGE
from triage.scoring.card import load_card
from triage.scoring.preprocess import decode_view
from triage.scoring.worker import Worker, load_configured_model
from triage.store.models import Result, Study, StudyState, utcnow
from triage.study_types import StudyType
from triage.testing.received import local_worker_config, received_store
from triage.testing.synth import make_study, write_study
from triage.training.cli import predict_with_card
from triage.training.data import Preprocessing, View, load_dicom_folder, load_view_array
from triage.training.evaluate import per_study_thresholds, study_table

#: Both paths run the same fp32 model on the same input; only the batch composition differs.
_PROBABILITY_TOLERANCE = 1e-5

_CARD = """\
name = "skew-test"
version = "0.0.1"
architecture = "densenet169"
input_size = 64
validated = false
created = 2025-11-26
study_types = ["XR_WRIST", "XR_HAND", "XR_ELBOW"]
threshold = 0.5

[thresholds]
XR_WRIST = 0.2
XR_HAND = 0.8

[normalisation]
mean = [0.5, 0.4, 0.3]
std = [0.25, 0.2, 0.3]

[weights]
init = "seeded"
seed = 3

[training]
data = "none"
"""


def _write(spool_dir: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    """The study's files, as the spool holds them (``<StudyInstanceUID>/<SOP>.dcm``)."""
    return write_study(datasets, spool_dir / str(datasets[0].StudyInstanceUID))


def _tied_study() -> list[pydicom.Dataset]:
    """Two views, one naming the hand and one the wrist, received in the reverse of their
    series order: the study type is decided by a tie, which the earlier view breaks."""
    datasets = make_study(StudyType.WRIST, views=2, rows=96, cols=80, seed=41, study_description="")
    for ds, part, series in zip(datasets, ("HAND", "WRIST"), (2, 1), strict=True):
        ds.BodyPartExamined = part
        ds.SeriesDescription = part
        ds.ProtocolName = part
        ds.SeriesNumber = series
        ds.InstanceNumber = 1
    return datasets


@pytest.mark.slow
def test_evaluate_and_the_daemon_score_dicom_studies_alike(tmp_path: Path) -> None:
    card_path = tmp_path / "card.toml"
    card_path.write_text(_CARD)
    card = load_card(card_path)
    config = local_worker_config(
        tmp_path,
        model={"card": str(card_path), "device": "cpu", "precision": "fp32", "batch_size": 3},
        worker={"decode_processes": 1, "poll_interval_s": 0.05},
    )
    spool_dir = Path(config.store.spool_dir)
    studies = [
        make_study(StudyType.WRIST, views=3, rows=120, cols=96, seed=1, photometric="MONOCHROME1"),
        make_study(StudyType.HAND, views=2, rows=100, cols=90, seed=2, bits_stored=16),
        make_study(StudyType.ELBOW, views=1, rows=130, cols=70, seed=3, modality="CR"),
        _tied_study(),
    ]
    files = [path for datasets in studies for path in _write(spool_dir, datasets)]
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{s[0].StudyInstanceUID},{i % 2}\n" for i, s in enumerate(studies)))

    # `triage evaluate`: the loader's study decision, then the card's model and thresholds.
    views = load_dicom_folder(spool_dir, labels)
    table = study_table(views, predict_with_card(card, views, device="cpu", precision="fp32"))
    thresholds = per_study_thresholds(table, card.threshold, card.thresholds)
    evaluated = {
        sid: (t.value, float(p), float(thr), int(n))
        for sid, t, p, thr, n in zip(
            table.study_ids, table.study_types, table.probs, thresholds, table.n_views, strict=True
        )
    }

    # The daemon: the files received in the order written (the tied study's hand view first).
    engine, store, spool = received_store(config.store.url, spool_dir, files)
    finished = threading.Semaphore(0)
    worker = Worker(config, store, spool, load_configured_model(config), on_scored=finished.release)
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    worker.start()
    try:
        for _ in studies:
            assert finished.acquire(timeout=120), store.counts_by_state()
    finally:
        worker.stop(30)
    assert store.counts_by_state() == {StudyState.DONE: len(studies)}
    with store.read_session() as session:
        rows = session.execute(select(Study.study_uid, Result).join(Result)).all()
        served = {
            uid: (r.study_type, r.probability, r.threshold, r.views_scored) for uid, r in rows
        }
    engine.dispose()

    assert set(served) == set(evaluated)
    for uid, (study_type, probability, threshold, n_views) in served.items():
        expected = evaluated[uid]
        assert (study_type, threshold, n_views) == (expected[0], expected[2], expected[3]), uid
        assert probability == pytest.approx(expected[1], abs=_PROBABILITY_TOLERANCE), uid


def _dicom_of(folder: Path, pixels: np.ndarray) -> Path:
    """*pixels* (uint8 grey [H, W] or RGB [H, W, 3]) as a CR image with no VOI: what a PNG
    export's pixels are on the PACS."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "WRIST"
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _texture(rows: int, columns: int, seed: int) -> np.ndarray:
    """Fine-grained 8-bit content, where two resampling paths differ most."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120, 50, (rows, columns)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("input_size", [224, 320])
def test_a_large_png_is_trained_on_as_the_daemon_shows_the_same_pixels(
    tmp_path: Path, input_size: int
) -> None:
    # A full-resolution export (over 2048 px): the daemon averages it down 2×2 to under
    # 2048 px before the antialiased resize; training resized the PNG in one pass.
    pixels = _texture(2600, 2100, seed=7)
    png = tmp_path / "image1.png"
    Image.fromarray(pixels).save(png)
    prep = Preprocessing(input_size, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    trained = load_view_array(View(png, "s", "p", StudyType.WRIST, 1), prep)
    dcm = _dicom_of(tmp_path / "dicom", pixels)
    served = decode_view(str(dcm), input_size, prep.mean, prep.std, 0).array
    np.testing.assert_allclose(trained, served, atol=1e-5)


def test_a_palette_png_is_trained_on_as_the_daemon_shows_the_same_colours(
    tmp_path: Path,
) -> None:
    # PIL's convert("L") rounds the luminance to 8 bits; the daemon keeps it in float.
    grey = _texture(300, 250, seed=8)
    rgb = np.stack([grey, np.roll(grey, 3, 0), np.roll(grey, 5, 1)], axis=-1)
    palette = Image.fromarray(rgb).quantize(64)
    png = tmp_path / "image1.png"
    palette.save(png)
    prep = Preprocessing(224)
    trained = load_view_array(View(png, "s", "p", StudyType.WRIST, 1), prep)
    dcm = _dicom_of(tmp_path / "dicom", np.asarray(palette.convert("RGB")))
    served = decode_view(str(dcm), 224, prep.mean, prep.std, 0).array
    np.testing.assert_allclose(trained, served, atol=1e-5)
