"""Perceptual colour maps for the CAM overlays, computed here rather than taken from matplotlib.

Each map is a path through CIELAB whose lightness L* rises linearly from dark to light, so a
higher activation is always a lighter colour (also in greyscale print and for colour-blind
readers), while the hue turns along the way to separate the levels. Chroma follows a target
curve and is reduced where the sRGB gamut requires, never the lightness or the hue, so the
lightness ramp stays exact. The tables are computed once at import (256 entries, < 1 ms).

- ``heat``: near-black violet → red → orange → pale yellow (in the spirit of *inferno*), the
  default: the hot end is warm and light, and stands out on a grey radiograph.
- ``aurora``: dark blue → teal → green → yellow (in the spirit of *viridis*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Entries per table; values in 0..1 index it after rounding.
SIZE = 256

# D65 white point (CIE 1931 2°), the reference white of sRGB.
_WHITE = np.array([0.95047, 1.0, 1.08883])
# XYZ (D65) → linear sRGB (IEC 61966-2-1).
_XYZ_TO_RGB = np.array(
    [
        [3.2404542, -1.5371385, -0.4985314],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0556434, -0.2040259, 1.0572252],
    ]
)


@dataclass(frozen=True)
class _Path:
    lightness: tuple[float, float]  # L* at 0 and at 1
    hue: tuple[float, float]  # CIELAB hue angle in degrees at 0 and at 1 (may pass 360)
    chroma: tuple[float, float, float]  # target C* at 0, 0.5 and 1 (quadratic through them)


_PATHS = {
    "heat": _Path(lightness=(6.0, 95.0), hue=(290.0, 460.0), chroma=(30.0, 70.0, 100.0)),
    "aurora": _Path(lightness=(18.0, 92.0), hue=(295.0, 100.0), chroma=(45.0, 45.0, 85.0)),
}


def _lab_to_linear_rgb(lab: np.ndarray) -> np.ndarray:
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (lightness + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=-1)
    # Inverse of the CIELAB companding function (cube above the knee, linear below).
    xyz = np.where(f > 6.0 / 29.0, f**3, 3.0 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0))
    return (xyz * _WHITE) @ _XYZ_TO_RGB.T


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _build(path: _Path) -> np.ndarray:
    t = np.linspace(0.0, 1.0, SIZE)
    lightness = path.lightness[0] + (path.lightness[1] - path.lightness[0]) * t
    hue = np.deg2rad(path.hue[0] + (path.hue[1] - path.hue[0]) * t)
    c0, c_mid, c1 = path.chroma
    target = c0 * (1 - t) * (1 - 2 * t) + c_mid * 4 * t * (1 - t) + c1 * t * (2 * t - 1)

    def in_gamut(chroma: np.ndarray) -> np.ndarray:
        lab = np.stack([lightness, chroma * np.cos(hue), chroma * np.sin(hue)], axis=-1)
        rgb = _lab_to_linear_rgb(lab)
        return np.all((rgb >= -1e-9) & (rgb <= 1.0 + 1e-9), axis=-1)

    # Bisection on a per-entry chroma scale: the largest fraction of the target that fits in
    # sRGB at this lightness and hue (chroma 0 — a grey — always fits).
    low, high = np.zeros(SIZE), np.ones(SIZE)
    fits = in_gamut(target)
    low[fits] = 1.0
    for _ in range(40):
        mid = (low + high) / 2
        ok = in_gamut(target * mid)
        low = np.where(ok, mid, low)
        high = np.where(ok, high, mid)
    chroma = target * low
    lab = np.stack([lightness, chroma * np.cos(hue), chroma * np.sin(hue)], axis=-1)
    rgb = _srgb_encode(_lab_to_linear_rgb(lab))
    return np.round(rgb * 255.0).astype(np.uint8)


_TABLES = {name: _build(path) for name, path in _PATHS.items()}

#: Names of the available colour maps.
NAMES: tuple[str, ...] = tuple(_TABLES)
#: The default colour map.
DEFAULT = "heat"


def lut(name: str = DEFAULT) -> np.ndarray:
    """The colour map *name* as a read-only ``(256, 3)`` uint8 sRGB table."""
    try:
        table = _TABLES[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; known: {', '.join(NAMES)}") from None
    view = table.view()
    view.flags.writeable = False
    return view


def apply(values: np.ndarray, name: str = DEFAULT) -> np.ndarray:
    """Colour *values* in 0..1 (clipped) with the map *name*: shape ``values.shape + (3,)``."""
    index = np.rint(np.clip(values, 0.0, 1.0) * (SIZE - 1)).astype(np.intp)
    return lut(name)[index]
