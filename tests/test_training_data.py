"""Training data: MURA layout and labels, DICOM folders, patient splits, class weights, pixels."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage.scoring.card import IMAGENET_MEAN, IMAGENET_STD
from triage.scoring.preprocess import decode_view, prepare_array
from triage.study_types import StudyType
from triage.training.data import (
    Augment,
    DataError,
    EpochSampler,
    Preprocessing,
    View,
    ViewDataset,
    check_patient_split,
    class_weights,
    find_mura_dir,
    load_dicom_folder,
    load_mura,
    load_view_array,
    normalise_study_key,
    read_png_pixels,
)
from triage.training.train import weighted_bce

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _png(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 20, size=(size[1], size[0])), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def _mura(
    root: Path,
    split: str,
    studies: dict[str, int],
    *,
    labels: dict[str, int] | None = None,
    prefix: str = "MURA-v1.1",
) -> None:
    """Write studies {"XR_WRIST/patient00001/study1_positive": 1, …} with two images each."""
    mura = root / "MURA-v1.1"
    image_lines, study_lines = [], []
    for i, (study, label) in enumerate(studies.items()):
        for k in (1, 2):
            rel = f"{split}/{study}/image{k}.png"
            _png(mura / rel, 60 + 40 * label + i)
            image_lines.append(f"{prefix}/{rel}")
        written = (labels or studies)[study]
        study_lines.append(f"{prefix}/{split}/{study}/,{written}")
    mura.mkdir(parents=True, exist_ok=True)
    (mura / f"{split}_image_paths.csv").write_text("\n".join(image_lines) + "\n")
    (mura / f"{split}_labeled_studies.csv").write_text("\n".join(study_lines) + "\n")


TRAIN = {
    "XR_WRIST/patient00001/study1_positive": 1,
    "XR_WRIST/patient00001/study2_negative": 0,
    "XR_ELBOW/patient00002/study1_negative": 0,
}
VALID = {"XR_HAND/patient00100/study1_positive": 1}


def test_mura_labels_types_patients(tmp_path: Path) -> None:
    _mura(tmp_path, "train", TRAIN)
    _mura(tmp_path, "valid", VALID)
    views = load_mura(tmp_path, "train")
    assert len(views) == 6
    by_study = {v.study_id: v for v in views}
    positive = by_study["train/XR_WRIST/patient00001/study1_positive"]
    negative = by_study["train/XR_WRIST/patient00001/study2_negative"]
    # The mapping public reimplementations got wrong: positive = abnormal = 1.
    assert positive.label == 1 and negative.label == 0
    assert positive.study_type is StudyType.WRIST
    assert by_study["train/XR_ELBOW/patient00002/study1_negative"].study_type is StudyType.ELBOW
    assert positive.patient_id == "patient00001"
    first = next(v for v in views if v.study_id == positive.study_id)
    assert first.path.is_file() and first.path.name == "image1.png"
    # The root may be MURA-v1.1 itself or the folder containing it.
    assert load_mura(tmp_path / "MURA-v1.1", "train") == views
    assert find_mura_dir(tmp_path) == tmp_path / "MURA-v1.1"
    assert [v.label for v in load_mura(tmp_path, "valid")] == [1, 1]


def test_mura_inverted_labels_are_refused(tmp_path: Path) -> None:
    inverted = {study: 1 - label for study, label in TRAIN.items()}
    _mura(tmp_path, "train", TRAIN, labels=inverted)
    with pytest.raises(DataError, match="inverted"):
        load_mura(tmp_path, "train")


def test_mura_csv_problems(tmp_path: Path) -> None:
    _mura(tmp_path, "train", TRAIN)
    studies = tmp_path / "MURA-v1.1" / "train_labeled_studies.csv"
    lines = studies.read_text().splitlines()
    studies.write_text("\n".join(lines[1:]) + "\n")  # first study unlabelled
    with pytest.raises(DataError, match=r"not in train_labeled_studies\.csv"):
        load_mura(tmp_path, "train")
    studies.write_text("\n".join([*lines[:-1], lines[-1].replace(",0", ",2")]) + "\n")
    with pytest.raises(DataError, match=r"not 0 \(normal\) or 1"):
        load_mura(tmp_path, "train")
    with pytest.raises(DataError, match="neither"):
        load_mura(tmp_path / "nowhere", "train")
    studies.write_text("\n".join(lines) + "\n")
    images = tmp_path / "MURA-v1.1" / "train_image_paths.csv"
    listed = images.read_text().splitlines()
    # Twice, an image weighed twice in training and in its study's mean.
    images.write_text("\n".join([*listed, listed[0]]) + "\n")
    with pytest.raises(
        DataError, match=rf"line {len(listed) + 1}: .* is listed already, on line 1"
    ):
        load_mura(tmp_path, "train")


def test_patient_split_check(tmp_path: Path) -> None:
    _mura(tmp_path, "train", TRAIN)
    _mura(tmp_path, "valid", {"XR_HAND/patient00002/study2_positive": 1})  # patient00002 again
    train, valid = load_mura(tmp_path, "train"), load_mura(tmp_path, "valid")
    with pytest.raises(DataError, match="more than one split") as err:
        check_patient_split({"train": train, "valid": valid})
    assert "valid/XR_HAND/patient00002/study2_positive" in str(err.value)
    check_patient_split({"train": train, "valid": [v for v in valid if v.patient_id == "x"]})


def _views(counts: dict[StudyType, tuple[int, int]]) -> list[View]:
    views = []
    for t, (normal, abnormal) in counts.items():
        for label, n in ((0, normal), (1, abnormal)):
            views += [
                View(Path(f"{t}{label}{i}"), f"{t}{label}{i}", "p", t, label) for i in range(n)
            ]
    return views


def test_class_weights_follow_the_paper() -> None:
    # |N_T|, |A_T| images: w_T,1 = N/(A+N) on abnormal images, w_T,0 = A/(A+N) on normal ones.
    views = _views(
        {
            StudyType.WRIST: (3, 1),  # w0 = 1/4, w1 = 3/4
            StudyType.ELBOW: (2, 2),  # 1/2, 1/2
            StudyType.HAND: (1, 4),  # w0 = 4/5, w1 = 1/5
        }
    )
    weights = class_weights(views)
    assert weights[StudyType.WRIST] == pytest.approx((0.25, 0.75))
    assert weights[StudyType.ELBOW] == pytest.approx((0.5, 0.5))
    assert weights[StudyType.HAND] == pytest.approx((0.8, 0.2))
    ds = ViewDataset(views, Preprocessing(32), weights=weights)
    per_view = dict(zip([(v.study_type, v.label) for v in views], ds.loss_weights, strict=True))
    assert per_view[(StudyType.WRIST, 1)] == pytest.approx(0.75)
    assert per_view[(StudyType.WRIST, 0)] == pytest.approx(0.25)
    assert per_view[(StudyType.HAND, 1)] == pytest.approx(0.2)


def test_weighted_bce_is_the_papers_loss_and_stable() -> None:
    logits = torch.tensor([2.0, -1.0, 0.3, 80.0, -80.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    w = torch.tensor([0.75, 0.25, 0.5, 0.2, 0.8])
    p = torch.sigmoid(logits.double())
    # L = −w_T,1 · y log p − w_T,0 · (1 − y) log(1 − p), written with log-sigmoid for 80.
    log_p = torch.nn.functional.logsigmoid(logits.double())
    log_not_p = torch.nn.functional.logsigmoid(-logits.double())
    expected = (-(w * y) * log_p - (w * (1 - y)) * log_not_p).mean()
    loss = weighted_bce(logits, y, w)
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(p[3]) == 1.0  # a naive log(1 − p) would be −inf here


def test_training_input_is_the_daemons_preprocessing(tmp_path: Path) -> None:
    png = tmp_path / "image1.png"
    _png(png, 120, size=(90, 70))
    prep = Preprocessing(64, IMAGENET_MEAN, IMAGENET_STD)
    view = View(png, "s", "p", StudyType.WRIST, 1)
    array = load_view_array(view, prep)
    expected = prepare_array(np.asarray(Image.open(png)), 64, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(array, expected)
    # The same pixels as an 8-bit DICOM give the daemon exactly what training saw.
    dcm = _dicom(tmp_path / "dicom", np.asarray(Image.open(png)), "1.2.3", "P1", "WRIST")
    daemon = decode_view(str(dcm), 64, IMAGENET_MEAN, IMAGENET_STD).array
    np.testing.assert_allclose(daemon, array, atol=1e-6)
    assert read_png_pixels(png).dtype == np.uint8


def test_a_16_bit_png_is_trained_on_as_the_daemon_shows_the_same_pixels(tmp_path: Path) -> None:
    # Raw 12-bit values in a 16-bit PNG: divided by 65535 they were near black, while the
    # daemon stretches the same pixels in a DICOM (no window) between their percentiles.
    pixels = np.clip(np.random.default_rng(0).normal(2000, 600, (90, 70)), 0, 4095)
    pixels = pixels.astype(np.uint16)
    png = tmp_path / "image1.png"
    Image.fromarray(pixels).save(png)
    prep = Preprocessing(64, IMAGENET_MEAN, IMAGENET_STD)
    array = load_view_array(View(png, "s", "p", StudyType.WRIST, 1), prep)
    dcm = _dicom(tmp_path / "dicom", pixels, "1.2.3", "P1", "WRIST")
    daemon = decode_view(str(dcm), 64, IMAGENET_MEAN, IMAGENET_STD).array
    np.testing.assert_allclose(array, daemon, atol=1e-5)


def test_augmentation_is_seeded_per_epoch_and_index(tmp_path: Path) -> None:
    pngs = []
    for i in range(3):
        pngs.append(tmp_path / f"{i}.png")
        _png(pngs[-1], 100 + i)
    views = [View(p, str(i), "p", StudyType.HAND, i % 2) for i, p in enumerate(pngs)]
    prep = Preprocessing(32)
    ds = ViewDataset(views, prep, augment=Augment(), seed=5)
    a, _, _, _ = ds[(0, 1)]
    b, _, _, _ = ViewDataset(views, prep, augment=Augment(), seed=5)[(0, 1)]
    c, _, _, _ = ds[(1, 1)]
    plain, _, _, _ = ViewDataset(views, prep)[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)
    assert a.shape == (3, 32, 32)
    # Rotated corners are black (pixel 0 in normalised units), never brighter than the image.
    black = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert float(a[0].min()) >= black - 1e-5
    # Sampler: a resumed epoch yields the tail of the same permutation.
    full = list(EpochSampler(10, seed=3, epoch=2))
    assert sorted(i for _, i in full) == list(range(10))
    assert list(EpochSampler(10, seed=3, epoch=2, skip=4)) == full[4:]
    assert [i for _, i in EpochSampler(10, seed=3, epoch=3)] != [i for _, i in full]


def _dicom(
    folder: Path,
    pixels: np.ndarray,
    study_uid: str,
    patient: str,
    body_part: str,
    modality: str = "CR",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    wide = pixels.dtype == np.uint16  # 12-bit data in 16-bit words, as CR writes it
    ds.BitsAllocated, ds.BitsStored = (16, 12) if wide else (8, 8)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype if wide else np.uint8).tobytes()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_folder_labels_and_types(tmp_path: Path) -> None:
    img = np.full((20, 20), 100, np.uint8)
    for _ in range(2):
        _dicom(tmp_path / "a", img, "1.2.3.1", "P1", "WRIST")
    _dicom(tmp_path / "b", img, "1.2.3.2", "P2", "ELBOW")
    _dicom(tmp_path / "c", img, "1.2.3.9", "P9", "HAND")  # not labelled: ignored
    (tmp_path / "notes.txt").write_text("not DICOM")
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n1.2.3.1,1\n1.2.3.2,0\n")
    views = load_dicom_folder(tmp_path, labels)
    assert sorted((v.study_id, v.study_type.value, v.label) for v in views) == [
        ("1.2.3.1", "XR_WRIST", 1),
        ("1.2.3.1", "XR_WRIST", 1),
        ("1.2.3.2", "XR_ELBOW", 0),
    ]
    assert all(v.is_dicom for v in views)
    # A labelled study the daemon would skip (a chest) is an error, or recorded when asked.
    _dicom(tmp_path / "d", img, "1.2.3.3", "P3", "CHEST")
    labels.write_text("1.2.3.1,1\n1.2.3.3,0\n")
    with pytest.raises(DataError, match="would skip"):
        load_dicom_folder(tmp_path, labels)
    skipped: list[tuple[str, str]] = []
    assert {v.study_id for v in load_dicom_folder(tmp_path, labels, skipped=skipped)} == {"1.2.3.1"}
    assert skipped and skipped[0][0] == "1.2.3.3"
    labels.write_text("1.2.3.1,1\n1.2.3.404,0\n")
    with pytest.raises(DataError, match="no DICOM file"):
        load_dicom_folder(tmp_path, labels)


def _copy_with(source: Path, target: Path, **values: str) -> Path:
    """A copy of a DICOM file with other (possibly invalid) values."""
    ds = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values it writes
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(target, enforce_file_format=True)
    return target


def test_damaged_dicom_files_are_skipped_counted_and_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    img = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (20, 1))  # a blank one is no image
    good = _dicom(tmp_path / "a", img, "1.2.3.1", "P1", "WRIST")
    blob = good.read_bytes()
    # An unknown VR in the file meta: dcmread raises NotImplementedError.
    at = blob.index(b"\x02\x00\x10\x00UI", 132)
    (tmp_path / "a" / "unknown_vr.dcm").write_bytes(blob[: at + 5] + b"f" + blob[at + 6 :])
    # Rows (US) three bytes long: pydicom raises BytesLengthException parsing the value.
    at = blob.index(b"\x28\x00\x10\x00US\x02\x00")
    odd = blob[:at] + b"\x28\x00\x10\x00US\x03\x00" + blob[at + 8 : at + 10] + b"\x00"
    (tmp_path / "a" / "odd_length.dcm").write_bytes(odd + blob[at + 10 :])
    # UIDs holding a patient's name: pydicom's warnings quote the value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _dicom(tmp_path / "b", img, "1.2.DOE^JOHN", "P2", "HAND")  # not labelled
    named = _copy_with(good, tmp_path / "a" / "named.dcm", SOPInstanceUID="1.2.3.DOE^JANE")
    # Warned about again by the study decision, which re-validates the SOP Class UID.
    _copy_with(good, tmp_path / "a" / "class.dcm", SOPClassUID="1.2.DOE^JIM", SOPInstanceUID="9")
    (tmp_path / "notes.txt").write_text("not DICOM")  # ignored, not counted as damaged

    caplog.clear()
    capfd.readouterr()
    damaged: list[Path] = []
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        views = load_dicom_folder(tmp_path, {"1.2.3.1": 1}, damaged=damaged)
        arrays = [load_view_array(v, Preprocessing(input_size=32)) for v in views]
    assert sorted(v.path.name for v in views) == sorted([good.name, named.name])
    assert all(a.shape == (3, 32, 32) for a in arrays)
    assert sorted(p.name for p in damaged) == ["odd_length.dcm", "unknown_vr.dcm"]
    assert [str(w.message) for w in caught] == []
    assert "DOE" not in caplog.text and "DOE" not in capfd.readouterr().err

    # A labelled study whose only file is damaged: missing, and the message says why.
    for path in (tmp_path / "a").glob("*.dcm"):
        if path.name not in ("odd_length.dcm", "unknown_vr.dcm"):
            path.unlink()
    with pytest.raises(DataError, match=r"no DICOM file.*2 damaged DICOM files skipped"):
        load_dicom_folder(tmp_path, {"1.2.3.1": 1})


def test_study_keys_normalise() -> None:
    assert normalise_study_key("MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/") == (
        "valid/XR_WRIST/patient11185/study1_positive"
    )
    assert normalise_study_key(" 1.2.840.1 ") == "1.2.840.1"
    # A prefix with a folder named like a split: the split is the last one.
    assert normalise_study_key("/mnt/train/MURA-v1.1/valid/XR_HAND/patient1/study1_negative") == (
        "valid/XR_HAND/patient1/study1_negative"
    )


def test_csv_paths_under_a_folder_named_like_the_split_load(tmp_path: Path) -> None:
    mura = tmp_path / "MURA-v1.1"
    study = "XR_WRIST/patient00001/study1_positive"
    _png(mura / "train" / study / "image1.png", 90)
    prefix = "/mnt/train/MURA-v1.1"  # absolute paths from the machine that wrote the CSVs
    (mura / "train_image_paths.csv").write_text(f"{prefix}/train/{study}/image1.png\n")
    (mura / "train_labeled_studies.csv").write_text(f"{prefix}/train/{study}/,1\n")
    [view] = load_mura(tmp_path, "train")
    assert view.path == mura / "train" / study / "image1.png"


def test_a_view_without_a_patient_id_belongs_to_its_study_s_patient(tmp_path: Path) -> None:
    """The daemon scores a study one of whose views has no PatientID (patients_in counts
    named patients); `triage evaluate` stopped on it as "more than one patient". A study
    with no PatientID at all is a patient of its own: two such in two splits are no leak."""
    img = np.full((20, 20), 100, np.uint8)
    _dicom(tmp_path / "a", img, "1.2.3.1", "P1", "WRIST")
    _dicom(tmp_path / "a", img, "1.2.3.1", "", "WRIST")
    _dicom(tmp_path / "b", img, "1.2.3.2", "", "ELBOW")
    _dicom(tmp_path / "c", img, "1.2.3.3", "", "HAND")
    views = load_dicom_folder(tmp_path, {"1.2.3.1": 1, "1.2.3.2": 0, "1.2.3.3": 1})
    by_study = {v.study_id: v.patient_id for v in views}
    assert by_study["1.2.3.1"] == "/P1"
    assert by_study["1.2.3.2"] != by_study["1.2.3.3"]
    check_patient_split(
        {
            "train": [v for v in views if v.study_id == "1.2.3.2"],
            "valid": [v for v in views if v.study_id == "1.2.3.3"],
        }
    )
    _dicom(tmp_path / "d", img, "1.2.3.1", "P2", "WRIST")
    with pytest.raises(DataError, match="more than one patient"):
        load_dicom_folder(tmp_path, {"1.2.3.1": 1})
