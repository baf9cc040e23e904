"""Pixels → display image → model input: known content, every transfer syntax, bad input."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import compress, get_encoder, pixel_array
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from triage.dicom.sop import DX_FOR_PRESENTATION, SECONDARY_CAPTURE
from triage.scoring import preprocess
from triage.scoring.card import IMAGENET_MEAN, IMAGENET_STD
from triage.scoring.preprocess import (
    DecodedView,
    UndecodableView,
    decode_view,
    display_pixels,
    downsample_display,
    init_decode_worker,
    normalise,
    prepare_array,
    prepare_grey,
    to_luminance,
)

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
_STD = np.asarray(STD, dtype=np.float32)[:, None, None]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared cores: keep torch from spinning up threads the other tests need.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_ds(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    sop_class: str = DX_FOR_PRESENTATION,
    **attributes: object,
) -> Dataset:
    """An uncompressed DX (or other class) data set holding *pixels* ([F,]R,C[,3])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    shape = pixels.shape[1:] if frames > 1 else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def phantom(rows: int = 192, columns: int = 160, top: int = 4095) -> np.ndarray:
    """A radiograph-like test image: smooth structure plus sharp edges, 0..top."""
    y, x = np.mgrid[0:rows, 0:columns]
    image = 0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0) + 0.15 * ((x // 20 + y // 20) % 2)
    dtype = np.uint8 if top <= 255 else np.uint16
    return (image * top * 0.8).clip(0, top).astype(dtype)


# --- known content ----------------------------------------------------------------------------


def test_8bit_without_voi_is_display_values_like_a_png():
    pixels = phantom(top=255)
    display, note = display_pixels(make_ds(pixels, sop_class=SECONDARY_CAPTURE))
    assert note == ""
    assert display.dtype == np.float32 and display.shape == pixels.shape
    np.testing.assert_array_equal(display, pixels.astype(np.float32) * np.float32(1 / 255))
    # A MURA PNG wrapped in DICOM gives training's input exactly.
    np.testing.assert_array_equal(
        prepare_array(display, 224, MEAN, STD), prepare_array(pixels, 224, MEAN, STD)
    )


def test_monochrome1_is_inverted():
    pixels = phantom(top=255)
    display, _ = display_pixels(make_ds(pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(display, 1.0 - pixels / 255.0, atol=1e-6)


def test_presentation_lut_inverse_inverts_monochrome2_and_says_so():
    pixels = phantom(top=255)
    display, note = display_pixels(make_ds(pixels, PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(display, 1.0 - pixels / 255.0, atol=1e-6)
    assert "INVERSE" in note


# Stored 50, 100, 150, 200 → rescale 2x − 100 → 0, 100, 200, 300 → window 150.5/201:
# y = (v − 150) / 200 + 0.5 → −0.25, 0.25, 0.75, 1.25 → clipped 0, 0.25, 0.75, 1.
_STORED = np.array([[50, 100], [150, 200]], dtype=np.uint16)
_EXPECTED = np.array([[0.0, 0.25], [0.75, 1.0]], dtype=np.float32)


def test_rescale_then_window():
    ds = make_ds(
        _STORED,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=150.5,
        WindowWidth=201,
    )
    display, note = display_pixels(ds)
    np.testing.assert_allclose(display, _EXPECTED, atol=1e-6)
    assert note == ""


def test_several_windows_first_is_used_and_noted():
    ds = make_ds(
        _STORED,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[150.5, 2000],
        WindowWidth=[201, 10],
    )
    display, note = display_pixels(ds)
    np.testing.assert_allclose(display, _EXPECTED, atol=1e-6)
    assert note == "window 1 of 2 used"


def test_window_on_monochrome1_is_inverted_after_windowing():
    ds = make_ds(
        _STORED,
        photometric="MONOCHROME1",
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=150.5,
        WindowWidth=201,
    )
    display, _ = display_pixels(ds)
    np.testing.assert_allclose(display, 1.0 - _EXPECTED, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # LINEAR_EXACT: (v − c) / w + 0.5 with c = 150, w = 200 over 0, 100, 200, 300.
        ("LINEAR_EXACT", [[0.0, 0.25], [0.75, 1.0]]),
        # SIGMOID: 1 / (1 + exp(−4 (v − c) / w)).
        ("SIGMOID", 1 / (1 + np.exp(-4 * (np.array([[0, 100], [200, 300]]) - 150) / 200))),
    ],
)
def test_voi_lut_functions(function: str, expected: object):
    ds = make_ds(
        _STORED,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=150,
        WindowWidth=200,
        VOILUTFunction=function,
    )
    display, _ = display_pixels(ds)
    np.testing.assert_allclose(display, np.asarray(expected, dtype=np.float32), atol=1e-6)


def _lut_item(first: int, data: list[int], bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item.LUTData = data
    item["LUTData"].VR = "US"
    return item


def test_voi_lut_sequence_first_of_several():
    # Stored 10..13 → LUT entries 0, 1000, 3000, 4095 of a 12-bit LUT.
    pixels = np.array([[10, 11], [12, 13]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=5000, WindowWidth=10)
    ds.VOILUTSequence = DicomSequence(
        [_lut_item(10, [0, 1000, 3000, 4095], 12), _lut_item(10, [4095, 0, 0, 0], 12)]
    )
    display, note = display_pixels(ds)
    np.testing.assert_allclose(display, np.array([[0, 1000], [3000, 4095]]) / 4095, atol=1e-6)
    assert note == "VOI LUT 1 of 2 used"


@pytest.mark.parametrize("vr", ["US", "OW", "OW packed"])
@pytest.mark.parametrize("entries", [4096, 256])
def test_an_8_bit_voi_lut_on_12_bit_pixels_is_looked_up_as_dcmtk_renders_it(
    tmp_path: Path, entries: int, vr: str
):
    # 12-bit CR/DX with an 8-bit VOI LUT: values past 255 must neither wrap (pydicom 3.0's
    # apply_voi does) nor escape the clamp to the last entry (the 256-entry LUT). In OW the
    # standard packs 8-bit entries two to a word (PS3.3 C.11.2.1.1); older writers give each
    # its own word.
    pixels = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    lut = np.round(np.linspace(0, 255, entries)).astype(np.uint16)
    item = _lut_item(0, [int(v) for v in lut], 8)
    if vr.startswith("OW"):
        item["LUTData"].VR = "OW"
        item.LUTData = (lut.astype(np.uint8) if "packed" in vr else lut.astype("<u2")).tobytes()
    ds = make_ds(pixels, bits_stored=12)
    ds.VOILUTSequence = DicomSequence([item])
    path = save(ds, tmp_path / "voi8.dcm")
    display, _ = display_pixels(pydicom.dcmread(path))
    expected = lut[np.minimum(pixels, entries - 1)] / 255.0
    np.testing.assert_allclose(display, expected, atol=1e-6)
    if shutil.which("dcm2pnm"):  # the reference rendering: first VOI LUT, 8-bit PGM
        subprocess.run(
            ["dcm2pnm", "+op", "+Wl", "1", path, str(tmp_path / "voi8.pgm")],
            check=True,
            capture_output=True,
        )
        _, width, height, _, data = (tmp_path / "voi8.pgm").read_bytes().split(maxsplit=4)
        shown = np.frombuffer(data, np.uint8).reshape(int(height), int(width)) / 255.0
        np.testing.assert_allclose(display, shown, atol=1 / 255)


@pytest.mark.parametrize(
    ("entries", "bits", "stored"),
    [
        (4096, 8, np.uint8),  # 8-bit entries, packed two to a word
        (4096, 8, np.uint16),  # 8-bit entries, one to a word (older writers)
        (256, 16, np.uint16),  # fewer entries than index values: the last one after them
    ],
)
def test_palette_colour_is_looked_up_as_dcmtk_renders_it(
    tmp_path: Path, entries: int, bits: int, stored: type
):
    index = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    top = 2**bits - 1
    ramp = np.round(np.linspace(0, top, entries))
    ds = make_ds(index, photometric="PALETTE COLOR", bits_stored=12, sop_class=SECONDARY_CAPTURE)
    for colour, scale in (("Red", 1.0), ("Green", 0.5), ("Blue", 0.25)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, bits])
        lut = np.round(ramp * scale).astype(stored)
        setattr(
            ds,
            f"{colour}PaletteColorLookupTableData",
            lut.astype(f"<{lut.dtype.str[1:]}").tobytes(),
        )
    path = save(ds, tmp_path / "palette.dcm")
    display, note = display_pixels(pydicom.dcmread(path))
    assert note == "palette colour converted to luminance"
    shown = ramp[np.minimum(index, entries - 1)] / top
    expected = shown * (0.299 + 0.587 * 0.5 + 0.114 * 0.25)
    np.testing.assert_allclose(display, expected, atol=2e-3)
    if shutil.which("dcm2pnm"):  # the reference rendering, to luminance the same way
        subprocess.run(
            ["dcm2pnm", "+op", path, str(tmp_path / "palette.ppm")], check=True, capture_output=True
        )
        _, width, height, _, data = (tmp_path / "palette.ppm").read_bytes().split(maxsplit=4)
        rgb = np.frombuffer(data, np.uint8).reshape(int(height), int(width), 3) / 255.0
        np.testing.assert_allclose(display, rgb @ np.array([0.299, 0.587, 0.114]), atol=2 / 255)


def test_modality_lut_sequence_then_window():
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=150.5, WindowWidth=201)
    ds.ModalityLUTSequence = DicomSequence([_lut_item(0, [0, 100, 200, 300], 16)])
    ds.ModalityLUTSequence[0].ModalityLUTType = "OD"
    display, _ = display_pixels(ds)
    np.testing.assert_allclose(display, np.array([[0.0, 0.25], [0.75, 1.0]]), atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_an_8_bit_modality_lut_in_ow_is_read_packed_or_one_entry_per_word(packed: bool):
    # pydicom's apply_modality_lut refused the packed form ("unpack requires a buffer").
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=128, WindowWidth=256)
    lut = np.array([0, 50, 200, 255])
    item = _lut_item(0, [int(v) for v in lut], 8)
    item["LUTData"].VR = "OW"
    item.LUTData = (lut.astype(np.uint8) if packed else lut.astype("<u2")).tobytes()
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = DicomSequence([item])
    display, _ = display_pixels(ds)
    np.testing.assert_allclose(display, lut.reshape(2, 2) / 255.0, atol=1e-6)


def test_packed_8_bit_lut_entries_in_a_big_endian_encoding_keep_their_order():
    # Entries 1, 2 | 3, 4 packed as words 0x0201, 0x0403, written high byte first.
    ds = make_ds(np.zeros((2, 2), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    assert list(preprocess._packed_bytes(ds, bytes([2, 1, 4, 3]))) == [1, 2, 3, 4]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert list(preprocess._packed_bytes(ds, bytes([1, 2, 3, 4]))) == [1, 2, 3, 4]


def test_raw_data_without_voi_is_stretched_between_percentiles_ignoring_padding():
    rows, columns = 200, 100
    ramp = np.tile(np.linspace(1000, 3000, columns), (rows, 1)).astype(np.uint16)
    padded = ramp.copy()
    padded[:, :30] = 0  # collimator padding: must not drag the lower percentile to 0
    display, note = display_pixels(make_ds(padded, bits_stored=12, PixelPaddingValue=0))
    assert note == ""
    inside = display[:, 30:]
    low, high = np.percentile(ramp[:, 30:], [0.5, 99.5])
    expected = np.clip((ramp[:, 30:] - low) / (high - low), 0, 1)
    np.testing.assert_allclose(inside, expected, atol=1e-5)
    assert inside.min() == 0.0 and inside.max() == 1.0


def test_a_window_outside_the_data_falls_back_to_percentiles_with_a_note():
    pixels = phantom()  # 12-bit data, window from a 16-bit world
    display, note = display_pixels(
        make_ds(pixels, bits_stored=12, WindowCenter=40000, WindowWidth=1000)
    )
    assert "percentile" in note
    assert 0.3 < float(display.mean()) < 0.7


@pytest.mark.parametrize(("centre", "width"), [(32768, 65536), (2048, 60000)])
def test_a_window_that_crushes_the_data_into_a_sliver_falls_back_to_percentiles(
    centre: int, width: int
):
    # A 16-bit default window on 12-bit pixels leaves them all grey, but within 6 % of
    # black: the model saw a nearly black image, and the overlay showed one.
    pixels = phantom()
    display, note = display_pixels(
        make_ds(pixels, bits_stored=12, WindowCenter=centre, WindowWidth=width)
    )
    assert (
        note
        == f"window {centre}/{width} does not fit the pixel data; percentile scaling used instead"
    )
    low, high = np.percentile(display, [0.5, 99.5])
    assert low < 0.05 and high > 0.95


def test_a_voi_lut_that_crushes_the_data_falls_back_to_percentiles():
    pixels = phantom()  # 0..~3300 of 12 bits, through a LUT that spends 16 bits on them
    item = _lut_item(0, [int(v) for v in np.arange(4096) // 16], 16)
    ds = make_ds(pixels, bits_stored=12)
    ds.VOILUTSequence = DicomSequence([item])
    display, note = display_pixels(ds)
    assert note == "the VOI LUT does not fit the pixel data; percentile scaling used instead"
    assert np.percentile(display, 99.5) > 0.95


def test_a_window_that_suits_the_data_is_kept():
    display, note = display_pixels(
        make_ds(phantom(), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    )
    assert note == ""
    np.testing.assert_allclose(display, phantom() / 4096 + 0.5 / 4096, atol=1e-3)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_ignored(tmp_path: Path, signed: bool):
    """Set high bits (PS3.5 8.1.1: their value cannot be assumed) decode as if clear (or,
    signed, as if copies of the sign bit), as pydicom's own correction gives; clean ones are
    read in place."""
    clean = phantom(top=4095).astype(np.int16 if signed else np.uint16)
    if signed:
        clean = clean - np.int16(2048)  # -2048..2047: 12-bit two's complement
    dirty = clean.view(np.uint16) & np.uint16(0x0FFF)  # sign bits not extended
    dirty |= np.uint16(0xA000) * (np.arange(clean.size).reshape(clean.shape) % 2 == 0)
    dirty = dirty.view(clean.dtype)
    paths = {}
    for name, pixels in (("clean", clean), ("dirty", dirty)):
        ds = make_ds(pixels, bits_stored=12)
        paths[name] = save(ds, tmp_path / f"{name}.dcm")
        frame, _ = preprocess._decode_first_frame(pydicom.dcmread(paths[name]))
        assert np.array_equal(frame, clean)
        # Clean: a view of the file's bytes (read-only); dirty: a corrected copy.
        assert frame.flags.writeable == (name == "dirty")
        assert np.array_equal(frame, pixel_array(pydicom.dcmread(paths[name]), index=0))
    clean_view = decode_view(paths["clean"], 224, MEAN, STD)
    dirty_view = decode_view(paths["dirty"], 224, MEAN, STD)
    assert np.array_equal(clean_view.array, dirty_view.array)
    assert np.array_equal(clean_view.display, dirty_view.display)


def test_in_range_frames_are_not_copied():
    frame = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    frame.flags.writeable = False
    assert preprocess._clear_unused_bits(frame, 12) is frame
    assert preprocess._clear_unused_bits(frame, 16) is frame
    fixed = preprocess._clear_unused_bits(frame, 11)
    assert fixed is not frame and int(fixed.max()) == 2047


def test_multi_frame_uses_the_first_frame():
    frames = np.stack([phantom(top=255), 255 - phantom(top=255), np.zeros((192, 160), np.uint8)])
    display, note = display_pixels(make_ds(frames))
    np.testing.assert_allclose(display, frames[0] / 255.0, atol=1e-6)
    assert note == "first of 3 frames"


def test_rgb_is_converted_to_luminance():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = (255, 255, 255)
    display, note = display_pixels(make_ds(rgb, photometric="RGB", sop_class=SECONDARY_CAPTURE))
    assert note == "colour (RGB) converted to luminance"
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    np.testing.assert_allclose(display[1:, 1:], expected, atol=1e-6)
    assert display[0, 0] == pytest.approx(1.0, abs=1e-6)
    # The same conversion PIL applies to an RGB PNG (within its integer rounding).
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(display, pil, atol=1 / 255)


def test_to_luminance_weights():
    assert to_luminance(np.array([[[1.0, 0.0, 0.0]]]))[0, 0] == pytest.approx(0.299)
    assert to_luminance(np.array([[[0.0, 1.0, 0.0]]]))[0, 0] == pytest.approx(0.587)
    assert to_luminance(np.array([[[0.0, 0.0, 1.0]]]))[0, 0] == pytest.approx(0.114)


# --- prepare_array ------------------------------------------------------------------------------


def test_prepare_array_shape_and_normalisation():
    out = prepare_array(np.full((300, 200), 0.5, dtype=np.float32), 224, MEAN, STD)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    for channel in range(3):
        np.testing.assert_allclose(out[channel], (0.5 - MEAN[channel]) / STD[channel], atol=1e-5)


def test_prepare_array_is_grey_then_normalise_bit_for_bit():
    images = [phantom(top=255), phantom(700, 500).astype(np.float32) / 4095]
    greys = [prepare_grey(image, 224) for image in images]
    for image, grey in zip(images, greys, strict=True):
        assert grey.shape == (224, 224) and grey.dtype == np.float32
        assert float(grey.min()) >= 0.0 and float(grey.max()) <= 1.0
        assert np.array_equal(normalise(grey, MEAN, STD), prepare_array(image, 224, MEAN, STD))
    # A stack of grey views normalises to the stack of their inputs (what the model does).
    stacked = normalise(np.stack(greys), MEAN, STD)
    assert stacked.shape == (2, 3, 224, 224)
    for index, image in enumerate(images):
        assert np.array_equal(stacked[index], prepare_array(image, 224, MEAN, STD))
    with pytest.raises(ValueError, match="3 values"):
        normalise(greys[0], MEAN[:2], STD)


def test_prepare_array_leaves_its_input_alone():
    pixels = np.full((224, 224), 1.5, dtype=np.float32)  # already the input size: no resize
    out = prepare_array(pixels, 224, MEAN, STD)
    assert float(pixels.max()) == 1.5
    np.testing.assert_allclose(out[1], (1.0 - MEAN[1]) / STD[1], atol=1e-6)  # clipped to 1


def test_prepare_array_same_for_uint8_and_unit_float():
    pixels = phantom(top=255)
    np.testing.assert_allclose(
        prepare_array(pixels, 224, MEAN, STD),
        prepare_array(pixels.astype(np.float32) / 255, 224, MEAN, STD),
        atol=1e-6,
    )


def test_prepare_array_antialiases():
    # A one-pixel checkerboard shrunk 4×: averaged to grey when antialiased, aliased otherwise.
    checker = (np.indices((896, 896)).sum(axis=0) % 2).astype(np.float32)
    out = prepare_array(checker, 224, MEAN, STD)
    grey = out[0] * STD[0] + MEAN[0]
    assert np.abs(grey - 0.5).max() < 0.02


def test_prepare_array_close_to_pil_bilinear():
    pixels = phantom(rows=500, columns=410, top=255)
    ours = prepare_array(pixels, 224, MEAN, STD)[0] * STD[0] + MEAN[0]
    pil = Image.fromarray(pixels).resize((224, 224), Image.Resampling.BILINEAR)
    theirs = np.asarray(pil, dtype=np.float32) / 255
    assert np.abs(ours - theirs).max() < 2.5 / 255


def test_downsample_display_bounds_the_longest_side():
    display = downsample_display(np.linspace(0, 1, 3000 * 1200).reshape(3000, 1200), 1024)
    assert display.dtype == np.uint8 and display.shape == (1024, 410)
    small = downsample_display(np.zeros((100, 80), np.float32), 1024)
    assert small.shape == (100, 80)


def test_large_frames_are_halved_then_resized_without_aliasing():
    # One-pixel stripes, the worst case for aliasing: every output pixel averages them to grey.
    stripes = np.tile(np.array([0.0, 1.0], np.float32), (2561, 1025))[:, :2049]
    display = downsample_display(stripes, 1024)
    assert display.shape == (1024, 819)  # odd sizes too; aspect ratio kept
    assert np.abs(display.astype(np.int16) - 128).max() <= 2
    # A smooth image comes out as the one-pass antialiased resize gives it.
    ramp = np.add.outer(np.linspace(0, 0.5, 2560), np.linspace(0, 0.5, 2048)).astype(np.float32)
    one_pass = torch.nn.functional.interpolate(
        torch.from_numpy(ramp)[None, None], size=(1024, 819), mode="bilinear", antialias=True
    )[0, 0].numpy()
    assert np.abs(downsample_display(ramp, 1024) / 255.0 - one_pass).max() < 1.5 / 255


# --- compressed transfer syntaxes ------------------------------------------------------------


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def run(source: Path, target: Path) -> None:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
        subprocess.run([tool, *options, str(source), str(target)], check=True, capture_output=True)

    return run


def _pydicom(syntax: str, **options: object) -> Callable[[Path, Path], None]:
    def run(source: Path, target: Path) -> None:
        encoder = get_encoder(syntax)
        if not encoder.is_available:
            pytest.skip(f"no pydicom encoder for {syntax.name}: {encoder.missing_dependencies}")
        ds = pydicom.dcmread(source)
        compress(ds, syntax, **options)
        ds.save_as(target, enforce_file_format=True)

    return run


# (name, bits of the source, encoder, max |Δ| and mean |Δ| in display units): 0 = lossless.
_CODECS = [
    ("jpeg-baseline", 8, _dcmtk("dcmcjpeg", "+eb"), 0.05, 0.005),
    ("jpeg-baseline-from-12-bit", 12, _dcmtk("dcmcjpeg", "+eb"), 0.05, 0.005),
    ("jpeg-extended-12-bit", 12, _dcmtk("dcmcjpeg", "+ee"), 0.01, 0.001),
    ("jpeg-lossless-sv1", 12, _dcmtk("dcmcjpeg", "+e1"), 0, 0),
    ("jpeg-lossless-process-14", 12, _dcmtk("dcmcjpeg", "+el"), 0, 0),
    ("jpeg-ls-lossless", 12, _dcmtk("dcmcjpls", "+el"), 0, 0),
    ("jpeg-ls-near-lossless", 12, _dcmtk("dcmcjpls", "+en"), 0.005, 0.001),
    ("jpeg-ls-near-lossless-pydicom", 12, _pydicom(JPEGLSNearLossless, jls_error=3), 0.005, 0.001),
    ("jpeg-2000-lossless", 12, _pydicom(JPEG2000Lossless), 0, 0),
    ("jpeg-2000-lossy", 12, _pydicom(JPEG2000, j2k_cr=[10]), 0.02, 0.003),
    ("rle-dcmtk", 12, _dcmtk("dcmcrle"), 0, 0),
    ("rle-pydicom", 12, _pydicom(RLELossless), 0, 0),
    ("deflate", 12, _dcmtk("dcmconv", "+td"), 0, 0),
    ("explicit-big-endian", 12, _dcmtk("dcmconv", "+tb"), 0, 0),
]


@pytest.mark.parametrize(
    ("bits", "encode", "max_error", "mean_error"),
    [pytest.param(*codec[1:], id=codec[0]) for codec in _CODECS],
)
def test_compressed_syntax_round_trips_to_the_same_tensor(
    tmp_path: Path, bits: int, encode, max_error: float, mean_error: float
):
    top = 2**bits - 1
    ds = make_ds(phantom(top=top), bits_stored=bits, WindowCenter=top * 0.45, WindowWidth=top * 0.7)
    source = tmp_path / "source.dcm"
    target = tmp_path / "encoded.dcm"
    save(ds, source)
    encode(source, target)
    syntax = pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax != ExplicitVRLittleEndian, "the encoder left the file uncompressed"
    original = decode_view(str(source), 224, MEAN, STD)
    decoded = decode_view(str(target), 224, MEAN, STD)
    difference = np.abs(decoded.array - original.array) * _STD  # back in display units
    if max_error == 0:
        np.testing.assert_array_equal(decoded.array, original.array)
    else:
        assert float(difference.max()) <= max_error
        assert float(difference.mean()) <= mean_error
    assert (decoded.rows, decoded.columns) == (original.rows, original.columns)


def test_multi_frame_rle_decodes_first_frame(tmp_path: Path):
    frames = np.stack([phantom(), 4095 - phantom()]).astype(np.uint16)
    ds = make_ds(frames, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    single = make_ds(frames[0], bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    source = save(ds, tmp_path / "multi.dcm")
    target = tmp_path / "multi-rle.dcm"
    _dcmtk("dcmcrle")(Path(source), target)
    decoded = decode_view(str(target), 224, MEAN, STD)
    assert decoded.note == "first of 2 frames"
    expected = decode_view(save(single, tmp_path / "single.dcm"), 224, MEAN, STD)
    np.testing.assert_array_equal(decoded.array, expected.array)


def test_rgb_jpeg_baseline_becomes_luminance(tmp_path: Path):
    grey = phantom(top=255)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(np.uint8)
    ds = make_ds(rgb, photometric="RGB", sop_class=SECONDARY_CAPTURE)
    source = save(ds, tmp_path / "rgb.dcm")
    target = tmp_path / "rgb-jpeg.dcm"
    _dcmtk("dcmcjpeg", "+eb")(Path(source), target)
    header = pydicom.dcmread(target, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    decoded = decode_view(str(target), 224, MEAN, STD)
    original = decode_view(source, 224, MEAN, STD)
    assert "converted to luminance" in decoded.note
    assert float((np.abs(decoded.array - original.array) * _STD).max()) <= 0.05


# --- decode_view and failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        preprocess._Mapping("affine", 1 / 3000, -0.1),
        preprocess._Mapping("sigmoid", 4 / 2800, -4 * 1800 / 2800),
        preprocess._Mapping("lut", lo=3, lut=np.sqrt(np.linspace(0, 1, 4000, dtype=np.float32))),
    ],
    ids=["affine", "sigmoid", "lut"],
)
@pytest.mark.parametrize("shape", [(301, 257), (300, 256), (2, 3)])
def test_mapping_and_halving_in_strips_is_mapping_then_halving(mapping, shape):
    frame = phantom(*shape)
    expected = preprocess._halve(mapping.apply(frame))
    for strip_rows in (2, 7, 64, 1000):
        assert np.array_equal(mapping.apply_halved(frame, strip_rows), expected)


def test_decode_view_resizes_input_and_display_from_the_halved_displayed_frame(tmp_path: Path):
    # decode_view maps and halves in one pass; the result is what mapping the whole frame and
    # halving it gives, bit for bit, and both outputs are resized from it once.
    cases = [
        make_ds(phantom(2600, 2001), bits_stored=12, WindowCenter=1800, WindowWidth=2800),
        make_ds(phantom(2561, 2049), photometric="MONOCHROME1", bits_stored=12),
        make_ds(np.stack([phantom(2100, 2100, 255)] * 3, -1), photometric="RGB"),
        make_ds(phantom(900, 700), bits_stored=12),
    ]
    for index, ds in enumerate(cases):
        path = save(ds, tmp_path / f"{index}.dcm")
        view = decode_view(path, 224, MEAN, STD, 512)
        source = display_pixels(ds)[0]
        while min(source.shape) >= 2 * 700 and max(source.shape) >= 2 * 1024:
            source = preprocess._halve(source)  # every case: halved until under 2 × 1024 px
        assert max(source.shape) < 2048
        assert np.array_equal(view.array, prepare_array(source, 224, MEAN, STD))
        assert np.array_equal(view.grey, prepare_grey(source, 224))  # what crosses processes
        assert np.array_equal(view.display, downsample_display(source, 512))
        boxed = decode_view(path, 224, MEAN, STD, display_box=lambda r, c: (300, 1000))
        assert boxed.display.shape[0] == 300 and boxed.display.shape[1] <= 1000
        assert np.array_equal(boxed.array, view.array)
        huge = decode_view(path, 224, MEAN, STD, display_box=lambda r, c: (8000, 8000))
        assert huge.display.shape == source.shape  # never upsampled


def test_decode_view_result(tmp_path: Path):
    pixels = phantom(rows=2600, columns=2000)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=1800, WindowWidth=2800)
    path = save(ds, tmp_path / "large.dcm")
    view = decode_view(path, 224, MEAN, STD, display_max_side=512)
    assert isinstance(view, DecodedView)
    assert view.sop_instance_uid == ds.SOPInstanceUID
    assert view.array.shape == (3, 224, 224) and view.array.dtype == np.float32
    assert view.display.dtype == np.uint8 and max(view.display.shape) == 512
    assert (view.rows, view.columns) == (2600, 2000)
    assert view.note == ""
    # The overlay image is the displayed image, shrunk.
    full, _ = display_pixels(ds)
    expected = np.asarray(
        Image.fromarray(full).resize(view.display.shape[::-1], Image.Resampling.BILINEAR)
    )
    assert np.abs(view.display.astype(np.float32) / 255 - expected).mean() < 0.01
    # Without overlays no display image is made (nor carried between processes).
    bare = decode_view(path, 224, MEAN, STD, display_max_side=0)
    assert bare.display is None and np.array_equal(bare.array, view.array)


def test_decode_view_in_a_process_pool(tmp_path: Path):
    paths = [save(make_ds(phantom(top=255)), tmp_path / f"{i}.dcm") for i in range(2)]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    # spawn: a forked child of a process that already ran OpenMP threads can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=init_decode_worker) as pool:
        views = list(pool.map(decode_view, paths, [224] * 2, [MEAN] * 2, [STD] * 2))
        failure = pool.submit(decode_view, str(broken), 224, MEAN, STD)
        with pytest.raises(UndecodableView) as caught:
            failure.result()
    assert [v.array.shape for v in views] == [(3, 224, 224)] * 2
    assert "not a DICOM file" in caught.value.reason


def test_undecodable_view_pickles_with_its_reason():
    error = pickle.loads(pickle.dumps(UndecodableView("cannot decode pixel data")))
    assert isinstance(error, UndecodableView) and error.reason == "cannot decode pixel data"


def _reason(path: str) -> str:
    with pytest.raises(UndecodableView) as caught:
        decode_view(path, 224, MEAN, STD)
    reason = caught.value.reason
    assert reason and "\n" not in reason
    return reason


def test_missing_and_non_dicom_files(tmp_path: Path):
    assert "file missing" in _reason(str(tmp_path / "absent.dcm"))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50)
    assert "DICOM" in _reason(str(junk))


def test_no_pixel_data(tmp_path: Path):
    ds = make_ds(phantom(top=255))
    del ds.PixelData
    assert _reason(save(ds, tmp_path / "nopix.dcm")) == "no pixel data"


def test_a_blank_image_with_a_few_dots_has_no_content(tmp_path: Path):
    pixels = np.full((200, 200), 1000, np.uint16)
    pixels[50, 60] = 4000  # it used to be stretched to its full range: all black, one dot
    pixels[120, 30] = 0
    ds = make_ds(pixels, bits_stored=12)
    assert "no image content" in _reason(save(ds, tmp_path / "dots.dcm"))


def test_constant_image_has_no_content(tmp_path: Path):
    ds = make_ds(np.full((64, 64), 700, dtype=np.uint16), bits_stored=12)
    assert "no image content" in _reason(save(ds, tmp_path / "flat.dcm"))
    # With a window it was shown as flat grey and scored.
    ds = make_ds(
        np.full((64, 64), 700, dtype=np.uint16), bits_stored=12, WindowCenter=600, WindowWidth=400
    )
    assert "no image content" in _reason(save(ds, tmp_path / "flat_windowed.dcm"))


def test_corrupt_jpeg_says_it_cannot_decode(tmp_path: Path):
    source = save(make_ds(phantom(top=255)), tmp_path / "ok.dcm")
    target = tmp_path / "jpeg.dcm"
    _dcmtk("dcmcjpeg", "+eb")(Path(source), target)
    ds = pydicom.dcmread(target)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + b"\x00" * 64 + b"\xff\xd9"])
    assert "cannot decode pixel data (JPEG Baseline" in _reason(save(ds, tmp_path / "bad.dcm"))


def _rle_segments(*segments: bytes) -> bytes:
    offsets = [64]
    for segment in segments[:-1]:
        offsets.append(offsets[-1] + len(segment))
    header = [len(segments), *offsets] + [0] * (15 - len(segments))
    return b"".join(n.to_bytes(4, "little") for n in header) + b"".join(segments)


def test_rle_whose_last_run_overruns_the_frame_is_undecodable_even_from_a_pool(tmp_path: Path):
    """pylibjpeg-rle panics (a BaseException from Rust) on a run that writes past the frame;
    from a decoding process the panic could not be pickled back and failed the whole batch."""
    ds = make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8) * 50, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = RLELossless
    high = bytes([63]) + bytes(64)  # 64 literal bytes: the high bytes, complete
    low = bytes([62]) + bytes(range(63)) + bytes([254, 7])  # 63 literal, then 3 repeated
    ds.PixelData = encapsulate([_rle_segments(high, low)])
    path = save(ds, tmp_path / "overrun.dcm")
    assert "decoder panicked" in _reason(path)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=init_decode_worker) as pool:
        failure = pool.submit(decode_view, path, 224, MEAN, STD)
        with pytest.raises(UndecodableView) as caught:
            failure.result()
    assert "cannot decode pixel data (RLE Lossless): decoder panicked" in caught.value.reason


def test_unsupported_transfer_syntax(tmp_path: Path):
    ds = make_ds(phantom(top=255))
    ds.PixelData = encapsulate([b"\x00" * 128])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    path = save(ds, tmp_path / "mpeg.dcm")
    assert "no decoder" in _reason(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_pixel_data_that_is_not_finite_is_undecodable(tmp_path: Path, bad: float):
    # A NaN would reach the model as a NaN probability, which reads as "not abnormal".
    ds = make_ds(phantom(top=255))
    del ds.PixelData
    pixels = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    pixels[3, 4] = bad
    ds.BitsAllocated = 32
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = pixels.shape
    ds.FloatPixelData = pixels.tobytes()
    assert _reason(save(ds, tmp_path / "float.dcm")) == (
        "pixel data holds values that are not finite numbers"
    )
    pixels[3, 4] = 0.5  # the same image, every value a number: decoded
    ds.FloatPixelData = pixels.tobytes()
    view = decode_view(save(ds, tmp_path / "fine.dcm"), 224, IMAGENET_MEAN, IMAGENET_STD)
    assert np.isfinite(view.array).all()


def test_unsupported_photometric(tmp_path: Path):
    ds = make_ds(phantom(top=255), photometric="HSV")
    assert "photometric interpretation HSV" in _reason(save(ds, tmp_path / "hsv.dcm"))


def test_a_decoder_error_s_reason_withholds_the_values_it_quotes(tmp_path: Path):
    """pydicom quotes the value it rejects ("Unknown (0028,0004) 'Photometric Interpretation'
    value '…'"): the reason is stored, logged and shown by triage-admin, so identity and
    quoted values are withheld, as in every other reason, and what failed is still named."""
    ds = make_ds(phantom(top=255), photometric="Wimbleworth^Ottoline")
    ds.PatientName = "Wimbleworth^Ottoline"
    reason = _reason(save(ds, tmp_path / "named.dcm"))
    assert "cannot decode pixel data" in reason and "'Photometric Interpretation'" in reason
    assert "Wimbleworth" not in reason and "Ottoline" not in reason, reason


def test_malformed_voi_lut_says_it_cannot_interpret(tmp_path: Path):
    ds = make_ds(np.array([[10, 11], [12, 13]], dtype=np.uint16), bits_stored=12)
    ds.VOILUTSequence = DicomSequence([_lut_item(10, [0, 1, 2, 3], 5)])  # 5-bit entries: invalid
    assert "cannot interpret the pixels" in _reason(save(ds, tmp_path / "lut.dcm"))


def test_zero_window_width_is_ignored_with_a_note():
    pixels = phantom()
    display, note = display_pixels(
        make_ds(pixels, bits_stored=12, WindowCenter=2000, WindowWidth=0)
    )
    assert note == "invalid window width 0 ignored"
    assert display.min() == 0.0 and display.max() == 1.0  # percentile-stretched instead


# --- preprocessing: a blank 8-bit or colour image is no image, as a blank 12-bit one ---------


@pytest.mark.parametrize(
    ("pixels", "photometric"),
    [
        (np.zeros((64, 64), np.uint8), "MONOCHROME2"),
        (np.full((64, 64), 17, np.uint8), "MONOCHROME1"),
        (np.zeros((64, 64, 3), np.uint8), "RGB"),
    ],
)
def test_a_blank_8_bit_or_colour_image_has_no_content(
    tmp_path: Path, pixels: np.ndarray, photometric: str
):
    ds = make_ds(pixels, photometric=photometric, sop_class=SECONDARY_CAPTURE)
    path = save(ds, tmp_path / "blank.dcm")
    with pytest.raises(UndecodableView, match="no image content"):
        decode_view(path, 224, MEAN, STD, 0)


def test_an_8_bit_image_with_content_is_still_display_values():
    pixels = phantom(top=255)
    display, note = display_pixels(make_ds(pixels, sop_class=SECONDARY_CAPTURE))
    assert note == ""
    np.testing.assert_array_equal(display, pixels.astype(np.float32) * np.float32(1 / 255))


def test_a_read_error_of_the_disk_is_an_error_not_an_undecodable_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO or ESTALE on a network spool passes: the study is retried. As an undecodable
    view it was skipped for good, and a study whose every view hit it FAILED at once."""
    import errno
    import os

    path = save(make_ds(phantom()), tmp_path / "view.dcm")

    def failing_read(*args: object, **kwargs: object) -> Dataset:
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    monkeypatch.setattr(pydicom, "dcmread", failing_read)
    with pytest.raises(OSError) as raised:
        decode_view(path, 224, MEAN, STD, 0)
    assert raised.value.errno == errno.EIO and not isinstance(raised.value, UndecodableView)
    # A cut file's error from pydicom carries no errno: still a view that cannot be decoded.
    monkeypatch.undo()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(path).read_bytes()[:2000])
    with pytest.raises(UndecodableView):
        decode_view(str(cut), 224, MEAN, STD, 0)


# --- rescale, LUT descriptors and padding values as hospitals' writers encode them ------------


@pytest.mark.parametrize("voi", ["none", "window", "VOI LUT"])
def test_a_zero_rescale_slope_is_ignored_as_dcmtk_does(voi: str):
    """Rescale Slope 0 maps every pixel to the intercept: DCMTK ignores such a rescale; a
    radiograph carrying one was reported blank ("no image content") and never scored."""
    pixels = phantom()
    extra: dict[str, object] = {}
    if voi == "window":
        extra = {"WindowCenter": 2048, "WindowWidth": 4096}
    plain = make_ds(pixels, bits_stored=12, **extra)
    broken = make_ds(pixels, bits_stored=12, RescaleSlope=0, RescaleIntercept=0, **extra)
    if voi == "VOI LUT":
        for ds in (plain, broken):
            ds.VOILUTSequence = DicomSequence([_lut_item(0, list(range(4096)), 12)])
    expected, _ = display_pixels(plain)
    display, note = display_pixels(broken)
    assert note == "invalid rescale (slope 0, intercept 0) ignored"
    np.testing.assert_array_equal(display, expected)


def test_a_voi_lut_reads_the_rescale_as_a_window_does():
    """Empty Rescale Slope and Intercept (Type 1 in CR, emptied by some anonymisers) are
    absent for a window; with a VOI LUT they made the view undecodable (pydicom multiplied by
    None). A slope without an intercept was applied before a window and ignored before a
    VOI LUT."""
    pixels = np.array([[10, 11], [12, 13]], dtype=np.uint16)
    lut = [0, 1000, 3000, 4095, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 4095, 0]
    empty = make_ds(pixels, bits_stored=12, RescaleSlope=None, RescaleIntercept=None)
    empty.VOILUTSequence = DicomSequence([_lut_item(10, lut, 12)])
    display, note = display_pixels(empty)
    assert note == ""
    np.testing.assert_allclose(display, np.array([[0, 1000], [3000, 4095]]) / 4095, atol=1e-6)
    slope_only = make_ds(pixels, bits_stored=12, RescaleSlope=2)  # 20, 22, 24, 26
    slope_only.VOILUTSequence = DicomSequence([_lut_item(10, lut, 12)])
    display, _ = display_pixels(slope_only)
    np.testing.assert_allclose(display, np.array([[700, 900], [4095, 0]]) / 4095, atol=1e-6)


@pytest.mark.parametrize("lut", ["Modality LUT", "VOI LUT"])
def test_a_negative_first_value_mapped_written_as_us_is_read_as_signed(tmp_path: Path, lut: str):
    """Signed pixels' LUT Descriptor names its first value mapped SS (PS3.3 C.11.1.1.1), but
    an explicit VR gives one VR for all three values and writers choose US: -2048 arrives as
    63488, which the LUT lookup took literally: every pixel clamped to the first entry (a
    Modality LUT: "no image content"; a VOI LUT: not applied)."""
    pixels = (phantom().astype(np.int32) - 2048).astype(np.int16)  # -2048..1228
    entries = np.arange(4096, dtype=np.uint16)[::-1].copy()  # a visible, inverting LUT
    descriptors = {}
    for vr in ("SS", "US"):
        item = _lut_item(-2048 if vr == "SS" else 0x10000 - 2048, [int(v) for v in entries], 12)
        item["LUTDescriptor"].VR = vr
        ds = make_ds(pixels, bits_stored=12)
        if lut == "Modality LUT":
            item.ModalityLUTType = "US"
            ds.ModalityLUTSequence = DicomSequence([item])
        else:
            ds.VOILUTSequence = DicomSequence([item])
        read = pydicom.dcmread(save(ds, tmp_path / f"{vr}.dcm"))
        sequence = read.ModalityLUTSequence if lut == "Modality LUT" else read.VOILUTSequence
        descriptors[vr] = list(sequence[0].LUTDescriptor)
        display, note = display_pixels(read)
        assert note == ""
        if lut == "VOI LUT":
            expected = entries[pixels.astype(np.int32) + 2048] / 4095.0
            np.testing.assert_allclose(display, expected, atol=1e-6)
        else:  # percentile-stretched output of the LUT: inverted
            assert np.corrcoef(display.ravel(), pixels.ravel())[0, 1] < -0.99
    assert descriptors == {"SS": [4096, -2048, 12], "US": [4096, 63488, 12]}


@pytest.mark.parametrize(
    ("dtype", "bits", "pad", "vr"),
    [
        (np.int16, 16, 0x8000, "US"),  # -32768 written as US
        (np.int16, 12, 0xF800, "US"),  # -2048 written as US
        (np.uint16, 16, -1, "SS"),  # 65535 written as SS
    ],
)
def test_a_pixel_padding_value_written_with_the_other_sign_still_marks_padding(
    tmp_path: Path, dtype: type, bits: int, pad: int, vr: str
):
    """Pixel Padding Value is US or SS as Pixel Representation is (C.7.5.1.1.2); written with
    the other VR it never equalled a pixel, and the padding dragged the percentiles."""
    rows, columns = 200, 100
    ramp = np.tile(np.linspace(-1000, 1000, columns), (rows, 1)).astype(np.int32)
    if dtype == np.uint16:
        ramp += 2000
    padded = ramp.astype(dtype)
    padded[:, :30] = np.array(pad).astype(dtype) if bits == 16 else -2048
    ds = make_ds(padded, bits_stored=bits)
    ds.add_new(0x00280120, vr, pad)
    display, note = display_pixels(pydicom.dcmread(save(ds, tmp_path / "pad.dcm")))
    assert note == ""
    inside = display[:, 30:]
    low, high = np.percentile(ramp[:, 30:], [0.5, 99.5])
    expected = np.clip((ramp[:, 30:] - low) / (high - low), 0, 1)
    np.testing.assert_allclose(inside, expected, atol=1e-5)
