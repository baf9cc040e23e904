"""CAM overlays (Secondary Capture) and parametric maps: valid, referenced, and showing the heat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tests.dicom_validate import (
    dciodvfy,
    display_of,
    make_radiograph,
    make_result,
    make_study,
    peaked_cam,
    require_tools,
    write_dataset,
)
from triage.dicom import colormap
from triage.dicom.pmap import (
    build_parametric_map,
    parametric_map_series_uid,
    parametric_map_sop_instance_uid,
)
from triage.dicom.sc import build_cam_overlay, overlay_sop_instance_uid
from triage.scoring.result import ModelInfo, StudyResult

VALIDATED = ModelInfo(name="densenet169-mura", version="1.2.0", validated=True)
UNVALIDATED = ModelInfo(name="densenet169-mura", version="1.2.0-rc1", validated=False)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
HOT_CELL = (1, 5)  # row, column on the 7×7 grid: upper right
COLD_CELL = (5, 1)  # lower left


@pytest.fixture(params=["CR", "DX"])
def study(request: pytest.FixtureRequest) -> list[pydicom.Dataset]:
    """Two left-wrist views: CR in MONOCHROME1, DX in MONOCHROME2."""
    photometric = "MONOCHROME1" if request.param == "CR" else "MONOCHROME2"
    return make_study(request.param, views=("PA", "LL"), photometric=photometric)


@pytest.fixture
def dx_study() -> list[pydicom.Dataset]:
    """The DX study alone, for what does not depend on the modality."""
    return make_study("DX", views=("PA", "LL"))


def _overlay(
    source: pydicom.Dataset, result: StudyResult, model: ModelInfo = VALIDATED, **kwargs: object
) -> pydicom.Dataset:
    view = next(v for v in result.views if v.sop_instance_uid == source.SOPInstanceUID)
    return build_cam_overlay(source, display_of(source), view, result, model, **kwargs)


def _validate(dataset: pydicom.Dataset, path: Path) -> None:
    require_tools("dciodvfy")
    result = dciodvfy(write_dataset(dataset, path))
    assert not result.errors, f"dciodvfy errors:\n{result.output}"
    print(result.output)  # the warnings, shown with -s or on a later failure


def _image_part(sc: pydicom.Dataset, source: pydicom.Dataset) -> np.ndarray:
    """The overlay's pixels below the label band (the band is added above the image)."""
    scale = sc.Columns / source.Columns
    rows = round(source.Rows * scale)
    return sc.pixel_array[sc.Rows - rows :]


def _heat(source: pydicom.Dataset, cam: np.ndarray) -> np.ndarray:
    """How far the overlay with *cam* departs from the plain radiograph, per pixel (0..765).

    The plain radiograph is the overlay of a CAM far below the threshold: nothing blended in.
    """
    images = [
        _image_part(_overlay(source, make_result([source], [grid])), source).astype(int)
        for grid in (cam, np.full_like(cam, -20.0))
    ]
    return np.abs(images[0] - images[1]).sum(axis=-1)


def _cell(image: np.ndarray, cell: tuple[int, int], grid: int = 7) -> np.ndarray:
    """The central half of one CAM cell's area of *image*."""
    rows, cols = image.shape[:2]
    r0, c0 = cell[0] * rows // grid, cell[1] * cols // grid
    h, w = rows // grid, cols // grid
    return image[r0 + h // 4 : r0 + 3 * h // 4, c0 + w // 4 : c0 + 3 * w // 4]


# --- secondary capture ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [VALIDATED, UNVALIDATED], ids=["validated", "unvalidated"])
def test_overlay_passes_dciodvfy(
    study: list[pydicom.Dataset], model: ModelInfo, tmp_path: Path
) -> None:
    result = make_result(study)
    for index, source in enumerate(study):
        _validate(_overlay(source, result, model), tmp_path / f"sc{index}.dcm")


def test_overlay_is_an_rgb_capture_of_the_view_in_the_study(study: list[pydicom.Dataset]) -> None:
    result = make_result(study)
    source = study[1]
    sc = _overlay(source, result)

    assert sc.SOPClassUID == SC_STORAGE
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.Modality == "OT"
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    assert (sc.BitsAllocated, sc.BitsStored) == (8, 8)
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.BurnedInAnnotation == "YES"
    assert sc.InstanceNumber == 2
    [reference] = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert sc.Laterality == "L"
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert "AI HEAT MAP" in sc.ImageComments


@pytest.mark.parametrize(("rows", "cols", "max_side"), [(1300, 1000, 512), (600, 900, 400)])
def test_longest_side_is_capped(rows: int, cols: int, max_side: int) -> None:
    source = make_study("DX", views=("PA",), rows=rows, cols=cols)[0]
    sc = _overlay(source, make_result([source]), max_side=max_side)
    assert max(sc.Rows, sc.Columns) <= max_side
    assert max(sc.Rows, sc.Columns) >= max_side - 2  # and the space is used


def test_small_display_is_not_upscaled() -> None:
    source = make_study("DX", views=("PA",), rows=360, cols=300)[0]
    sc = _overlay(source, make_result([source]), max_side=1024)
    assert sc.Columns == 300
    assert _image_part(sc, source).shape[:2] == (360, 300)
    assert sc.Rows > 360  # the label band above the image


@pytest.mark.parametrize("max_side", [1024, 256])  # as is, and shrunk to fit
def test_uint8_display_gives_the_float_displays_overlay(
    dx_study: list[pydicom.Dataset], max_side: int
) -> None:
    """The worker hands over the decoder's uint8 display image; tests mostly pass floats."""
    source = dx_study[0]
    result = make_result([source])
    grey = display_of(source)
    as_uint8 = np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
    view = result.views[0]
    from_float = build_cam_overlay(
        source, as_uint8 / 255.0, view, result, VALIDATED, max_side=max_side
    )
    from_uint8 = build_cam_overlay(source, as_uint8, view, result, VALIDATED, max_side=max_side)

    assert from_uint8.pixel_array.shape == from_float.pixel_array.shape
    difference = np.abs(from_uint8.pixel_array.astype(int) - from_float.pixel_array.astype(int))
    assert difference.max() <= 2  # rounding of the area average, at most one grey step blended
    assert difference.mean() < 0.5


def test_heat_is_stronger_where_the_cam_is_higher(study: list[pydicom.Dataset]) -> None:
    cam = peaked_cam(HOT_CELL, high=6.0, low=-1.0)
    cam[COLD_CELL] = -3.0
    heat = _heat(study[0], cam)
    assert _cell(heat, HOT_CELL).mean() > 60
    assert _cell(heat, COLD_CELL).mean() < 1  # below the threshold: the radiograph untouched


def test_mapping_is_fixed_not_stretched_per_image(dx_study: list[pydicom.Dataset]) -> None:
    """A weaker CAM of the same shape shows less heat (a per-image min–max would not)."""
    strong = _cell(_heat(dx_study[0], peaked_cam(HOT_CELL, high=6.0)), HOT_CELL).mean()
    weak = _cell(_heat(dx_study[0], peaked_cam(HOT_CELL, high=2.0)), HOT_CELL).mean()
    assert strong > 1.5 * weak > 0


def test_unvalidated_overlay_is_labelled_in_red(dx_study: list[pydicom.Dataset]) -> None:
    source = dx_study[0]
    result = make_result([source])
    unvalidated = _overlay(source, result, UNVALIDATED)
    validated = _overlay(source, result, VALIDATED)

    def red_label_pixels(sc: pydicom.Dataset) -> int:
        band = sc.pixel_array[: sc.Rows - _image_part(sc, source).shape[0]]
        r, g, b = (band[..., i].astype(int) for i in range(3))
        return int(np.count_nonzero((r > 180) & (g < 140) & (b < 140)))

    assert "NOT VALIDATED" in unvalidated.ImageComments
    assert "NOT VALIDATED" in unvalidated.SeriesDescription
    assert red_label_pixels(unvalidated) > 50
    assert "NOT VALIDATED" not in validated.ImageComments
    assert red_label_pixels(validated) == 0


def test_overlay_uids_are_deterministic(dx_study: list[pydicom.Dataset]) -> None:
    result = make_result(dx_study)
    one, two = _overlay(dx_study[0], result), _overlay(dx_study[0], result)
    other_view = _overlay(dx_study[1], result)
    revised = _overlay(dx_study[0], make_result(dx_study, revision=2))

    assert one.SOPInstanceUID == two.SOPInstanceUID
    assert one.SOPInstanceUID == overlay_sop_instance_uid(result, VALIDATED, result.views[0])
    assert other_view.SOPInstanceUID != one.SOPInstanceUID
    assert other_view.SeriesInstanceUID == one.SeriesInstanceUID  # one series per revision
    assert revised.SOPInstanceUID != one.SOPInstanceUID
    assert revised.SeriesInstanceUID != one.SeriesInstanceUID


@pytest.mark.parametrize(
    ("modality", "photometric"), [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")]
)
def test_outputs_of_a_synthetic_study_pass_dciodvfy(
    modality: str, photometric: str, tmp_path: Path
) -> None:
    """The same with the project's synthetic studies (14-bit DX, rescaled values), if present."""
    synth = pytest.importorskip("triage.testing.synth")
    study = synth.make_study(
        views=2, modality=modality, photometric=photometric, rows=256, cols=200
    )
    result = make_result(study)
    for index, source in enumerate(study):
        _validate(_overlay(source, result, UNVALIDATED), tmp_path / f"sc{index}.dcm")
    pm = build_parametric_map(study[0], result.views[0], result, UNVALIDATED)
    _validate(pm, tmp_path / "pm.dcm")


def test_left_and_right_views_get_separate_overlay_series() -> None:
    left = make_study("DX", views=("PA",), laterality="L")[0]
    right = make_radiograph(
        "DX", study_uid=left.StudyInstanceUID, laterality="R", instance_number=2
    )
    result = make_result([left, right])
    overlays = [_overlay(ds, result) for ds in (left, right)]
    assert [sc.Laterality for sc in overlays] == ["L", "R"]
    assert overlays[0].SeriesInstanceUID != overlays[1].SeriesInstanceUID


@pytest.mark.parametrize("laterality", ["U", "B", ""])
def test_outputs_without_orientation_or_side_pass_dciodvfy(laterality: str, tmp_path: Path) -> None:
    """CR may carry neither PatientOrientation nor a laterality; B and U are not one side."""
    source = make_study("CR", views=("PA",), laterality=laterality or "L")[0]
    del source.PatientOrientation
    if not laterality:
        del source.Laterality
    result = make_result([source])
    sc = _overlay(source, result)
    pm = build_parametric_map(source, result.views[0], result, VALIDATED)
    _validate(sc, tmp_path / "sc.dcm")
    _validate(pm, tmp_path / "pm.dcm")
    for dataset in (sc, pm):
        assert dataset.Laterality in (None, "")  # not one side: present, empty (Type 2C)


def test_bad_inputs_are_refused(dx_study: list[pydicom.Dataset]) -> None:
    result = make_result(dx_study)
    view = result.views[0]
    with pytest.raises(ValueError, match="different images"):
        build_cam_overlay(dx_study[1], display_of(dx_study[1]), view, result, VALIDATED)
    with pytest.raises(ValueError, match="colour map"):
        _overlay(dx_study[0], result, colormap="jet")
    with pytest.raises(ValueError, match="2-D"):
        build_cam_overlay(dx_study[0], np.zeros((4, 4, 3)), view, result, VALIDATED)


@pytest.mark.parametrize("name", colormap.NAMES)
def test_colour_maps_rise_in_lightness(name: str) -> None:
    table = colormap.lut(name).astype(float) / 255.0
    linear = np.where(table <= 0.04045, table / 12.92, ((table + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    assert table.shape == (256, 3)
    assert np.all(np.diff(luminance) >= -1e-3)
    assert luminance[-1] - luminance[0] > 0.7


# --- parametric map ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [VALIDATED, UNVALIDATED], ids=["validated", "unvalidated"])
def test_parametric_map_passes_dciodvfy(
    study: list[pydicom.Dataset], model: ModelInfo, tmp_path: Path
) -> None:
    result = make_result(study)
    pm = build_parametric_map(study[0], result.views[0], result, model)
    _validate(pm, tmp_path / "pm.dcm")


def test_parametric_map_matches_the_source_and_carries_the_cam(
    study: list[pydicom.Dataset],
) -> None:
    source = study[0]
    cam = peaked_cam(HOT_CELL, high=6.0, low=-1.0)
    result = make_result([source], [cam])
    pm = build_parametric_map(source, result.views[0], result, UNVALIDATED)

    assert pm.SOPClassUID == PM_STORAGE
    assert (pm.Rows, pm.Columns, int(pm.NumberOfFrames)) == (source.Rows, source.Columns, 1)
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    assert pm.SeriesInstanceUID != source.SeriesInstanceUID
    assert pm.ContentQualification == "RESEARCH"
    assert "NOT VALIDATED" in pm.SeriesDescription
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    [derivation] = frame.DerivationImageSequence
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130402", "DCM")

    values = pm.pixel_array.astype(np.float32)
    assert values.shape == (source.Rows, source.Columns)
    assert values.min() >= cam.min() - 1e-5 and values.max() <= cam.max() + 1e-5
    assert _cell(values, HOT_CELL).mean() > _cell(values, COLD_CELL).mean() + 3


def test_each_parametric_map_has_its_own_series_and_frame_of_reference(
    dx_study: list[pydicom.Dataset],
) -> None:
    result = make_result(dx_study)
    maps = [
        build_parametric_map(ds, view, result, VALIDATED)
        for ds, view in zip(dx_study, result.views, strict=True)
    ]
    assert maps[0].SeriesInstanceUID != maps[1].SeriesInstanceUID
    assert maps[0].FrameOfReferenceUID != maps[1].FrameOfReferenceUID
    assert {pm.FrameOfReferenceUID for pm in maps}.isdisjoint(
        {ds.get("FrameOfReferenceUID") for ds in dx_study}
    )


def test_parametric_map_uids_are_deterministic(dx_study: list[pydicom.Dataset]) -> None:
    result = make_result(dx_study)
    view = result.views[0]
    one = build_parametric_map(dx_study[0], view, result, VALIDATED)
    two = build_parametric_map(dx_study[0], view, result, VALIDATED)
    revised_result = make_result(dx_study, revision=2)
    revised = build_parametric_map(dx_study[0], revised_result.views[0], revised_result, VALIDATED)

    assert one.SOPInstanceUID == two.SOPInstanceUID
    assert one.SOPInstanceUID == parametric_map_sop_instance_uid(result, VALIDATED, view)
    assert one.SeriesInstanceUID == parametric_map_series_uid(result, VALIDATED, view)
    assert one.FrameOfReferenceUID == two.FrameOfReferenceUID
    assert revised.SOPInstanceUID != one.SOPInstanceUID


@pytest.mark.parametrize("validated", [True, False])
def test_label_is_drawn_as_one_pil_drawing_and_sized_for_the_models_labels(validated: bool) -> None:
    # The font size is settled per model and view size (digits as 0, either finding) and the
    # lines drawn per text; the band must be what drawing every line at once with PIL gives.
    from PIL import Image, ImageDraw

    from triage.dicom import sc

    model = VALIDATED if validated else UNVALIDATED
    for probability, study_p in ((0.03, 0.12), (0.97, 0.88), (0.5, 0.51)):
        lines = [
            f"AI HEAT MAP (class activation) - {model.name} {model.version}",
            f"view p={probability:.2f}   study p={study_p:.2f} (threshold 0.50): finding",
        ] + ([] if validated else ["NOT VALIDATED - NOT FOR DIAGNOSIS"])
        for shape in ((1024, 819), (700, 1024), (2000, 300)):
            font, band, room = sc._label_font(lines, model, shape, 1024)
            # The layout's size (digits as 0, either finding) unless the real text needs less.
            layout = sc._layout_font_size(model, *shape, 1024)
            assert font.size <= layout and band <= room == sc._band_of(layout, len(lines))
            # 9 px is the floor: a very narrow view gets a wider canvas (_label_canvas).
            assert font.size == 9 or sc._label_fits(tuple(lines), font.size, *shape, 1024)
            if font.size < layout:
                assert not sc._label_fits(tuple(lines), font.size + 1, *shape, 1024)
            cols = 640
            rgb = np.zeros((band + 8, cols, 3), np.uint8)
            sc._draw_label(rgb, lines, font, band, warned=0 if validated else 1)
            joint = Image.new("RGB", (cols, band))
            draw = ImageDraw.Draw(joint)
            size, margin = font.size, sc._margin(font.size)
            for index, text in enumerate(lines):
                red = not validated and index == len(lines) - 1
                colour = sc._LABEL_WARNING if red else sc._LABEL_TEXT
                draw.text((margin, margin + index * (size + margin)), text, fill=colour, font=font)
            assert np.array_equal(rgb[:band], np.asarray(joint))


# --- heat computation -------------------------------------------------------------------------


@pytest.mark.parametrize("smooth", [True, False], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("grid", "rows", "cols"), [((7, 7), 935, 748), ((7, 9), 64, 1000), ((5, 3), 3, 2)]
)
def test_upsampling_is_pils_resize(
    smooth: bool, grid: tuple[int, int], rows: int, cols: int
) -> None:
    from PIL import Image

    from triage.dicom.sc import upsample

    values = np.random.default_rng(3).normal(0.0, 3.0, grid).astype(np.float32)
    method = Image.Resampling.BICUBIC if smooth else Image.Resampling.BILINEAR
    expected = np.asarray(Image.fromarray(values).resize((cols, rows), method))
    got = upsample(values, rows, cols, smooth=smooth)
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.93, 0.0, 1.0])
def test_heat_steps_are_the_heat_level_in_256_steps(threshold: float) -> None:
    from triage.dicom.sc import heat_steps, local_logits, upsample
    from triage.scoring.result import ViewResult

    cam = np.random.default_rng(4).normal(0.0, 4.0, (7, 7)).astype(np.float32)
    view = ViewResult("1.2.3.4", 0.7, cam)
    # The definition, directly in float64: local probability, its level above the threshold.
    probability = 1.0 / (1.0 + np.exp(-upsample(local_logits(view), 300, 240).astype(np.float64)))
    t = min(threshold, 0.99)
    level = np.clip((probability - t) / (1.0 - t), 0.0, 1.0)
    reference = np.rint(level * 255.0).astype(int)
    steps = heat_steps(view, 300, 240, threshold)
    assert steps.dtype == np.uint8 and steps.shape == (300, 240)
    assert np.abs(steps.astype(int) - reference).max() <= 1
    assert np.mean(steps != reference) < 0.01  # off by one only at a step's edge
    assert ((steps == 0) == (reference == 0)).mean() > 0.99  # below the threshold stays clear


@pytest.mark.parametrize("model", [VALIDATED, UNVALIDATED], ids=["validated", "unvalidated"])
@pytest.mark.parametrize("view_shape", [(2560, 2048), (1800, 2400), (3000, 600)])
def test_a_display_made_for_the_overlay_box_is_drawn_as_it_is(
    dx_study: list[pydicom.Dataset], model: ModelInfo, view_shape: tuple[int, int]
) -> None:
    # What decode_view makes for OverlayBox fills the overlay under its label without a second
    # resampling, and the overlay stays within max_side, for either finding.
    from triage.dicom.sc import OverlayBox
    from triage.scoring.preprocess import _fitted_size

    box = OverlayBox(model, 1024)(*view_shape)
    size = _fitted_size(view_shape, box)
    display = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
    flat = np.zeros((7, 7), np.float32)
    for probability in (0.02, 0.98):  # normal, and abnormal (a longer label)
        result = make_result(dx_study[:1], [flat], probabilities=[probability])
        overlay = build_cam_overlay(
            dx_study[0], display, result.views[0], result, model, view_shape=view_shape
        )
        rgb = overlay.pixel_array
        assert max(rgb.shape[:2]) <= 1024
        # A tall view's image is narrower than its label: centred on a wider canvas.
        assert rgb.shape[1] == size[1] or (size[1] < 256 and rgb.shape[1] > size[1])
        if probability < result.threshold:  # no heat anywhere: the grey shows as it is
            left = (rgb.shape[1] - size[1]) // 2
            image = rgb[rgb.shape[0] - size[0] :, left : left + size[1]]
            assert np.array_equal(image[..., 0], display)
            assert np.array_equal(image[..., 2], display)


@pytest.mark.parametrize("logit", [-40.0, 40.0])
def test_the_bias_is_the_views_own_logit_where_a_probability_saturates(logit: float) -> None:
    # Beyond about ±14 the bias cannot be recovered from the probability (clipped away from
    # 0 and 1; float32 rounds it to 1 past +16.6): a confident normal view got heat, a
    # confident abnormal one lost it.
    from triage.dicom.sc import classifier_bias, heat_steps, local_logits
    from triage.scoring.result import ViewResult

    cam = np.random.default_rng(6).normal(0.0, 2.0, (7, 7)).astype(np.float32)
    bias = logit - float(cam.mean())
    probability = float(torch.sigmoid(torch.tensor(logit, dtype=torch.float32)))
    assert not 1e-6 < probability < 1 - 1e-6  # past what logit(probability) recovered
    view = ViewResult("1.2.3.4", probability, cam, logit=logit)
    assert classifier_bias(view) == pytest.approx(bias, abs=1e-5)
    np.testing.assert_allclose(local_logits(view), cam + np.float32(bias), rtol=1e-6)
    steps = heat_steps(view, 140, 112, 0.5)
    assert steps.all() if logit > 0 else not steps.any(), "every cell is far from 0.5"


def test_the_overlay_carries_the_sources_whole_patient_and_study_identity(
    dx_study: list[pydicom.Dataset], tmp_path: Path
) -> None:
    # An archive that reconciles by IssuerOfPatientID or other IDs files the overlay with the
    # same patient record as the SR, which carries them all.
    source = dx_study[0]
    source.IssuerOfPatientID = "SGH"
    other = pydicom.Dataset()
    other.PatientID = "MPI-0042"
    other.IssuerOfPatientID = "REGIONAL MPI"
    other.TypeOfPatientID = "TEXT"
    source.OtherPatientIDsSequence = [other]
    source.PatientAge = "047Y"
    source.PatientWeight = "71.5"
    source.PatientComments = "left-handed"
    source.StudyDescription = "XR WRIST 3V LT"
    procedure = pydicom.Dataset()
    procedure.CodeValue = "XRWRIST3"
    procedure.CodingSchemeDesignator = "99SGH"
    procedure.CodeMeaning = "XR WRIST 3+ VIEWS"
    source.ProcedureCodeSequence = [procedure]
    sc = _overlay(source, make_result(dx_study))
    for element in source:
        if element.tag.group == 0x0010:
            assert str(sc[element.tag].value) == str(element.value), element.keyword
    assert sc.StudyDescription == "XR WRIST 3V LT"
    assert sc.ProcedureCodeSequence[0].CodeValue == "XRWRIST3"
    _validate(sc, tmp_path / "sc.dcm")


@pytest.mark.parametrize(
    ("study_p", "threshold", "shown"),
    [
        (0.503, 0.5, "study p=0.503 (threshold 0.500): ABNORMAL"),
        (0.5, 0.5, "study p=0.50 (threshold 0.50): normal"),
        (0.82, 0.5, "study p=0.82 (threshold 0.50): ABNORMAL"),
        (0.4951, 0.495, "study p=0.4951 (threshold 0.4950): ABNORMAL"),
    ],
)
def test_the_label_never_shows_a_probability_equal_to_the_threshold_it_is_above(
    study_p: float, threshold: float, shown: str
) -> None:
    from triage.dicom.sc import _label_text

    lines = _label_text(VALIDATED, 0.7, study_p, threshold, study_p > threshold)
    assert lines[1].endswith(shown)


@pytest.mark.parametrize(
    ("given", "copied", "cosines"),
    [
        (["A", "FL"], ["A", "FL"], [0.0, -1.0, 0.0, 0.0, 0.0, -1.0]),
        (["p", "f"], ["P", "F"], [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),  # CS is upper case
        (["L", "R"], ["L", "R"], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),  # not orthogonal: default
        (["X", "Y"], None, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        (["A"], None, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
    ],
)
def test_patient_orientation_is_read_the_same_by_every_output(
    given: list[str], copied: list[str] | None, cosines: list[float], tmp_path: Path
) -> None:
    """The overlay copies a valid PatientOrientation (else leaves it empty) and the
    parametric map's direction cosines follow its dominant letters; both stay valid."""
    source = make_study("DX", views=("PA",))[0]
    source.PatientOrientation = given
    result = make_result([source])
    sc = _overlay(source, result)
    pm = build_parametric_map(source, result.views[0], result, VALIDATED)
    assert (list(sc.PatientOrientation) if sc.PatientOrientation else None) == copied
    plane = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in plane.ImageOrientationPatient] == cosines
    _validate(sc, tmp_path / "sc.dcm")
    _validate(pm, tmp_path / "pm.dcm")


def _label_band_rows(pixels: np.ndarray) -> int:
    """Rows of an overlay's label band, for an image of uniform grey (centred): the band
    ends with a margin of black rows, and no image row is black in the middle."""
    middle = pixels[:, pixels.shape[1] // 2].max(axis=1)
    return int(np.flatnonzero(middle == 0).max()) + 1


@pytest.mark.parametrize(
    ("rows", "cols", "max_side", "model"),
    [
        (2800, 600, 1024, UNVALIDATED),  # tall: the image gets about 200 columns
        (64, 64, 1024, UNVALIDATED),  # small: never upscaled
        (300, 200, 1024, VALIDATED),
        (2800, 600, 128, UNVALIDATED),  # not even the widened canvas fits: lines wrapped
    ],
)
def test_a_narrow_overlay_keeps_its_whole_label(
    rows: int, cols: int, max_side: int, model: ModelInfo, tmp_path: Path
) -> None:
    """The label used to be cut at the right edge (the finding read "ABNOR") when the image
    was narrower than the label at its smallest font: the canvas is widened, up to max_side,
    and beyond that the lines are wrapped; the image is never cut or stretched."""
    from triage.dicom import sc as sc_module

    source = make_radiograph("DX", study_uid=pydicom.uid.generate_uid(), rows=rows, cols=cols)
    result = make_result([source], probabilities=[0.9], threshold=0.5)
    grey = np.full((rows, cols), 128, np.uint8)
    overlay = build_cam_overlay(source, grey, result.views[0], result, model, max_side=max_side)
    assert max(overlay.Rows, overlay.Columns) <= max_side
    lines = sc_module._label_lines(result.views[0], result, model)
    font = sc_module._font(9)
    needed = max(font.getlength(text) for text in lines) + 2 * sc_module._margin(9)
    pixels = overlay.pixel_array
    band = _label_band_rows(pixels)
    # Nothing of the label touches the right margin: no text ran off the canvas.
    assert not pixels[:band, -sc_module._margin(9) :].any()
    if needed <= max_side:
        assert overlay.Columns >= needed
    else:
        assert overlay.Columns == max_side
        assert band > sc_module._band_of(9, len(lines))  # more lines than the label has
    # Red (the warning) appears only for an unvalidated model.
    red = (pixels[:band, :, 0] > 150) & (pixels[:band, :, 1] < 100)
    assert red.any() == (not model.validated)
    assert "canvas widened for the label" in overlay.DerivationDescription
    _validate(overlay, tmp_path / "sc.dcm")


@pytest.mark.parametrize(
    ("attributes", "aspect"),
    [
        ({"ImagerPixelSpacing": [0.2, 0.1]}, [2, 1]),
        ({"PixelSpacing": [0.15, 0.1], "ImagerPixelSpacing": [0.1, 0.1]}, [3, 2]),
        ({"ImagerPixelSpacing": [0.143, 0.143]}, None),
        ({"ImagerPixelSpacing": [0.0, 0.1]}, None),  # not a spacing: unknown, not 0:1
        ({"PixelAspectRatio": [4, 3]}, [4, 3]),
    ],
)
def test_an_overlay_of_non_square_pixels_keeps_their_aspect(
    attributes: dict[str, list[float]], aspect: list[int] | None, tmp_path: Path
) -> None:
    """The overlay is resampled alike along both axes, so its pixels have the source's
    shape; without PixelAspectRatio a viewer showed it squashed next to the source."""
    source = make_study("DX", views=("PA",))[0]
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        if keyword in source:
            delattr(source, keyword)
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    sc = _overlay(source, make_result([source]))
    assert (list(sc.PixelAspectRatio) if "PixelAspectRatio" in sc else None) == aspect
    _validate(sc, tmp_path / "sc.dcm")


@pytest.mark.parametrize("how", ["attribute", "transfer syntax"])
def test_an_overlay_of_a_lossy_compressed_view_says_so(how: str, tmp_path: Path) -> None:
    # PS3.3 C.7.6.1.1.5: once 01, Lossy Image Compression stays 01 in derived images.
    [source] = make_study("DX", views=("PA",), rows=96, cols=80)
    display = display_of(source)
    if how == "attribute":
        source.LossyImageCompression = "01"
        source.LossyImageCompressionRatio = 12.5
        source.LossyImageCompressionMethod = "ISO_10918_1"
    else:  # a CR may say nothing: its JPEG Baseline transfer syntax does
        del source.LossyImageCompression
        source.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    result = make_result([source])
    view = result.views[0]
    outputs = {
        "sc": build_cam_overlay(source, display, view, result, VALIDATED),
        "pm": build_parametric_map(source, view, result, VALIDATED),
    }
    for kind, output in outputs.items():
        assert output.LossyImageCompression == "01", kind
        assert output.LossyImageCompressionMethod == "ISO_10918_1", kind
        _validate(output, tmp_path / f"{kind}.dcm")
