"""CAM overlays: each scored view with the model's class activation map as a heat map, as an
RGB Secondary Capture in the source study, with the label burned in.

How the heat is computed: one fixed mapping for every image (a per-image min–max stretch would
make the faintest evidence in a normal view glow as brightly as a fracture):

- The CAM is in logit units and its spatial mean plus the classifier bias is the view's logit
  (see :class:`~triage.scoring.result.ViewResult`), so the bias is recovered from the view's
  probability: ``bias = logit(p) - mean(cam)``. ``cam + bias`` is a *local logit*: the logit
  the model would give if the whole image looked like that spot.
- The CAM grid (e.g. 7×7) is upsampled bicubically to the image in logit space and turned into
  a *local probability* ``sigmoid(cam + bias)``.
- Only evidence above the study's operating point is drawn: the heat level is
  ``(local probability - threshold) / (1 - threshold)``, clipped to 0..1. It picks the colour
  from a perceptual map (:mod:`triage.dicom.colormap`) and the blending opacity
  ``opacity × level``, so below the threshold the radiograph shows through untouched and
  *opacity* is the most the overlay ever covers.

The label (AI heat map, model, view and study probability, NOT VALIDATED when so) is drawn on
a black band added above the image, so it hides no anatomy.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
import torch
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from triage.dicom import colormap as colormaps
from triage.dicom.geometry import patient_orientation, pixel_aspect_ratio, scored_frames
from triage.dicom.source_header import declare_character_set, header_for_outputs
from triage.dicom.sr import (
    MANUFACTURER,
    laterality_of,
    series_description,
    software_versions,
)
from triage.scoring.result import (
    ModelInfo,
    StudyResult,
    ViewResult,
    output_identity,
    shown_decimals,
)
from triage.uids import derived_uid

#: Series number of the overlays (the SR is 9900).
SC_SERIES_NUMBER = 9901

_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
# Probabilities are clipped away from 0 and 1 so their logit stays finite.
_P_EPS = 1e-6
_LABEL_BACKGROUND = (0, 0, 0)
_LABEL_TEXT = (255, 255, 255)
_LABEL_WARNING = (255, 80, 80)


#: General Study module attributes copied from the source beyond what highdicom copies.
_STUDY_ATTRIBUTES = (
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    "ReferencedStudySequence",
    "AdmittingDiagnosesDescription",
)


#: General Image attributes that an image derived from a lossy-compressed one carries over.
_LOSSY_ATTRIBUTES = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def _copy_patient_and_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Every Patient module attribute (group 0010) and the study attributes of the source
    that *target* lacks: highdicom copies only the core ones, and an overlay filed without
    the source's IssuerOfPatientID or OtherPatientIDsSequence may be reconciled to another
    patient record than its SR by an archive that keys on them."""
    for element in source:
        if element.tag.group == 0x0010 and element.tag not in target:
            target.add(deepcopy(element))
    for keyword in _STUDY_ATTRIBUTES:
        if keyword in source and keyword not in target:
            target.add(deepcopy(source[keyword]))


def classifier_bias(view: ViewResult) -> float:
    """The classifier bias, recovered from the view: its logit minus the CAM's mean.

    The logit is the model's own when the view carries it; ``logit(probability)`` (clipped
    to ±13.8) only stands in for it, exactly only while the view's logit is within that.
    """
    cam = np.asarray(view.cam, dtype=np.float64)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"CAM of view {view.sop_instance_uid} is not a 2-D grid: {cam.shape}")
    if view.logit is not None:
        return float(view.logit) - float(cam.mean())
    p = min(max(float(view.probability), _P_EPS), 1.0 - _P_EPS)
    return math.log(p / (1.0 - p)) - float(cam.mean())


def local_logits(view: ViewResult) -> np.ndarray:
    """The view's CAM plus the classifier bias: per-cell logits, float32 on the CAM grid."""
    return (np.asarray(view.cam, dtype=np.float64) + classifier_bias(view)).astype(np.float32)


def upsample(grid: np.ndarray, rows: int, cols: int, *, smooth: bool = True) -> np.ndarray:
    """*grid* (2-D) resampled to ``rows × cols`` float32, cell centres on pixel-area centres.

    *smooth* uses bicubic interpolation (no visible cell seams; may overshoot the grid's range
    slightly), otherwise bilinear (values stay within the range of neighbouring cells). The
    kernels are PIL's; the resampling is separable, so it is done as two small matrix products
    (``W_rows @ grid @ W_cols.T``) rather than by PIL over the whole output: ~0.4 ms instead
    of ~2 ms for a 7×7 CAM onto a 1024-px overlay, equal to PIL's result within float32
    rounding (tested).
    """
    values = np.asarray(grid, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D grid, got shape {values.shape}")
    method = Image.Resampling.BICUBIC if smooth else Image.Resampling.BILINEAR
    across = _resampling_matrix(values.shape[1], int(cols), method)  # cols × grid columns
    down = _resampling_matrix(values.shape[0], int(rows), method)  # rows × grid rows
    # torch's product, not numpy's: numpy's BLAS starts a thread per core for an image-sized
    # product and its threads then spin, taking a decode process's CPU from everything else
    # (the scoring path's decode process went from 46 to 80 ms of CPU per view); torch
    # keeps to the threads the process set (one in a decode process).
    return (down @ (torch.tensor(values) @ across.T)).numpy()


@functools.lru_cache(maxsize=64)
def _resampling_matrix(size_in: int, size_out: int, method: Image.Resampling) -> torch.Tensor:
    """PIL's 1-D resampling of *size_in* samples to *size_out* as a (size_out × size_in)
    float32 matrix: column *i* is what PIL makes of a unit impulse at sample *i* (its kernel,
    support and edge handling, whatever they are). Shared between calls: never written to."""
    impulses = np.eye(size_in, dtype=np.float32)  # row i: an impulse at column i
    spread = np.array(Image.fromarray(impulses).resize((size_out, size_in), method))
    return torch.from_numpy(np.ascontiguousarray(spread.T, dtype=np.float32))


def heat_steps(view: ViewResult, rows: int, cols: int, threshold: float) -> np.ndarray:
    """The heat level of *view* at ``rows × cols`` in 256 steps (uint8, 0 = no heat).

    The level is ``(p − t) / (1 − t)`` clipped to 0..1, where ``p = sigmoid(CAM + bias)`` is
    the local probability (CAM upsampled bicubically in logit space) and ``t`` the threshold
    (at most 0.99). Computed in five passes over the image: with ``sigmoid(z) = (1 +
    tanh(z / 2)) / 2`` the step is ``A·tanh(z / 2) + B`` rounded and clipped, ``A = 127.5 /
    (1 − t)``, ``B = 255·(0.5 − t) / (1 − t)``; tanh also never overflows. Within one step of
    the definition computed directly in float64 (tested).
    """
    threshold = min(max(float(threshold), 0.0), 0.99)
    half = upsample(local_logits(view) * np.float32(0.5), rows, cols, smooth=True)
    np.tanh(half, out=half)
    half *= np.float32(127.5 / (1.0 - threshold))
    half += np.float32(255.0 * (0.5 - threshold) / (1.0 - threshold) + 0.5)
    np.clip(half, 0.0, 255.0, out=half)
    return half.astype(np.uint8)


def blend(
    grey: np.ndarray,
    level: np.ndarray,
    *,
    opacity: float,
    colormap: str = colormaps.DEFAULT,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """*grey* (uint8, or float 0..1) with *level* (0..1, or its 256 steps as uint8, see
    :func:`heat_steps`) coloured over it at ``opacity × level``.

    Returns uint8 RGB, written into *out* when given (``grey.shape + (3,)``, uint8,
    C-contiguous). Both are quantised to 256 steps (the output's and the colour map's
    resolution) and every pixel is one lookup in a 256 × 256 table of blended colours: no
    float work on three channels per pixel.
    """
    table = _blend_table(float(opacity), colormap)
    key = (grey if grey.dtype == np.uint8 else _steps(grey)).astype(np.uint16)
    key <<= 8
    key |= level if level.dtype == np.uint8 else _steps(level)
    # take() gathers whole rows of the table: about 3× faster than table[key].
    return np.take(table, key, axis=0, out=out)


def _steps(values: np.ndarray) -> np.ndarray:
    """*values* in 0..1 (clipped) as 0..255 uint8, rounded."""
    scaled = np.multiply(values, np.float32(255.0), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _blend_table(opacity: float, colormap: str) -> np.ndarray:
    """``table[grey << 8 | level]``: the blended RGB of a grey step under a heat step."""
    steps = np.arange(colormaps.SIZE, dtype=np.float64) / (colormaps.SIZE - 1)
    alpha = opacity * steps  # per heat step
    colour = colormaps.lut(colormap).astype(np.float64) / 255.0
    grey = steps[:, None, None]
    blended = grey * (1.0 - alpha)[None, :, None] + (colour * alpha[:, None])[None, :, :]
    table = np.rint(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, 3)
    table.flags.writeable = False
    return table


def overlay_series_uid(result: StudyResult, model: ModelInfo, laterality: str = "") -> str:
    """SeriesInstanceUID of the overlays of one laterality ("" when unknown) of a revision.

    Laterality is a series attribute, so a study with left and right views gets two series.
    """
    return derived_uid(
        result.study_uid,
        result.revision,
        output_identity(result, model),
        "sc",
        "series",
        laterality,
    )


def overlay_sop_instance_uid(result: StudyResult, model: ModelInfo, view: ViewResult) -> str:
    """SOPInstanceUID of the overlay of *view* (the same on every rebuild)."""
    return derived_uid(
        result.study_uid,
        result.revision,
        output_identity(result, model),
        "sc",
        view.sop_instance_uid,
    )


def build_cam_overlay(
    source: pydicom.Dataset,
    display: np.ndarray,
    view: ViewResult,
    result: StudyResult,
    model: ModelInfo,
    *,
    opacity: float = 0.4,
    max_side: int = 1024,
    colormap: str = colormaps.DEFAULT,
    series_number: int = SC_SERIES_NUMBER,
    instance_number: int | None = None,
    created: datetime.datetime | None = None,
    view_shape: tuple[int, int] | None = None,
) -> hd.sc.SCImage:
    """The CAM overlay of one view as an RGB 8-bit Secondary Capture image.

    *display* is the view as displayed (2-D uint8, or float 0..1; after the Modality/VOI LUTs,
    with MONOCHROME1 inverted), at any resolution with the source's aspect ratio; the result's
    longest side is at most *max_side* (never upscaled), label band included. *opacity* is the
    most the heat ever covers the image; *colormap* is one of :data:`colormap.NAMES`.
    *instance_number* defaults to the view's position in *result*. The label says it is an AI
    heat map, with the view's and the study's probability, and NOT VALIDATED for an
    unvalidated model. *view_shape* is the size of the decoded view (default: the display's):
    a display made to fit :class:`OverlayBox` for that size is used as is, any other is
    resampled (area-averaged) to fit.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0..1, not {opacity}")
    if max_side < 128:
        raise ValueError(f"max_side {max_side} is too small for a readable overlay")
    if np.ndim(display) != 2 or min(np.shape(display)) < 1:
        raise ValueError(f"display must be a 2-D image, not shape {np.shape(display)}")
    colormaps.lut(colormap)  # an unknown name fails here, before any pixel work
    if str(source.SOPInstanceUID) != view.sop_instance_uid:
        raise ValueError("source and view are different images")
    if str(source.StudyInstanceUID) != result.study_uid:
        raise ValueError(f"source is not in study {result.study_uid}")
    if instance_number is None:
        instance_number = _view_position(result, view)

    lines = _label_lines(view, result, model)
    layout_shape = view_shape if view_shape is not None else np.shape(display)
    font, band, room = _label_font(lines, model, layout_shape, max_side)
    grey = _fit(display, max_side - room, max_side)  # as is when decoded to fit OverlayBox
    rows, cols = grey.shape
    # A narrow view (a tall one, a small one) leaves the label less width than its smallest
    # font needs: the canvas is widened for it, and as a last resort the lines are wrapped.
    width, drawn_lines, warned = _label_canvas(lines, font, cols, max_side, not model.validated)
    if len(drawn_lines) != len(lines):
        band = _band_of(int(getattr(font, "size", 11)), len(drawn_lines))
        grey = _fit(grey, max_side - band, width)
        rows, cols = grey.shape
    level = heat_steps(view, rows, cols, result.threshold)
    if width == cols:
        # The image is blended straight into the rows under the label band of the output.
        rgb = np.empty((band + rows, cols, 3), np.uint8)  # the blend and the band fill it all
        blend(grey, level, opacity=opacity, colormap=colormap, out=rgb[band:])
    else:
        rgb = np.full((band + rows, width, 3), _LABEL_BACKGROUND, np.uint8)
        left = (width - cols) // 2
        rgb[band:, left : left + cols] = blend(grey, level, opacity=opacity, colormap=colormap)
    _draw_label(rgb, drawn_lines, font, band, warned=warned)

    laterality = laterality_of(source)
    series_laterality = laterality if laterality in ("R", "L") else ""
    created = created or datetime.datetime.now()
    description = series_description("heat map", result, model)
    if series_laterality:
        description = f"{description} {series_laterality}"[:64]
    # The patient and study come from a repaired copy of the header (see build_sr).
    header = header_for_outputs(source, also=(*lines, description))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=overlay_series_uid(result, model, series_laterality),
        series_number=series_number,
        sop_instance_uid=overlay_sop_instance_uid(result, model, view),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        laterality=series_laterality or None,
        # highdicom only takes single-letter orientations; the source's own value replaces it
        # below (no flips or rotations happen here, so the orientation is the source's).
        patient_orientation=_single_letter_orientation(source),
        manufacturer_model_name="msk-triage",
        software_versions=software_versions(model, header),
        series_description=description,
        content_date=created.date(),
        content_time=created.time(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        # Declared below, once the text it must encode is all there.
        specific_character_set=None,
    )
    _copy_patient_and_study(header, sc)
    # No flips or rotations happen here: the source's orientation holds, where it is valid;
    # otherwise empty, as the SC module allows (Type 2C).
    directions = patient_orientation(header)
    sc.PatientOrientation = list(directions) if directions else None
    aspect = pixel_aspect_ratio(header)
    if aspect is not None:  # resampled alike along both axes: the source's pixel shape holds
        sc.PixelAspectRatio = list(aspect)
    set_series_laterality(sc, laterality)
    if header.get("BodyPartExamined"):
        sc.BodyPartExamined = header.BodyPartExamined
    sc.BurnedInAnnotation = "YES"
    if header.get("LossyImageCompression") == "01":
        # PS3.3 C.7.6.1.1.5: once lossy, every image derived from it says so.
        for keyword in _LOSSY_ATTRIBUTES:
            if header.get(keyword):
                sc[keyword] = deepcopy(header[keyword])
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = "; ".join(lines)
    sc.DerivationDescription = (
        f"Class activation map of {model.name} {model.version}: sigmoid(CAM + bias) above "
        f"threshold {result.threshold:.2f}, bicubic upsampling, blended at up to "
        f"{opacity:.0%} opacity, colour map {colormap}, label band added above the image"
        + (", canvas widened for the label" if width > cols else "")
    )[:1024]
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frames = scored_frames(source)
    if frames:
        reference.ReferencedFrameNumber = frames[0]
    reference.PurposeOfReferenceCodeSequence = [_SOURCE_PURPOSE]
    sc.SourceImageSequence = [reference]
    declare_character_set(sc, header)
    return sc


def set_series_laterality(dataset: pydicom.Dataset, laterality: str) -> None:
    """General Series Laterality (Type 2C, for paired body parts) from a view's laterality.

    R or L as is, otherwise present and empty: every MURA body part is paired, so the
    attribute is required, and it cannot express both sides (B); U on an upper extremity
    means the side is not known.
    """
    dataset.Laterality = laterality if laterality in ("R", "L") else None


def _fit(display: np.ndarray, max_rows: int, max_cols: int) -> np.ndarray:
    """*display* downsampled (area-averaged) to fit max_rows × max_cols.

    uint8 stays uint8 (the decoder's display image: no float pass over it); anything else
    becomes float32 0..1.
    """
    grey = np.asarray(display)
    if grey.dtype != np.uint8:
        grey = np.clip(np.nan_to_num(grey.astype(np.float32), nan=0.0), 0.0, 1.0)
    rows, cols = grey.shape
    scale = min(max_rows / rows, max_cols / cols)
    if scale >= 1.0:
        return grey
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    # BOX averages every source pixel into the output: no aliasing of fine trabeculae.
    shrunk = np.asarray(
        Image.fromarray(np.ascontiguousarray(grey)).resize(size, Image.Resampling.BOX)
    )
    return shrunk if shrunk.dtype == np.uint8 else np.clip(shrunk, 0.0, 1.0)


def _label_lines(view: ViewResult, result: StudyResult, model: ModelInfo) -> list[str]:
    return _label_text(
        model, view.probability, result.probability, result.threshold, result.abnormal
    )


def _label_text(
    model: ModelInfo, view_p: float, study_p: float, threshold: float, abnormal: bool
) -> list[str]:
    finding = "ABNORMAL" if abnormal else "normal"
    # The threshold as the card gives it (up to 4 decimals), the probability beside it.
    given = len(f"{threshold:.4f}".rstrip("0").partition(".")[2])
    digits = shown_decimals(study_p, threshold, max(2, given))
    lines = [
        f"AI HEAT MAP (class activation) - {model.name} {model.version}",
        f"view p={view_p:.2f}   study p={study_p:.{digits}f} (threshold {threshold:.{digits}f}): "
        f"{finding}",
    ]
    if not model.validated:
        lines.append("NOT VALIDATED - NOT FOR DIAGNOSIS")
    return lines


@dataclass(frozen=True)
class OverlayBox:
    """The largest (rows, columns) the radiograph may take in an overlay of *model*'s results
    whose longest side is *max_side*, for a view of ``rows × columns``: called with the view's
    size. Picklable, so a decode process can make the display image at its final size (see
    :func:`~triage.scoring.preprocess.decode_view`) and the overlay needs no second resampling.
    """

    model: ModelInfo
    max_side: int

    def __call__(self, rows: int, columns: int) -> tuple[int, int]:
        """``(max_side - label band, max_side)`` for a view of ``rows × columns``."""
        size = _layout_font_size(self.model, int(rows), int(columns), self.max_side)
        return self.max_side - _band_of(size, _line_count(self.model)), self.max_side


def _line_count(model: ModelInfo) -> int:
    return len(_label_text(model, 0.0, 0.0, 0.0, False))


def _layout_font_size(model: ModelInfo, rows: int, columns: int, max_side: int) -> int:
    """The label's font size before its probabilities are known: the largest that fits the
    model's label with every digit 0, for either finding. It sets the band the image makes
    room for; a label whose real digits are wider is drawn smaller, in the same room."""
    return min(
        _label_font_size(
            tuple(_DIGIT.sub("0", line) for line in _label_text(model, 0.0, 0.0, 0.0, abnormal)),
            rows,
            columns,
            max_side,
        )
        for abnormal in (True, False)
    )


def _label_font(
    lines: list[str], model: ModelInfo, shape: tuple[int, ...], max_side: int
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int, int]:
    """The label's font, its band height, and the band height the image makes room for.

    The font is the largest (9..36 px) whose longest line fits the output width. The band
    takes rows from *max_side*, which can narrow the image, so the size is settled by
    shrinking until the text fits the width the image gets with that band. The layout is
    settled for the model's label with every digit 0 (labels of one model differ only in
    their probabilities and finding; remembered per view size), and the real lines are
    checked against it and drawn smaller in the same room if their digits are wider.
    """
    rows, cols = int(shape[0]), int(shape[1])
    layout = _layout_font_size(model, rows, cols, max_side)
    size = layout
    if not _label_fits(tuple(lines), size, rows, cols, max_side):  # digits of unequal width
        size = _label_font_size(tuple(lines), rows, cols, max_side)
    return _font(size), _band_of(size, len(lines)), _band_of(layout, len(lines))


_DIGIT = re.compile(r"[0-9]")


@functools.lru_cache(maxsize=256)
def _label_font_size(lines: tuple[str, ...], rows: int, cols: int, max_side: int) -> int:
    # Text width grows with the size and the width left shrinks with it: binary search.
    low, high = 9, 36
    while low < high:
        middle = (low + high + 1) // 2
        if _label_fits(lines, middle, rows, cols, max_side):
            low = middle
        else:
            high = middle - 1
    return low


def _label_fits(lines: tuple[str, ...], size: int, rows: int, cols: int, max_side: int) -> bool:
    band = _band_of(size, len(lines))
    width = round(cols * min(1.0, (max_side - band) / rows, max_side / cols))
    longest = max(_font(size).getlength(text) for text in lines)
    return longest <= width - 2 * _margin(size)


def _band_of(size: int, lines: int) -> int:
    return _margin(size) + (size + _margin(size)) * lines


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _margin(size: int) -> int:
    return max(2, size // 4)


def _label_canvas(
    lines: list[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    cols: int,
    max_side: int,
    warn: bool,
) -> tuple[int, list[str], int]:
    """The overlay's width for an image *cols* wide, the label lines to draw and how many of
    the last ones are the warning (red when *warn*).

    The width is the image's, or what the longest line needs at *font* (up to *max_side*,
    the image then centred on black). Lines that still do not fit are wrapped at spaces (a
    word longer than the width at characters), so no part of the finding or the warning is
    ever cut off.
    """
    size = int(getattr(font, "size", 11))
    needed = math.ceil(max(font.getlength(text) for text in lines)) + 2 * _margin(size)
    width = max(cols, min(max_side, needed))
    room = width - 2 * _margin(size)
    drawn: list[str] = []
    warned = 0
    for index, text in enumerate(lines):
        wrapped = _wrap(text, font, room)
        drawn.extend(wrapped)
        if warn and index == len(lines) - 1:
            warned = len(wrapped)
    return width, drawn, warned


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: float) -> list[str]:
    """*text* in lines no wider than *room*: broken at spaces, and within words too long."""
    if font.getlength(text) <= room:
        return [text]
    out: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= room:
            current = candidate
            continue
        if current:
            out.append(current)
        current = ""
        while font.getlength(word) > room and len(word) > 1:
            cut = 1
            while cut < len(word) and font.getlength(word[: cut + 1]) <= room:
                cut += 1
            out.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        out.append(current)
    return out


def _draw_label(
    rgb: np.ndarray,
    lines: list[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    band: int,
    *,
    warned: int,
) -> None:
    """Draw *lines* (the last *warned* ones red) on the black band of *band* rows atop *rgb*.

    Each line is drawn on a band of its own and the bands are combined by their maximum
    (white and red text on black, lines that do not overlap): the lines that do not change
    from view to view (the model, NOT VALIDATED) are drawn once and remembered.
    """
    cols = rgb.shape[1]
    size = int(getattr(font, "size", 11))
    out = rgb[:band]
    for index, text in enumerate(lines):
        colour = _LABEL_WARNING if index >= len(lines) - warned else _LABEL_TEXT
        top = _margin(size) + index * (size + _margin(size))
        drawn = _line_band(text, font, colour, cols, band, top)
        if index == 0:
            out[...] = drawn
        else:
            np.maximum(out, drawn, out=out)


@functools.lru_cache(maxsize=64)
def _line_band(
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    colour: tuple[int, int, int],
    cols: int,
    band: int,
    top: int,
) -> np.ndarray:
    """One label line drawn alone on a black band (read-only; remembered while it repeats)."""
    label = Image.new("RGB", (cols, band), _LABEL_BACKGROUND)
    margin = _margin(int(getattr(font, "size", 11)))
    ImageDraw.Draw(label).text((margin, top), text, fill=colour, font=font)
    drawn = np.asarray(label, dtype=np.uint8)
    drawn.flags.writeable = False
    return drawn


def _single_letter_orientation(source: pydicom.Dataset) -> tuple[str, str]:
    # The dominant direction comes first in a PatientOrientation value ("FL" is mostly F).
    directions = patient_orientation(source)
    if directions is not None:
        return directions[0][0], directions[1][0]
    return ("L", "F")  # placeholder for highdicom; replaced (or emptied) by the caller


def _view_position(result: StudyResult, view: ViewResult) -> int:
    for index, candidate in enumerate(result.views, start=1):
        if candidate.sop_instance_uid == view.sop_instance_uid:
            return index
    raise ValueError(f"view {view.sop_instance_uid} is not among the study's scored views")
