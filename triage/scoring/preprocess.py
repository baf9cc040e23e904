"""Pixels to model input: the view as displayed, then the MURA input tensor.

Two steps, kept apart so that training and the daemon share the second one exactly:

* :func:`display_pixels` turns a DICOM image into what a reader sees: a float32 2-D image in
  0..1, higher = brighter. Modality LUT or rescale, then the VOI LUT or window (the first when
  there are several), MONOCHROME1 inverted. A window defines the display range, so it is used
  as is; raw data with no VOI (e.g. 12–16-bit CR) is stretched between its 0.5 and 99.5
  percentiles (padding pixels excluded); 8-bit data with no VOI and no rescale (a secondary
  capture, a converted PNG) is already display values and is only divided by 255, so a MURA PNG
  wrapped in DICOM gives exactly what training saw. Multi-frame → first frame, colour →
  luminance (ITU-R 601, what PIL's ``convert("L")`` uses); the returned note says when such a
  choice was made.
* :func:`prepare_array` resizes (antialiased bilinear, to S×S without keeping the aspect ratio,
  as the paper did), replicates to 3 channels and normalises. The training code calls it on the
  MURA PNGs, the daemon on :func:`display_pixels`' output.

:func:`decode_view` does both from a file and is made for a process pool (top-level, picklable
arguments and result; :func:`init_decode_worker` as the pool initialiser).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, pixel_array

from triage.logs import identity_values, withheld_text

#: ITU-R BT.601 luma weights (the Y of YBR, and PIL's RGB → L conversion).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
#: Percentiles that bound raw data with no VOI (robust to a few hot or dead pixels).
PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Default largest side of the display image kept for CAM overlays.
DISPLAY_MAX_SIDE = 1024
#: decode_view halves a frame by 2×2 averaging while it is at least twice a fit to this longest
#: side; the model input and the display image are resized from the result.
MODEL_SOURCE_MAX_SIDE = 1024
#: A window or VOI LUT that leaves fewer pixels than this fraction strictly between black and
#: white, or spreads the pixels (between the percentiles) over less than this share of the grey
#: scale, is taken to be wrong for the data: a 16-bit default window (32768/65536) on 12-bit
#: pixels shows them all within 6 % of black.
_MIN_GREY_FRACTION = 0.01
_MIN_GREY_SPREAD = 0.1
#: Statistics are taken on a strided subsample of about this many pixels (keeps them ~1 ms).
_SAMPLE_PIXELS = 1 << 18
#: Integer images whose value range is at most this wide go through a lookup table when their
#: mapping is not a plain affine one.
_MAX_LUT_ENTRIES = 1 << 20


class UndecodableView(Exception):
    """A view whose pixels cannot be decoded or make no image; :attr:`reason` says why."""

    def __init__(self, reason: str) -> None:
        """Carry *reason*, a short one-line explanation for the store and the SR."""
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedView:
    """One decoded view, ready for the model and for the CAM overlay."""

    sop_instance_uid: str
    #: The model input before normalisation: float32 [S, S] in 0..1 (see :func:`prepare_grey`).
    #: A third of the normalised 3-channel input, which is what crosses the process boundary;
    #: the model normalises it (:meth:`~triage.scoring.model.ScoringModel.forward`).
    grey: np.ndarray
    #: The displayed image, uint8 [h, w], longest side at most the requested maximum; None
    #: when none was asked for (no overlays to draw).
    display: np.ndarray | None
    #: How the pixels were interpreted when that was a choice ("" when nothing was chosen).
    note: str
    #: Size of the decoded frame (the source image), for upsampling CAMs onto it.
    rows: int
    columns: int
    #: The per-channel normalisation :attr:`array` applies.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def array(self) -> np.ndarray:
        """The model input, float32 [3, S, S], normalised: :func:`prepare_array`'s result."""
        return normalise(self.grey, self.mean, self.std)


def _first(value: object) -> float:
    """The first value of a DS/IS element that may be multi-valued."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _count(value: object) -> int:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return len(value)
    return 1


def _oneline(text: str, limit: int = 160, withheld: Iterable[str] = ()) -> str:
    """A library's error message on one line for a view's reason, stored, logged and put in
    the SR: pydicom and the codecs quote the values they reject, so identity (*withheld*) and
    quoted values are withheld first (see :func:`triage.logs.withheld_text`)."""
    flat = withheld_text(" ".join(text.split()), withheld)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _identity(ds: Dataset) -> set[str]:
    """The patient identity of *ds* to withhold from a reason; none when it cannot be read."""
    try:
        return identity_values([ds])
    except Exception:  # a malformed header: the quoted values are withheld all the same
        return set()


def _sample(frame: np.ndarray) -> np.ndarray:
    step = max(1, int(math.sqrt(frame.size / _SAMPLE_PIXELS)))
    return frame[::step, ::step]


def to_luminance(rgb: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R 601) of an [H, W, 3] (or RGBA) image, float32 in the input's units."""
    channels = rgb[..., :3].astype(np.float32, copy=False)
    out = channels[..., 0] * np.float32(LUMA_WEIGHTS[0])
    out += channels[..., 1] * np.float32(LUMA_WEIGHTS[1])
    out += channels[..., 2] * np.float32(LUMA_WEIGHTS[2])
    return out


# --- grayscale display mapping ---------------------------------------------------------------


@dataclass
class _Mapping:
    """Stored value → display value in 0..1, as ``clip(a·x + b)``, ``sigmoid(a·x + b)`` or a
    lookup table over the integer values ``lo .. lo + len(lut) - 1``."""

    kind: str  # "affine" | "sigmoid" | "lut"
    a: float = 1.0
    b: float = 0.0
    lo: int = 0
    lut: np.ndarray | None = None

    def inverted(self) -> _Mapping:
        if self.kind in ("affine", "sigmoid"):
            # 1 - clip(z) = clip(1 - z); 1 - sigmoid(z) = sigmoid(-z).
            b = 1.0 - self.b if self.kind == "affine" else -self.b
            return _Mapping(self.kind, -self.a, b)
        assert self.lut is not None
        return _Mapping(self.kind, lo=self.lo, lut=(1.0 - self.lut).astype(np.float32))

    def apply(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The display values of *values* (float32), written into *out* when given."""
        if self.kind == "affine":
            # Converted to float32 as it is multiplied (one pass, not two: 3.7 → 3.2 ms for a
            # 5-Mpx frame), then in place; the same values as a conversion first.
            out = np.multiply(values, np.float32(self.a), out=out, dtype=np.float32)
            out += np.float32(self.b)
            return np.clip(out, 0.0, 1.0, out=out)
        if self.kind == "sigmoid":
            z = np.multiply(values, np.float32(self.a), out=out, dtype=np.float32)
            z += np.float32(self.b)
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += np.float32(1.0)
            return np.reciprocal(z, out=z)
        assert self.lut is not None
        index = values.astype(np.int64) - self.lo
        np.clip(index, 0, len(self.lut) - 1, out=index)
        return np.take(self.lut, index, out=out)

    def apply_halved(self, values: np.ndarray, strip_rows: int = 64) -> np.ndarray:
        """``_halve(self.apply(values))``, the same values, a strip of rows at a time.

        A 5-Mpx frame mapped whole is a 20 MB float32 image written and then read again to
        halve it; strip by strip the mapped rows are halved while they are still in the
        cache: 4.9 → 2.4 ms for a 2560×2048 frame, and no 20 MB buffer.
        """
        rows, columns = values.shape[0] // 2 * 2, values.shape[1] // 2 * 2
        out = np.empty((rows // 2, columns // 2), np.float32)
        strip_rows = max(2, strip_rows // 2 * 2)
        shown = np.empty((strip_rows, values.shape[1]), np.float32)
        pairs = np.empty((strip_rows // 2, values.shape[1]), np.float32)
        for top in range(0, rows, strip_rows):
            strip = values[top : min(top + strip_rows, rows)]
            mapped = self.apply(strip, out=shown[: len(strip)])
            summed = np.add(mapped[0::2], mapped[1::2], out=pairs[: len(strip) // 2])
            np.add(
                summed[:, 0:columns:2],
                summed[:, 1:columns:2],
                out=out[top // 2 : (top + len(strip)) // 2],
            )
        out *= np.float32(0.25)
        return out


def _modality_is_linear(ds: Dataset) -> bool:
    return not ds.get("ModalityLUTSequence")


def _rescale(ds: Dataset, notes: list[str]) -> tuple[float, float]:
    """Rescale Slope and Intercept (1 and 0 when absent or empty), for a window and a VOI
    LUT alike.

    A slope of 0 maps every pixel to the intercept, and one that is not a finite number maps
    them to no number: such a rescale is ignored (as DCMTK ignores it) and noted, rather than
    the radiograph reported as holding no image.
    """
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    a = 1.0 if slope in (None, "") else _first(slope)
    b = 0.0 if intercept in (None, "") else _first(intercept)
    if a == 0.0 or not (math.isfinite(a) and math.isfinite(b)):
        notes.append(f"invalid rescale (slope {a:g}, intercept {b:g}) ignored")
        return 1.0, 0.0
    return a, b


def _window(ds: Dataset, notes: list[str]) -> tuple[float, float, str] | None:
    """The first valid (centre, width, function) of the data set, or None."""
    centres, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centres in (None, "") or widths in (None, ""):
        return None
    try:
        centre, width = _first(centres), _first(widths)
    except (TypeError, ValueError, IndexError):
        notes.append("unreadable window ignored")
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        notes.append(f"unknown VOI LUT function {function} treated as LINEAR")
        function = "LINEAR"
    # LINEAR needs a width of at least 1 (PS3.3 C.11.2.1.2.1); the others any positive width.
    if (function == "LINEAR" and width < 1) or width <= 0:
        notes.append(f"invalid window width {width:g} ignored")
        return None
    if min(_count(centres), _count(widths)) > 1:
        notes.append(f"window 1 of {min(_count(centres), _count(widths))} used")
    return centre, width, function


def _window_mapping(slope: float, intercept: float, centre: float, width: float, function: str):
    """Compose rescale (x → slope·x + intercept) with a PS3.3 C.11.2.1.2 window onto 0..1."""
    if function == "LINEAR":
        # y = ((v − (c − 0.5)) / (w − 1) + 0.5), clipped; w = 1 is a threshold at c − 0.5.
        scale = 1.0 / (width - 1) if width > 1 else 1e6
        a = slope * scale
        b = (intercept - (centre - 0.5)) * scale + 0.5
        return _Mapping("affine", a, b)
    if function == "LINEAR_EXACT":
        a = slope / width
        b = (intercept - centre) / width + 0.5
        return _Mapping("affine", a, b)
    # SIGMOID: y = 1 / (1 + exp(−4 (v − c) / w)).
    a = 4.0 * slope / width
    b = 4.0 * (intercept - centre) / width
    return _Mapping("sigmoid", a, b)


def _padding_mask(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """True where *values* (stored) are padding (PixelPaddingValue … RangeLimit)."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, bytes):
        return None
    pad = _as_stored(ds, int(_first(pad)), values)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        return values == pad
    limit = _as_stored(ds, int(_first(limit)), values)
    low, high = min(pad, limit), max(pad, limit)
    return (values >= low) & (values <= high)


def _as_stored(ds: Dataset, value: int, values: np.ndarray) -> int:
    """A Pixel Padding Value (or Range Limit) in the domain of the stored *values*.

    Its VR is US or SS as Pixel Representation is (PS3.3 C.7.5.1.1.2), but writers send
    signed padding as US (-32768 as 32768, -2048 as 63488) and unsigned as SS (65535 as
    -1): such a value equals no pixel, and the padding drags the percentiles. A value
    outside the stored range is taken as its bit pattern and read as the pixels are, from
    the low Bits Stored bits (:func:`_clear_unused_bits`); one inside is kept.
    """
    if values.dtype.kind not in "iu":
        return value
    bits, low, high = _stored_range(ds, values)
    if low <= value <= high:
        return value
    value &= (1 << bits) - 1
    if value > high:  # signed: the sign bit is set
        value -= 1 << bits
    return value


def _stored_range(ds: Dataset, frame: np.ndarray) -> tuple[int, int, int]:
    """Bits Stored (the integer *frame*'s width when absent or wrong) and the least and
    greatest stored value it allows, signed or not as *frame* is."""
    width = frame.dtype.itemsize * 8
    bits = int(ds.get("BitsStored", 0) or 0)
    bits = bits if 0 < bits <= width else width
    if frame.dtype.kind == "i":
        return bits, -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return bits, 0, (1 << bits) - 1


def _percentile_mapping(
    ds: Dataset, frame: np.ndarray, modality: _Mapping | None, slope: float, intercept: float
) -> _Mapping:
    """Stretch the modality output between its robust percentiles (no usable VOI)."""
    sample = _sample(frame)
    mask = _padding_mask(ds, sample)
    if mask is not None and not mask.all():
        sample = sample[~mask]
    sample = sample.ravel()
    if modality is not None:  # a Modality LUT Sequence: percentiles of its output
        sample = modality.apply(sample)
    else:
        sample = sample.astype(np.float64) * slope + intercept
    low, high = _content_range(sample)
    span = high - low
    if modality is not None:
        assert modality.lut is not None
        lut = np.clip((modality.lut - low) / span, 0.0, 1.0).astype(np.float32)
        return _Mapping("lut", lo=modality.lo, lut=lut)
    # clip((slope·x + intercept − low) / span)
    return _Mapping("affine", slope / span, (intercept - low) / span)


def _content_range(sample: np.ndarray) -> tuple[float, float]:
    """The robust percentiles of *sample*; UndecodableView when they are equal."""
    low, high = (float(v) for v in np.percentile(sample, PERCENTILES))
    if high <= low:
        # At least 99 % of the pixels have one value: a blank frame with perhaps a few dots,
        # not a radiograph. Stretched to its full range it made a black image for the model;
        # shown as is (8-bit or colour data) it is a flat image the model would still score.
        raise UndecodableView(f"no image content: nearly every pixel has the value {low:g}")
    return low, high


def stretch_raw(values: np.ndarray) -> np.ndarray:
    """Raw grey values (no window, no LUT) as the daemon displays them: float32 0..1,
    stretched between the robust percentiles of a sample of them, as :func:`display_pixels`
    does for a DICOM image without a VOI. For training images that are not display values
    (16-bit PNGs), so a model learns on what the daemon will show it."""
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a 2-D grey image, got {values.shape}")
    return _percentile_mapping(Dataset(), values, None, 1.0, 0.0).apply(values)


def _lut_over_range(
    ds: Dataset, frame: np.ndarray, voi: bool, rescale: tuple[float, float]
) -> tuple[_Mapping, float] | None:
    """Modality LUT (and the VOI LUT when *voi*) tabulated over the image's integer values.

    *rescale*: :func:`_rescale`'s slope and intercept, the modality transformation when there
    is no Modality LUT Sequence. Returns the mapping (display 0..1 when *voi*, else modality
    output units) and the normalising denominator used; None when the image is not integer
    or its range too wide.
    """
    if frame.dtype.kind not in "iu":
        return None
    lo, hi = int(frame.min()), int(frame.max())
    if hi - lo + 1 > _MAX_LUT_ENTRIES:
        return None
    values = np.arange(lo, hi + 1, dtype=np.int64)
    slope, intercept = rescale
    if _modality_is_linear(ds):
        # The rescale a window gets (not pydicom's apply_modality_lut, which multiplies by an
        # empty slope, and ignores a slope given without an intercept).
        out = values * slope + intercept
    else:
        # Looked up here, not by pydicom's apply_modality_lut, which cannot read 8-bit
        # entries packed two to a word (the encoding the standard prescribes).
        first, table, _depth = _lut_table(
            ds, ds.ModalityLUTSequence[0], "Modality LUT", signed_input=frame.dtype.kind == "i"
        )
        out = table[np.clip(values - first, 0, table.size - 1)]
    denominator = 1.0
    if voi:
        # The VOI LUT's input is signed when the rescale of the possible stored values may
        # be negative (C.11.2.1.1); a Modality LUT's output never is.
        _bits, low, high = _stored_range(ds, frame)
        signed = _modality_is_linear(ds) and min(low * slope, high * slope) + intercept < 0
        first, entries, depth = _lut_table(ds, ds.VOILUTSequence[0], "VOI LUT", signed_input=signed)
        index = np.rint(out).astype(np.int64) - first
        out = entries[np.clip(index, 0, len(entries) - 1, out=index)]
        denominator = float(2**depth - 1)
        top = float(out.max()) if out.size else 0.0
        if top > denominator:  # LUT data wider than its descriptor says
            denominator = float(2 ** math.ceil(math.log2(top + 1)) - 1)
        out = out / denominator
    return _Mapping("lut", lo=lo, lut=np.asarray(out, dtype=np.float32)), denominator


def _lut_table(
    ds: Dataset, item: Dataset, what: str, signed_input: bool = False
) -> tuple[int, np.ndarray, int]:
    """The LUT in *item* (a VOI or Modality LUT Sequence item): first value mapped, its
    entries (int64), bits per entry. *signed_input*: whether the LUT's input may be negative
    (signed pixels for a Modality LUT; a rescale that may give negative values for a VOI LUT).

    VOI LUTs are looked up here rather than by pydicom's ``apply_voi``, which (3.0) indexes an
    8-bit LUT with 8-bit integers: the values of a 12-bit image wrap modulo 256 and are never
    clamped to the last entry (PS3.3 C.11.2.1.1), and the image comes out nearly black or
    scrambled. 8-bit entries in OW are packed two to a word (C.11.2.1.1, CP-522); some
    writers give each entry its own word: the data's length tells which.
    """
    entries_declared, first, depth = (int(value) for value in item.LUTDescriptor)
    if signed_input and first >= 0x8000:
        # The first value mapped is SS for a signed input (C.11.1.1.1, C.11.2.1.1), but an
        # explicit VR names one VR for all three values and writers choose US: -2048 comes
        # as 63488, and taken as such every pixel clamps to the first entry. Read as the
        # 16-bit pattern it is, as DCMTK reads it.
        first -= 0x10000
    if not 8 <= depth <= 16:
        raise ValueError(f"{depth} bits per {what} entry (8 to 16 allowed)")
    entries = entries_declared or 65536
    element = item["LUTData"]
    if isinstance(element.value, bytes):  # OW
        data = element.value
        if depth == 8 and len(data) < 2 * entries:
            table = _packed_bytes(ds, data)
        else:
            table = _words(ds, data)
    else:
        table = np.asarray(element.value).reshape(-1)
    table = table.astype(np.int64)[:entries]
    if table.size == 0:
        raise ValueError(f"the {what} has no entries")
    return first, table, depth


def _packed_bytes(ds: Dataset, data: bytes) -> np.ndarray:
    """8-bit LUT entries packed two to an OW word, in entry order: the first entry is the
    low byte of the first word, which comes second in a big endian encoding."""
    if _little_endian(ds):
        return np.frombuffer(data, dtype=np.uint8)
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype=">u2")
    return words.astype("<u2").view(np.uint8)


def _words(ds: Dataset, data: bytes) -> np.ndarray:
    """*data* (OW) as unsigned 16-bit words, in the byte order of *ds*'s encoding."""
    return np.frombuffer(data, dtype="<u2" if _little_endian(ds) else ">u2")


def _little_endian(ds: Dataset) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_transfer_syntax:
        return bool(syntax.is_little_endian)
    encoding = getattr(ds, "original_encoding", (None, True))
    return encoding[1] is not False


def _fits_the_data(mapping: _Mapping, frame: np.ndarray) -> bool:
    """Whether a window or VOI LUT shows *frame* as an image: enough of its pixels as grey,
    spread over enough of the grey scale."""
    shown = mapping.apply(_sample(frame))
    grey = float(np.count_nonzero((shown > 0.0) & (shown < 1.0))) / max(1, shown.size)
    if grey < _MIN_GREY_FRACTION:
        return False
    # The percentiles to 1/255 from a 256-step histogram, of every fourth sampled pixel of a
    # large image: np.percentile on the whole sample took ~5 ms a view, this ~0.3 ms.
    if shown.ndim == 2 and shown.size >= _SAMPLE_PIXELS // 2:
        shown = shown[::2, ::2]
    steps = np.multiply(shown, np.float32(255.0), dtype=np.float32)
    steps += np.float32(0.5)
    np.clip(steps, 0.0, 255.0, out=steps)
    counts = np.cumsum(np.bincount(steps.astype(np.uint8).ravel(), minlength=256))
    low, high = (int(np.searchsorted(counts, counts[-1] * q / 100.0)) for q in PERCENTILES)
    return (high - low) / 255.0 >= _MIN_GREY_SPREAD


def _grayscale_mapping(ds: Dataset, frame: np.ndarray, notes: list[str]) -> _Mapping:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    invert = photometric == "MONOCHROME1"
    if photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "")) == "INVERSE":
        invert = True
        notes.append("inverted (Presentation LUT Shape INVERSE)")
    # A Modality LUT Sequence replaces the rescale (PS3.3 C.11.1): its values are not read.
    slope, intercept = _rescale(ds, notes) if _modality_is_linear(ds) else (1.0, 0.0)
    mapping: _Mapping | None = None
    window_rejected = False
    voi_luts = ds.get("VOILUTSequence")

    if voi_luts:
        tabulated = _lut_over_range(ds, frame, True, (slope, intercept))
        if tabulated is None:
            raise UndecodableView("VOI LUT on non-integer or very wide-range pixel data")
        mapping = tabulated[0]
        if len(voi_luts) > 1:
            notes.append(f"VOI LUT 1 of {len(voi_luts)} used")
        if not _fits_the_data(mapping, frame):
            notes.append("the VOI LUT does not fit the pixel data; percentile scaling used instead")
            mapping = None
            window_rejected = True
    else:
        window = _window(ds, notes)
        if window is not None:
            centre, width, function = window
            if _modality_is_linear(ds):
                mapping = _window_mapping(slope, intercept, centre, width, function)
            else:
                tabulated = _lut_over_range(ds, frame, False, (slope, intercept))
                if tabulated is None:
                    raise UndecodableView("Modality LUT on non-integer or very wide-range data")
                modality_lut = tabulated[0]
                assert modality_lut.lut is not None
                windowed = _window_mapping(1.0, 0.0, centre, width, function)
                mapping = _Mapping("lut", lo=modality_lut.lo, lut=windowed.apply(modality_lut.lut))
            if not _fits_the_data(mapping, frame):
                notes.append(
                    f"window {centre:g}/{width:g} does not fit the pixel data; "
                    "percentile scaling used instead"
                )
                mapping = None
                window_rejected = True
    if mapping is None:
        bits = int(ds.get("BitsStored", 0) or 0)
        identity = _modality_is_linear(ds) and slope == 1.0 and intercept == 0.0
        if not window_rejected and identity and 0 < bits <= 8 and frame.dtype.kind == "u":
            # Already display values (a secondary capture, a converted PNG): keep them as is.
            _content_range(_sample(frame))
            mapping = _Mapping("affine", 1.0 / (2**bits - 1), 0.0)
        else:
            modality = None
            if not _modality_is_linear(ds):
                tabulated = _lut_over_range(ds, frame, False, (slope, intercept))
                if tabulated is None:
                    raise UndecodableView("Modality LUT on non-integer or very wide-range data")
                modality = tabulated[0]
            mapping = _percentile_mapping(ds, frame, modality, slope, intercept)
    return mapping.inverted() if invert else mapping


def _palette(ds: Dataset, frame: np.ndarray) -> tuple[np.ndarray, float]:
    """*frame* through the data set's Palette Color LUTs: RGB, and the value of full scale.

    Looked up here rather than by pydicom's ``apply_color_lut`` (3.0), which indexes 8-bit
    entries with 8-bit integers: a palette of more than 256 entries wraps modulo 256 and is
    never clamped to its last entry (PS3.3 C.7.6.3.1.5). Segmented palettes (C.7.9.2) are
    still expanded by pydicom.
    """
    if "RedPaletteColorLookupTableData" not in ds:
        rgb = apply_color_lut(frame, ds)
        return rgb, float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "iu" else 1.0
    declared, first, depth = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    entries = declared or 65536
    luts = []
    for colour in ("Red", "Green", "Blue"):
        data = bytes(ds[f"{colour}PaletteColorLookupTableData"].value)
        # 8-bit entries are packed two to a word; some writers give each its own word.
        wide = len(data) >= 2 * entries
        lut = (_words(ds, data) if wide else np.frombuffer(data, dtype=np.uint8))[:entries]
        if lut.size == 0:
            raise ValueError(f"the {colour.lower()} palette has no entries")
        luts.append(lut)
    if len({lut.size for lut in luts}) != 1:
        raise ValueError("the red, green and blue palettes differ in length")
    index = np.clip(frame.astype(np.int64) - first, 0, luts[0].size - 1)
    rgb = np.stack([lut[index] for lut in luts], axis=-1)
    top = 255.0 if depth == 8 and int(rgb.max()) <= 255 else 65535.0
    return rgb, top


def _colour(ds: Dataset, frame: np.ndarray, photometric: str, notes: list[str]) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb, top = _palette(ds, frame)
        notes.append("palette colour converted to luminance")
    else:
        rgb = frame
        bits = int(ds.get("BitsStored", 8) or 8)
        top = float(2**bits - 1)
        # pydicom has already converted YBR_* to RGB.
        notes.append(f"colour ({photometric}) converted to luminance")
    out = to_luminance(rgb)
    out *= np.float32(1.0 / top)
    np.clip(out, 0.0, 1.0, out=out)
    _content_range(_sample(out))
    return out


def _check_frame(frame: np.ndarray) -> None:
    if frame.size == 0 or frame.ndim not in (2, 3):
        raise UndecodableView(f"no image in the pixel data (shape {list(frame.shape)})")


def _display_from_frame(
    ds: Dataset, frame: np.ndarray, notes: list[str], *, halved: bool = False
) -> np.ndarray:
    """The displayed frame, float32 0..1; *halved*: its 2×2 block means (see :func:`_halve`)."""
    _check_frame(frame)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if frame.ndim != 2:
            raise UndecodableView(f"{photometric} with {frame.shape[-1]} samples per pixel")
        mapping = _grayscale_mapping(ds, frame, notes)
        return mapping.apply_halved(frame) if halved else mapping.apply(frame)
    if photometric == "PALETTE COLOR" or (
        frame.ndim == 3 and frame.shape[-1] == 3 and photometric.startswith(("RGB", "YBR"))
    ):
        out = np.ascontiguousarray(_colour(ds, frame, photometric, notes), dtype=np.float32)
        return _halve(out) if halved else out
    raise UndecodableView(f"unsupported photometric interpretation {photometric or '(none)'}")


def _decode_first_frame(ds: Dataset) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    if not any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
        raise UndecodableView("no pixel data")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or str(syntax or "no transfer syntax")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    # Native little-endian pixels are read in place and their unused high bits cleared only
    # when a value has any set (see _clear_unused_bits); pydicom would copy the frame and
    # shift it twice (~0.6 ms of a 5-Mpx frame, 1.1 ms in the scoring path) to clear bits
    # that are almost always clear already.
    in_place = (
        syntax is not None
        and syntax.is_transfer_syntax
        and not syntax.is_encapsulated
        and syntax.is_little_endian
        and not syntax.is_deflated
        and 0x7FE00010 in ds
    )
    options = {"correct_unused_bits": False, "view_only": True} if in_place else {}
    try:
        with warnings.catch_warnings():
            # pydicom warns on harmless header/codestream mismatches it then resolves.
            warnings.simplefilter("ignore")
            frame = pixel_array(ds, index=0, **options)
            if in_place:
                frame = _clear_unused_bits(frame, int(ds.get("BitsStored", 0) or 0))
    except NotImplementedError as exc:
        reason = _oneline(str(exc), withheld=_identity(ds))
        raise UndecodableView(f"no decoder for {name}: {reason}") from None
    except Exception as exc:  # codecs raise many types on corrupt data
        reason = _oneline(str(exc), withheld=_identity(ds))
        raise UndecodableView(
            f"cannot decode pixel data ({name}): {type(exc).__name__}: {reason}"
        ) from None
    except BaseException as exc:
        if not _is_codec_panic(exc):
            raise
        reason = _oneline(str(exc), withheld=_identity(ds))
        raise UndecodableView(
            f"cannot decode pixel data ({name}): decoder panicked: {reason}"
        ) from None
    if frames > 1:
        notes.append(f"first of {frames} frames")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        # Float Pixel Data can hold NaN or infinity: no display mapping or percentile makes
        # sense of them, and a NaN reaching the model comes out as a NaN probability, which
        # compares as "not above the threshold": a normal result no image supports.
        raise UndecodableView("pixel data holds values that are not finite numbers")
    return frame, notes


def _is_codec_panic(exc: BaseException) -> bool:
    """Whether *exc* is a Rust decoder's panic (pylibjpeg-rle's on corrupt RLE segments).

    pyo3 raises it as a BaseException so that ``except Exception`` lets it through; left to
    escape, it cannot be pickled back from a decoding process and takes the whole batch down.
    """
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def _clear_unused_bits(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    """*frame* as if the bits above *bits_stored* were cleared (unsigned) or copies of the
    sign bit (signed), as PS3.5 8.1.1 asks, as pydicom's ``correct_unused_bits`` makes it.

    Those bits are almost always so already: the frame is returned as is (read-only or not)
    when its minimum and maximum are in the stored range, and a corrected copy otherwise.
    """
    if frame.dtype.kind not in "iu" or frame.size == 0:
        return frame
    width = frame.dtype.itemsize * 8
    if not 0 < bits_stored < width:
        return frame
    if frame.dtype.kind == "u":
        in_range = int(frame.max()) < (1 << bits_stored)
    else:
        half = 1 << (bits_stored - 1)
        in_range = -half <= int(frame.min()) and int(frame.max()) < half
    if in_range:
        return frame
    corrected = np.array(frame)  # a writable copy
    shift = width - bits_stored
    np.left_shift(corrected, shift, out=corrected)
    np.right_shift(corrected, shift, out=corrected)  # arithmetic for signed: sign-extends
    return corrected


def display_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """The view as displayed: float32 [rows, columns] in 0..1 (higher = brighter), and a note.

    The note says which choice was made when there was one (``"first of 3 frames; window 1 of
    2 used"``), ``""`` otherwise. Raises :class:`UndecodableView` when the pixels cannot be
    decoded or hold no image.
    """
    frame, notes = _decode_first_frame(ds)
    return _displayed(ds, frame, notes, halved=False), "; ".join(notes)


def _displayed(ds: Dataset, frame: np.ndarray, notes: list[str], *, halved: bool) -> np.ndarray:
    try:
        return _display_from_frame(ds, frame, notes, halved=halved)
    except UndecodableView:
        raise
    except Exception as exc:  # a malformed LUT, window or palette: say what broke
        reason = _oneline(str(exc), withheld=_identity(ds))
        raise UndecodableView(
            f"cannot interpret the pixels: {type(exc).__name__}: {reason}"
        ) from None


def _as_unit_float(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        top = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "iu" else 1.0
        return to_luminance(pixels) / np.float32(top)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey or [H, W, 3] colour image, got {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) * np.float32(1 / 255)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) * np.float32(1 / 65535)
    if pixels.dtype.kind in "fb":
        return pixels.astype(np.float32, copy=False)
    raise ValueError(f"unsupported pixel type {pixels.dtype} (use uint8, uint16 or float 0..1)")


def _resize(image: np.ndarray, rows: int, columns: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float32 2-D image (torch's, which matches PIL's)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    if tuple(image.shape) == (rows, columns):
        return tensor[0, 0]
    return F.interpolate(
        tensor, size=(rows, columns), mode="bilinear", antialias=True, align_corners=False
    )[0, 0]


def prepare_array(
    pixels: np.ndarray, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Model input float32 [3, S, S] from an image: resize to S×S, 3 channels, normalise.

    *pixels*: 2-D grey (uint8 → /255, uint16 → /65535, float already in 0..1) or [H, W, 3|4]
    colour (converted to luminance). The resize is antialiased bilinear to exactly S×S (the
    aspect ratio is not kept, as in the MURA paper), after :func:`decode_view`'s 2×2 averaging
    of an image of 2048 px or more; values are clipped to 0..1 before the per-channel
    ``(x − mean) / std``. Training and the daemon both go through here: :func:`prepare_grey`,
    then :func:`normalise`.
    """
    return normalise(prepare_grey(pixels, input_size), mean, std)


def prepare_grey(pixels: np.ndarray, input_size: int) -> np.ndarray:
    """The first half of :func:`prepare_array`: *pixels* resized to S×S and clipped to 0..1,
    float32 [S, S], not yet normalised.

    An image of 2048 px or more is first averaged down by 2×2 blocks as :func:`decode_view`
    reduces a frame (:func:`_reduced_for_model`), so that a PNG trained on and the same pixels
    in a DICOM give the same input: resized from the full image in one pass, a 2600-px PNG
    differed from its DICOM by up to 7 grey levels in 1000 on fine-grained content."""
    image = _as_unit_float(pixels)
    if image.size == 0:
        raise ValueError("empty image")
    return _resized_grey(_reduced_for_model(image, image.shape, input_size), input_size)


def _resized_grey(source: np.ndarray, input_size: int) -> np.ndarray:
    """*source* (float32 0..1, reduced by :func:`_reduced_for_model`) resized to S×S and
    clipped to 0..1."""
    # Not in place: without a resize the tensor is the caller's array.
    return torch.clamp(_resize(source, input_size, input_size), 0.0, 1.0).numpy()


def normalise(grey: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The second half of :func:`prepare_array`: grey [..., S, S] in 0..1 → float32
    [..., 3, S, S], channel *c* being ``(grey − mean[c]) × float32(1 / std[c])``.

    Two float32 operations per value, each rounded once, so the model's own normalisation
    of a batch on its device gives the same bits (see
    :meth:`~triage.scoring.model.ScoringModel.forward`).
    """
    _check_normalisation(mean, std)
    grey = np.asarray(grey, dtype=np.float32)
    out = np.empty((*grey.shape[:-2], 3, *grey.shape[-2:]), dtype=np.float32)
    for channel in range(3):
        target = out[..., channel, :, :]
        np.subtract(grey, np.float32(mean[channel]), out=target)
        target *= np.float32(1.0 / std[channel])
    return out


def _check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (one per channel)")


def _shrunk_size(shape: Sequence[int], max_side: int) -> tuple[int, int]:
    """Rows and columns of an image of *shape* shrunk to a longest side of *max_side* (the
    shape itself when it is no larger)."""
    rows, columns = int(shape[0]), int(shape[1])
    scale = max_side / max(rows, columns)
    if scale >= 1.0:
        return rows, columns
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _halves_toward(shape: Sequence[int], target: tuple[int, int]) -> bool:
    """Whether :func:`_shrink_to` halves an image of *shape* on its way to *target*."""
    return shape[0] >= 2 * target[0] and shape[1] >= 2 * target[1]


def _shrink_to(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """*image* (float32 2-D) shrunk with antialiasing to *target* (rows, columns).

    While the image is at least twice the target size it is first halved by averaging 2×2
    blocks (a box prefilter), then resized (antialiased bilinear) the rest of the way. For a
    5-Mpx radiograph shrunk to 1024 px: 4.0 ms instead of 6.7 for the bilinear filter over the
    whole frame, with the same kind of result: every source pixel averaged in, no aliasing; a
    little softer (0.6 grey levels mean distance to a Lanczos resize instead of 0.4).
    """
    while _halves_toward(image.shape, target):
        image = _halve(image)
    if tuple(image.shape) == target:
        return image
    return _resize(image, *target).numpy()


def _halve(image: np.ndarray) -> np.ndarray:
    """Mean of each 2×2 block (float32); an odd last row or column is left out."""
    rows, columns = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    pairs = image[0:rows:2] + image[1:rows:2]
    out = pairs[:, 0:columns:2] + pairs[:, 1:columns:2]
    out *= np.float32(0.25)
    return out


def downsample_display(pixels: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """A float 0..1 display image as uint8, shrunk (antialiased) so its longest side ≤ max_side."""
    image = np.asarray(pixels, dtype=np.float32)
    return _display_image(image, _shrunk_size(image.shape, max_side))


def init_decode_worker() -> None:
    """Process-pool initialiser: one torch thread per decoding process (the pool is the
    parallelism; more threads per process only contend for the same cores)."""
    torch.set_num_threads(1)


def decode_view(
    path: str,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    display_max_side: int = DISPLAY_MAX_SIDE,
    display_box: Callable[[int, int], tuple[int, int]] | None = None,
) -> DecodedView:
    """Read a DICOM file and return its model input and display image.

    Both come from one *source*: the displayed frame averaged down by 2×2 blocks while it is
    at least twice a 1024-px fit (so 1024–2047 px on its longest side; a smaller frame as
    is). The model input is resized from it (antialiased) rather than from the full frame, as
    the MURA PNGs the model was trained on were such exports (≈ 512 px), and so is the display
    image, at the size it is drawn (never larger than the source): one resampling each.

    The display image fits ``display_box(rows, columns)`` (max rows, max columns; rows ×
    columns is the decoded frame's size) when given (see :class:`triage.dicom.sc.OverlayBox`),
    else a longest side of *display_max_side*; 0 asks for none (no overlays to draw: it would
    be carried between processes for nothing). Top-level and picklable, for a process pool.
    Raises :class:`UndecodableView` with a reason when the file cannot be read or its pixels
    cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise UndecodableView(f"file missing: {os.path.basename(path)}") from None
    except InvalidDicomError as exc:
        raise UndecodableView(f"not a DICOM file: {_oneline(str(exc))}") from None
    except Exception as exc:  # truncated or corrupt files raise many types
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None):
            # The disk, a network share or the host (EIO, ESTALE, EMFILE), not the file: an
            # error the study is retried for, not a view skipped for good (pydicom's own
            # errors for a cut file carry no errno).
            raise
        raise UndecodableView(
            f"unreadable DICOM file: {type(exc).__name__}: {_oneline(str(exc))}"
        ) from None
    frame, notes = _decode_first_frame(ds)
    _check_frame(frame)
    rows, columns = int(frame.shape[0]), int(frame.shape[1])
    source = _model_source(ds, frame, notes, input_size)
    _check_normalisation(mean, std)
    grey = _resized_grey(source, input_size)  # prepare_grey's, on the source reduced already
    if not np.isfinite(grey).all():  # whatever the mapping did: the model never sees one
        raise UndecodableView("the image maps to values that are not finite numbers")
    display = None
    if display_box is not None:
        display = _display_image(source, _fitted_size((rows, columns), display_box(rows, columns)))
    elif display_max_side > 0:
        display = _display_image(source, _shrunk_size((rows, columns), display_max_side))
    return DecodedView(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        grey=grey,
        display=display,
        note="; ".join(notes),
        rows=rows,
        columns=columns,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )


def _model_source(ds: Dataset, frame: np.ndarray, notes: list[str], input_size: int) -> np.ndarray:
    """The displayed *frame* (float32 0..1) halved by 2×2 averaging while it is at least twice
    a fit to ``max(1024, input_size)`` px: what :func:`decode_view` resizes the model input
    and the display image from. The first halving is done as the frame is mapped to display
    values (the same values as mapping the whole frame, then halving it)."""
    target = _model_source_size(frame.shape[:2], input_size)
    image = _displayed(ds, frame, notes, halved=_halves_toward(frame.shape[:2], target))
    return _reduced_for_model(image, frame.shape[:2], input_size)


def _model_source_size(shape: Sequence[int], input_size: int) -> tuple[int, int]:
    """The fit of a frame of *shape* that :func:`_reduced_for_model` halves it toward."""
    return _shrunk_size(shape, max(MODEL_SOURCE_MAX_SIDE, input_size))


def _reduced_for_model(image: np.ndarray, shape: Sequence[int], input_size: int) -> np.ndarray:
    """*image* (float32 0..1, 2-D; a frame of *shape*, perhaps halved already) halved by 2×2
    averaging while it is at least twice :func:`_model_source_size`: the source both the
    daemon's and training's model input is resized from."""
    target = _model_source_size(shape, input_size)
    while _halves_toward(image.shape, target):
        image = _halve(image)
    return image


def _fitted_size(shape: Sequence[int], box: tuple[int, int]) -> tuple[int, int]:
    """*shape* scaled (aspect kept, never up) to fit ``box = (max rows, max columns)``."""
    rows, columns = int(shape[0]), int(shape[1])
    scale = min(1.0, box[0] / rows, box[1] / columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _display_image(source: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """*source* (float 0..1) shrunk (:func:`_shrink_to`) to *size*, or as is if it is not
    larger; uint8."""
    if size[0] < source.shape[0] or size[1] < source.shape[1]:
        source = _shrink_to(source, size)
    out = np.multiply(source, np.float32(255.0), dtype=np.float32)
    out += np.float32(0.5)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


__all__ = [
    "DISPLAY_MAX_SIDE",
    "LUMA_WEIGHTS",
    "MODEL_SOURCE_MAX_SIDE",
    "PERCENTILES",
    "DecodedView",
    "UndecodableView",
    "decode_view",
    "display_pixels",
    "downsample_display",
    "init_decode_worker",
    "normalise",
    "prepare_array",
    "prepare_grey",
    "to_luminance",
]
