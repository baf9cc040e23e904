"""The memoised highdicom IOD lookups answer as highdicom's own and are the ones it uses."""

from __future__ import annotations

import highdicom.base
import highdicom.content
import highdicom.sr.content
import highdicom.sr.templates
import pytest

import triage.dicom.sr  # noqa: F401  (installs the cached lookups)
from triage.dicom import iod_lookup

SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
]
ATTRIBUTES = ["ContentDate", "ContentTime", "NumberOfFrames", "PixelData", "FloatPixelData"]


@pytest.mark.parametrize("sop_class", SOP_CLASSES)
def test_answers_equal_highdicoms(sop_class: str) -> None:
    for attribute in ATTRIBUTES:
        for exclude in (None, ["IconImageSequence"]):
            assert iod_lookup.is_attribute_in_iod(
                attribute, sop_class, exclude
            ) == iod_lookup._original_in_iod(attribute, sop_class, exclude)
    assert iod_lookup.does_iod_have_pixel_data(sop_class) == iod_lookup._original_has_pixels(
        sop_class
    )
    try:
        expected = iod_lookup._original_coded_modality(sop_class)
    except ValueError:  # not an image SOP class highdicom has a modality code for
        with pytest.raises(ValueError):
            iod_lookup.coded_modality(sop_class)
    else:
        assert iod_lookup.coded_modality(sop_class) == expected


def test_highdicom_modules_use_the_cached_lookups() -> None:
    assert highdicom.base.is_attribute_in_iod is iod_lookup.is_attribute_in_iod
    assert highdicom.sr.content.is_attribute_in_iod is iod_lookup.is_attribute_in_iod
    assert highdicom.content.does_iod_have_pixel_data is iod_lookup.does_iod_have_pixel_data
    assert highdicom.sr.templates._get_coded_modality is iod_lookup.coded_modality
    iod_lookup.install()  # idempotent
    assert highdicom.base.is_attribute_in_iod is iod_lookup.is_attribute_in_iod


def test_an_unknown_sop_class_still_raises_highdicoms_error() -> None:
    with pytest.raises(KeyError, match="No IOD found"):
        iod_lookup.is_attribute_in_iod("ContentDate", "1.2.3.4")
