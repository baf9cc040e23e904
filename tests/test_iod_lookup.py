"""The memoised highdicom IOD lookups (and concept hash) answer as highdicom's own and are the
ones it uses."""

from __future__ import annotations

import io

import highdicom.base
import highdicom.content
import highdicom.sr.content
import highdicom.sr.templates
import pydicom
import pytest
from highdicom.sr.coding import CodedConcept
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes

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


def test_concept_hash_is_highdicoms_hash() -> None:
    """Every form a concept takes hashes as highdicom's own __hash__ does."""
    concepts = [
        CodedConcept("121071", "DCM", "Finding"),
        CodedConcept("x" * 20, "99LOCAL", "long code value"),  # LongCodeValue
        CodedConcept("urn:example:code", "99LOCAL", "URN code value"),  # URNCodeValue
        CodedConcept("1", "SCT", "versioned", scheme_version="2024"),
        CodedConcept.from_code(codes.SCT.Abnormal),
    ]
    # A concept read back from a file holds raw elements until they are first read.
    raw = read_dataset(io.BytesIO(_encoded(concepts[0])), False, True)
    assert isinstance(raw._dict[0x00080100], RawDataElement)
    concepts.append(CodedConcept.from_dataset(raw, copy=False))
    for concept in concepts:
        assert iod_lookup.concept_hash(concept) == iod_lookup._original_concept_hash(concept)
        assert hash(concept) == iod_lookup._original_concept_hash(concept)
    # Without any code value highdicom's hash raises; so does this one.
    broken = CodedConcept("1", "DCM", "x")
    del broken.CodeValue
    with pytest.raises(TypeError):
        iod_lookup.concept_hash(broken)


def _encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()
