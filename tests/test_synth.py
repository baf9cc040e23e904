"""The synthetic study generator: phantoms, DICOM tags, encodings, training layouts, CLI."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from triage.dicom.sop import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from triage.study_types import StudyType
from triage.testing.phantom import render_phantom, render_phantom_with_findings
from triage.testing.synth import (
    BODY_PART_EXAMINED,
    ENCODINGS,
    available_encodings,
    main,
    make_study,
    study_findings,
    write_benchmark_files,
    write_labelled_dicom_dataset,
    write_mura_dataset,
    write_study,
)
from triage.uids import is_valid_uid

SMALL = {"rows": 96, "cols": 80}


def _pixels(ds) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns)


def _block_mean(image: np.ndarray, size: int = 64) -> np.ndarray:
    """Downscale by block averaging, as a 64 px training pipeline would see the image."""
    rows, cols = image.shape
    fr, fc = rows // size, cols // size
    return image[: fr * size, : fc * size].reshape(size, fr, size, fc).mean(axis=(1, 3))


# --------------------------------------------------------------------------------------------
# Determinism and tags.


def test_same_seed_gives_identical_datasets_uids_included() -> None:
    first = make_study(StudyType.ELBOW, views=3, abnormal=True, seed=11, **SMALL)
    second = make_study(StudyType.ELBOW, views=3, abnormal=True, seed=11, **SMALL)
    assert [ds == other for ds, other in zip(first, second, strict=True)] == [True] * 3
    other = make_study(StudyType.ELBOW, views=3, abnormal=True, seed=12, **SMALL)
    assert other[0].StudyInstanceUID != first[0].StudyInstanceUID
    assert not np.array_equal(_pixels(other[0]), _pixels(first[0]))


def test_uids_are_valid_and_distinct() -> None:
    datasets = make_study(StudyType.HAND, views=4, seed=3, **SMALL)
    sops = {ds.SOPInstanceUID for ds in datasets}
    series = {ds.SeriesInstanceUID for ds in datasets}
    assert len(sops) == 4 and len(series) == 4  # one series per view
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    for uid in (*sops, *series, datasets[0].StudyInstanceUID):
        assert is_valid_uid(uid)
    single = make_study(StudyType.HAND, views=3, series_per_view=False, seed=3, **SMALL)
    assert len({ds.SeriesInstanceUID for ds in single}) == 1
    assert [ds.InstanceNumber for ds in single] == [1, 2, 3]
    given = make_study(StudyType.HAND, views=2, study_uid="1.2.3.4", seed=3, **SMALL)
    assert {ds.StudyInstanceUID for ds in given} == {"1.2.3.4"}


_DESCRIPTION_WORDS = {
    StudyType.WRIST: "WRIST",
    StudyType.HAND: "HAND",
    StudyType.FINGER: "FINGER",
    StudyType.FOREARM: "FOREARM",
    StudyType.ELBOW: "ELBOW",
    StudyType.HUMERUS: "HUMERUS",
    StudyType.SHOULDER: "SHOULDER",
}


@pytest.mark.parametrize("part", list(StudyType))
@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_required_tags_and_descriptions(part: StudyType, modality: str) -> None:
    datasets = make_study(part, views=2, modality=modality, seed=21, **SMALL)
    for ds in datasets:
        assert ds.SOPClassUID == {"CR": CR_IMAGE_STORAGE, "DX": DX_FOR_PRESENTATION}[modality]
        assert ds.Modality == modality
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "Manufacturer",
            "SeriesDescription",
            "ProtocolName",
            "ViewPosition",
        ):
            assert str(ds.get(keyword, "")).strip(), keyword
        assert _DESCRIPTION_WORDS[part] in ds.StudyDescription
        assert len(ds.StudyDescription) <= 64 and len(ds.AccessionNumber) <= 16
        assert ds.BodyPartExamined in {value for value, _ in BODY_PART_EXAMINED[part]}
        assert ds.ViewPosition in {"AP", "PA", "LL", "RL", "LLO", "RLO"}
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate)
        if modality == "DX":
            assert ds.PresentationIntentType == "FOR PRESENTATION"
            assert ds.ImageLaterality in ("L", "R")
            assert "Laterality" not in ds
            assert ds.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"
        else:
            assert ds.Laterality in ("L", "R")
        assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16


def test_study_descriptions_vary_realistically() -> None:
    seen = {
        make_study(StudyType.WRIST, views=3, seed=s, **SMALL)[0].StudyDescription for s in range(30)
    }
    assert len(seen) >= 4
    assert any(re.fullmatch(r"XR WRIST 3V", d) for d in seen)
    fingers = {
        make_study(StudyType.FINGER, views=2, seed=s, **SMALL)[0].StudyDescription
        for s in range(30)
    }
    assert any("FINGER(S)" in d for d in fingers)
    humerus = {
        make_study(StudyType.HUMERUS, views=2, seed=s, **SMALL)[0].BodyPartExamined
        for s in range(30)
    }
    assert humerus == {"HUMERUS", "ARM"}


def test_explicit_patient_and_body_part_values() -> None:
    datasets = make_study(
        "XR_SHOULDER",
        views=1,
        patient_name="TEST^ONE",
        patient_id="P123",
        patient_birth_date="19700101",
        accession_number="ACC1",
        study_description="SHOULDER TRAUMA",
        body_part_examined="",
        laterality="R",
        **SMALL,
    )
    ds = datasets[0]
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == ("TEST^ONE", "P123", "19700101")
    assert (ds.AccessionNumber, ds.StudyDescription) == ("ACC1", "SHOULDER TRAUMA")
    assert "BodyPartExamined" in ds and ds.BodyPartExamined == ""
    assert ds.ImageLaterality == "R"
    chest = make_study("CHEST", views=2, modality="CR", **SMALL)
    assert chest[0].BodyPartExamined == "CHEST" and "Laterality" not in chest[0]
    assert make_study("knee", views=1, **SMALL)[0].BodyPartExamined == "KNEE"


@pytest.mark.parametrize(
    "kwargs",
    [{"views": 5}, {"modality": "MR"}, {"bits_stored": 17}, {"photometric": "RGB"}],
)
def test_bad_arguments_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_study(StudyType.WRIST, **SMALL, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_study("PELVIS", **SMALL)


# --------------------------------------------------------------------------------------------
# Pixels.


@pytest.mark.parametrize("bits", [12, 13, 14, 15, 16])
def test_bits_stored_is_respected(bits: int) -> None:
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds = make_study(
            StudyType.HUMERUS,
            views=1,
            bits_stored=bits,
            photometric=photometric,
            abnormal=True,
            seed=4,
            **SMALL,
        )[0]
        stored = _pixels(ds)
        assert (ds.BitsStored, ds.HighBit, ds.BitsAllocated) == (bits, bits - 1, 16)
        assert int(stored.max()) < 2**bits
        assert int(stored.max()) - int(stored.min()) > 2 ** (bits - 2)  # uses the range


def test_monochrome1_stores_inverted_values() -> None:
    common = {"views": 2, "bits_stored": 14, "modality": "DX", "seed": 8, "abnormal": True}
    m2 = make_study(StudyType.FOREARM, photometric="MONOCHROME2", **common, **SMALL)
    m1 = make_study(StudyType.FOREARM, photometric="MONOCHROME1", **common, **SMALL)
    for a, b in zip(m1, m2, strict=True):
        assert np.array_equal(_pixels(a).astype(np.int32), (2**14 - 1) - _pixels(b))
        assert (a.PhotometricInterpretation, b.PhotometricInterpretation) == (
            "MONOCHROME1",
            "MONOCHROME2",
        )
        assert (a.PresentationLUTShape, b.PresentationLUTShape) == ("INVERSE", "IDENTITY")
        assert (a.PixelIntensityRelationshipSign, b.PixelIntensityRelationshipSign) == (1, -1)
    # Bone is bright in MONOCHROME2: the anatomy's top percentile is high stored values.
    bone = _pixels(m2[0]) > np.percentile(_pixels(m2[0]), 97)
    assert _pixels(m1[0])[bone].mean() < _pixels(m1[0]).mean()


def test_windows_and_rescale() -> None:
    ds = make_study(
        StudyType.WRIST,
        views=1,
        bits_stored=12,
        windows=3,
        rescale_slope=0.5,
        rescale_intercept=-100,
        seed=2,
        **SMALL,
    )[0]
    assert len(ds.WindowCenter) == 3 and len(ds.WindowWidth) == 3
    assert list(ds.WindowCenterWidthExplanation) == ["DEFAULT", "BONE", "SOFT TISSUE"]
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, -100.0)
    out = _pixels(ds) * 0.5 - 100
    center, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    assert out.min() <= center <= out.max() and 0 < width <= (out.max() - out.min()) * 1.5
    fixed = make_study(StudyType.WRIST, views=1, windows=[(500, 1000), (800, 200)], **SMALL)[0]
    assert [float(v) for v in fixed.WindowCenter] == [500.0, 800.0]
    assert [float(v) for v in fixed.WindowWidth] == [1000.0, 200.0]


def test_size_mb_gives_that_many_megabytes() -> None:
    ds = make_study(StudyType.WRIST, views=1, size_mb=0.5, seed=1)[0]
    assert abs(len(ds.PixelData) - 0.5 * 2**20) < 0.03 * 2**20
    assert ds.Rows > ds.Columns  # portrait, like a detector


def test_phantom_renders_every_part_and_view_in_range() -> None:
    for part in [*StudyType, "CHEST", "KNEE"]:
        for view in ("AP", "LAT", "OBL"):
            image = render_phantom(part, view, 72, 60, False, np.random.default_rng(1))
            assert image.shape == (72, 60) and image.dtype == np.float32
            assert image.min() >= 0.0 and image.max() <= 1.0
            assert image.std() > 0.05  # anatomy, not a flat field


def test_large_phantom_renders_quickly() -> None:
    # CPU time, not wall time: the machine is shared, and others' load must not fail this.
    start = time.process_time()
    image = render_phantom(StudyType.HAND, "PA", 2500, 2000, True, np.random.default_rng(3))
    elapsed = time.process_time() - start
    assert image.shape == (2500, 2000)
    # About 0.4 s of CPU here; the bound only catches a gross regression.
    assert elapsed < 2.5


def test_abnormal_phantoms_differ_detectably_at_64_px() -> None:
    """Same generator state: identical anatomy and noise, so the difference is the findings,
    and it must survive block-averaging to 64 × 64."""
    kinds = set()
    for i in range(21):
        part = list(StudyType)[i % 7]
        view = ("PA", "LAT", "OBL")[i % 3]
        normal, none = render_phantom_with_findings(
            part, view, 256, 208, False, np.random.default_rng([5, i])
        )
        again = render_phantom(part, view, 256, 208, False, np.random.default_rng([5, i]))
        abnormal, findings = render_phantom_with_findings(
            part, view, 256, 208, True, np.random.default_rng([5, i])
        )
        assert none == [] and np.array_equal(normal, again)
        assert 1 <= len(findings) <= 2
        kinds |= {f.kind for f in findings}
        for f in findings:
            assert 0 <= f.row < 256 and 0 <= f.col < 208 and f.radius > 0
        diff = np.abs(_block_mean(abnormal) - _block_mean(normal))
        assert diff.max() > 0.06, (part, view, findings)
    assert kinds == {"fracture", "hardware", "lesion", "dislocation"}


def test_study_findings_match_the_study() -> None:
    findings = study_findings(StudyType.FOREARM, views=2, seed=6, **SMALL)
    assert len(findings) == 2 and all(findings)
    assert study_findings(StudyType.FOREARM, views=2, seed=6, abnormal=False, **SMALL) == [[], []]


# --------------------------------------------------------------------------------------------
# Encodings.


def test_basic_encodings_are_always_available() -> None:
    assert {"explicit", "implicit", "deflated", "rle"} <= set(available_encodings())
    assert set(available_encodings()) <= set(ENCODINGS)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_encoding_round_trips_to_identical_pixels(encoding: str, tmp_path: Path) -> None:
    if encoding not in available_encodings():
        pytest.skip(f"{encoding} cannot be written here")
    for bits, photometric in ((12, "MONOCHROME2"), (16, "MONOCHROME1")):
        datasets = make_study(
            StudyType.WRIST,
            views=2,
            bits_stored=bits,
            photometric=photometric,
            abnormal=True,
            seed=bits,
            **SMALL,
        )
        expected = [_pixels(ds).copy() for ds in datasets]
        paths = write_study(datasets, tmp_path / f"{bits}", encoding)
        assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in datasets]
        for path, ds, pixels in zip(paths, datasets, expected, strict=True):
            back = dcmread(path)
            assert back.file_meta.TransferSyntaxUID == ENCODINGS[encoding]
            assert back.SOPInstanceUID == ds.SOPInstanceUID
            assert np.array_equal(back.pixel_array, pixels)
        # Writing leaves the data sets as they were.
        assert all(
            ds == fresh
            for ds, fresh in zip(
                datasets,
                make_study(
                    StudyType.WRIST,
                    views=2,
                    bits_stored=bits,
                    photometric=photometric,
                    abnormal=True,
                    seed=bits,
                    **SMALL,
                ),
                strict=True,
            )
        )


def test_unknown_encoding_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_study(make_study(StudyType.WRIST, views=1, **SMALL), tmp_path, "jpeg-xl")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
@pytest.mark.parametrize(
    ("modality", "photometric", "part"),
    [
        ("CR", "MONOCHROME1", StudyType.WRIST),
        ("DX", "MONOCHROME2", StudyType.SHOULDER),
        ("DX", "MONOCHROME1", "CHEST"),
    ],
)
def test_dciodvfy_reports_no_errors(
    modality: str, photometric: str, part: StudyType | str, tmp_path: Path
) -> None:
    datasets = make_study(
        part, views=2, modality=modality, photometric=photometric, windows=2, seed=31, **SMALL
    )
    encoding = "jpeg-lossless" if "jpeg-lossless" in available_encodings() else "explicit"
    for path in write_study(datasets, tmp_path, encoding):
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = done.stdout + done.stderr
        iod = {"CR": "CRImage", "DX": "DXImageForPresentation"}[modality]
        assert iod in report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], report


def test_benchmark_files_reuse_pixels_with_new_uids(tmp_path: Path) -> None:
    paths = write_benchmark_files(tmp_path, 4, size_mb=0.25, views_per_study=2, seed=2)
    assert len(paths) == 4
    headers = [dcmread(p) for p in paths]
    assert len({h.SOPInstanceUID for h in headers}) == 4
    assert len({h.StudyInstanceUID for h in headers}) == 2
    assert headers[0].PixelData == headers[2].PixelData  # same view, other study
    assert all(abs(p.stat().st_size - 0.25 * 2**20) < 0.05 * 2**20 for p in paths)


# --------------------------------------------------------------------------------------------
# Training layouts.


def test_mura_layout(tmp_path: Path) -> None:
    summary = write_mura_dataset(
        tmp_path,
        studies_per_type=4,
        abnormal_fraction=0.5,
        valid_fraction=0.25,
        min_size=40,
        max_size=72,
        seed=3,
    )
    top = tmp_path / "MURA-v1.1"
    on_disk = {p.relative_to(tmp_path).as_posix() for p in top.rglob("*.png")}
    listed: set[str] = set()
    patients: dict[str, set[str]] = {}
    for split in ("train", "valid"):
        images = (top / f"{split}_image_paths.csv").read_text().splitlines()
        assert len(images) == len(set(images))
        listed |= set(images)
        rows = list(csv.reader((top / f"{split}_labeled_studies.csv").open()))
        studies = {path: int(label) for path, label in rows}
        assert len(studies) == len(rows) and set(studies.values()) == {0, 1}
        for path, label in studies.items():
            assert re.fullmatch(
                rf"MURA-v1\.1/{split}/XR_[A-Z]+/patient\d{{5}}/study\d+_(positive|negative)/", path
            )
            assert label == (1 if path.endswith("_positive/") else 0)
        assert {image.rsplit("/", 1)[0] + "/" for image in images} == set(studies)
        patients[split] = {path.split("/")[3] for path in studies}
    assert on_disk == listed and len(listed) == summary.images
    assert not patients["train"] & patients["valid"]
    assert summary.train_studies == 21 and summary.valid_studies == 7
    with Image.open(tmp_path / sorted(listed)[0]) as image:
        assert image.mode == "L" and 40 <= max(image.size) <= 72


def test_labelled_dicom_dataset(tmp_path: Path) -> None:
    path = write_labelled_dicom_dataset(tmp_path, studies=3, rows=64, cols=48, seed=1)
    assert path.read_text().splitlines()[0] == "StudyInstanceUID,label"
    rows = list(csv.DictReader(path.open()))
    assert {r["label"] for r in rows} == {"0", "1"}
    for row in rows:
        files = list((tmp_path / row["StudyInstanceUID"]).glob("*.dcm"))
        assert 1 <= len(files) <= 4
        assert dcmread(files[0]).StudyInstanceUID == row["StudyInstanceUID"]


# --------------------------------------------------------------------------------------------
# Command line.


def test_cli_writes_studies_without_patient_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--out",
        str(tmp_path),
        "--studies",
        "2",
        "--rows",
        "64",
        "--cols",
        "48",
        "--body-part",
        "wrist",
        "--views",
        "2",
        "--encoding",
        "rle",
        "--seed",
        "5",
    ]
    assert main(["--", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 4
    names = {str(dcmread(f).PatientName) for f in files}
    assert not any(name in line for name in names for line in lines)
    assert {dcmread(f).file_meta.TransferSyntaxUID for f in files} == {ENCODINGS["rle"]}


def test_cli_through_triage_command_and_mura(tmp_path: Path) -> None:
    from triage.cli.main import main as triage_main

    code = triage_main(
        [
            "synth",
            "--",
            "--out",
            str(tmp_path),
            "--mura",
            "--studies",
            "2",
            "--body-part",
            "HAND",
            "--image-size",
            "32",
            "48",
        ]
    )
    assert code == 0
    assert (tmp_path / "MURA-v1.1" / "train_labeled_studies.csv").exists()
    assert {p.parent.parent.parent.name for p in tmp_path.rglob("*.png")} == {"XR_HAND"}


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "triage.testing.synth", "--list-encodings"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "explicit\t1.2.840.10008.1.2.1" in done.stdout


@pytest.mark.skipif(shutil.which("dcmcjpls") is None, reason="DCMTK dcmcjpls not on PATH")
def test_jpeg_ls_falls_back_to_dcmtk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pydicom's JPEG-LS encoder (pyjpegls), DCMTK writes JPEG-LS instead."""
    from triage.testing import synth

    monkeypatch.setattr(synth, "_pydicom_can", lambda uid: uid != ENCODINGS["jpeg-ls"])
    synth._probe_encodings.cache_clear()
    try:
        assert synth._writer("jpeg-ls") == "dcmtk"
        datasets = make_study(StudyType.FINGER, views=1, bits_stored=16, seed=4, **SMALL)
        (path,) = write_study(datasets, tmp_path, "jpeg-ls")
        back = dcmread(path)
        assert back.file_meta.TransferSyntaxUID == ENCODINGS["jpeg-ls"]
        assert np.array_equal(back.pixel_array, _pixels(datasets[0]))
    finally:
        synth._probe_encodings.cache_clear()


def test_cli_refuses_non_mura_parts_for_training_data(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--mura", "--body-part", "CHEST"])
    assert exit_info.value.code == 2
