"""highdicom's lookups in the standard's tables, memoised; its coded concepts hashed cheaply.

highdicom asks "is attribute X part of the IOD of SOP class Y?" while it builds an SR, an SC
or a parametric map: whether the new object has a Content Date, whether each source image is
an image (``does_iod_have_pixel_data``) and whether it is multi-frame. Each answer is a linear
search through the standard's module tables, ~1–3 ms for a DX image, asked 5 times per SR
and 3 times per overlay: ~3 ms of a 15 ms SR and ~1.5 ms of a 13 ms overlay. The answers
depend on the (attribute, SOP class) pair and the tables bundled with highdicom alone, so
they are cached for the life of the process. So is the SOP class → acquisition modality
code (CID 29) that the SR's image library asks for each image: highdicom rebuilds a table of
~40 codes on each call (0.6 ms, 2.3 ms of a 2-view SR).

highdicom's content sequences index their items by concept name, so every item appended to
an SR hashes a CodedConcept, ~350 times for a 2-view SR: its ``__hash__`` reads the scheme and
the code value through pydicom's keyword lookup (~5.7 µs each, 2 ms of a 9 ms SR).
:func:`concept_hash` returns the same number from the two elements directly (~0.5 µs).

:func:`install` swaps the functions, wherever highdicom's modules hold them, for cached
wrappers of the same functions, and sets the hash; the builders call it when they are
imported.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

import highdicom._standard_utils as _standard
import highdicom.sr.templates as _templates
from highdicom.sr.coding import CodedConcept
from pydicom.sr.coding import Code

_original_in_iod: Callable[..., bool] = _standard.is_attribute_in_iod
_original_has_pixels: Callable[[str], bool] = _standard.does_iod_have_pixel_data
_original_coded_modality: Callable[[str], Code] = _templates._get_coded_modality
_original_concept_hash: Callable[[CodedConcept], int] = CodedConcept.__hash__

_CODING_SCHEME_DESIGNATOR = 0x00080102
# CodeValue, LongCodeValue, URNCodeValue: highdicom's order of preference.
_CODE_VALUE_TAGS = (0x00080100, 0x00080119, 0x00080120)


@functools.lru_cache(maxsize=4096)
def _in_iod(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return _original_in_iod(attribute, sop_class_uid, exclude_path_elements=exclude)


def is_attribute_in_iod(
    attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
) -> bool:
    """highdicom's ``is_attribute_in_iod``, answered once per distinct question."""
    exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _in_iod(str(attribute), str(sop_class_uid), exclude)


@functools.lru_cache(maxsize=1024)
def _has_pixels(sop_class_uid: str) -> bool:
    return _original_has_pixels(sop_class_uid)


def does_iod_have_pixel_data(sop_class_uid: str) -> bool:
    """highdicom's ``does_iod_have_pixel_data``, answered once per SOP class."""
    return _has_pixels(str(sop_class_uid))


@functools.lru_cache(maxsize=256)
def _coded_modality(sop_class_uid: str) -> Code:
    return _original_coded_modality(sop_class_uid)


def coded_modality(sop_class_uid: str) -> Code:
    """highdicom's SOP class → CID 29 acquisition modality code, once per SOP class."""
    return _coded_modality(str(sop_class_uid))


def concept_hash(concept: CodedConcept) -> int:
    """``hash(scheme designator + code value)``, highdicom's hash of a coded concept, read
    from the data elements themselves. Anything unusual (an element still raw from a file, a
    pydicom without ``_dict``) goes to highdicom's own ``__hash__``, which gives the same
    number the slow way."""
    try:
        elements = concept._dict
        scheme = elements[_CODING_SCHEME_DESIGNATOR].value
        for tag in _CODE_VALUE_TAGS:
            element = elements.get(tag)
            if element is not None:
                value = element.value
                if type(scheme) is str and type(value) is str:
                    return hash(scheme + value)
                break
    except (AttributeError, KeyError, TypeError):
        pass
    return _original_concept_hash(concept)


_REPLACEMENTS = {
    _original_in_iod: is_attribute_in_iod,
    _original_has_pixels: does_iod_have_pixel_data,
    _original_coded_modality: coded_modality,
}


def install() -> None:
    """Replace highdicom's lookups by the cached ones in every loaded highdicom module, and
    CodedConcept's hash by :func:`concept_hash`.

    Idempotent. Modules highdicom imports later are not patched, so callers import the
    highdicom modules they use first (``import highdicom`` loads all of them).
    """
    import highdicom  # noqa: F401  (loads the modules that hold the functions)

    for name, module in list(sys.modules.items()):
        if not (name == "highdicom" or name.startswith("highdicom.")) or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            try:
                replacement = _REPLACEMENTS.get(value)
            except TypeError:  # an unhashable module attribute: not one of ours
                continue
            if replacement is not None:
                setattr(module, attribute, replacement)
    CodedConcept.__hash__ = concept_hash  # type: ignore[method-assign]


__all__ = [
    "coded_modality",
    "concept_hash",
    "does_iod_have_pixel_data",
    "install",
    "is_attribute_in_iod",
]
