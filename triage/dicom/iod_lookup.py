"""highdicom's lookups in the standard's tables, memoised.

highdicom asks "is attribute X part of the IOD of SOP class Y?" while it builds an SR, an SC
or a parametric map: whether the new object has a Content Date, whether each source image is
an image (``does_iod_have_pixel_data``) and whether it is multi-frame. Each answer is a linear
search through the standard's module tables, ~1–3 ms for a DX image, asked 5 times per SR
and 3 times per overlay: ~3 ms of a 15 ms SR and ~1.5 ms of a 13 ms overlay. The answers
depend on the (attribute, SOP class) pair and the tables bundled with highdicom alone, so
they are cached for the life of the process. So is the SOP class → acquisition modality
code (CID 29) that the SR's image library asks for each image: highdicom rebuilds a table of
~40 codes on each call (0.6 ms, 2.3 ms of a 2-view SR).

:func:`install` swaps the two functions, wherever highdicom's modules hold them, for cached
wrappers of the same functions; the builders call it when they are imported.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

import highdicom._standard_utils as _standard
import highdicom.sr.templates as _templates
from pydicom.sr.coding import Code

_original_in_iod: Callable[..., bool] = _standard.is_attribute_in_iod
_original_has_pixels: Callable[[str], bool] = _standard.does_iod_have_pixel_data
_original_coded_modality: Callable[[str], Code] = _templates._get_coded_modality


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


_REPLACEMENTS = {
    _original_in_iod: is_attribute_in_iod,
    _original_has_pixels: does_iod_have_pixel_data,
    _original_coded_modality: coded_modality,
}


def install() -> None:
    """Replace highdicom's lookups by the cached ones in every loaded highdicom module.

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


__all__ = ["coded_modality", "does_iod_have_pixel_data", "install", "is_attribute_in_iod"]
