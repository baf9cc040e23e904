"""ROC plots drawn with Pillow (no plotting dependency for a few lines and dots).

One panel per study type and one for the aggregate: the ROC curve, the chance diagonal, and
the operating point (the threshold's sensitivity and 1 − specificity) marked and labelled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL = 360
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 52, 14, 34, 44
_CURVE = (31, 119, 180)
_POINT = (214, 39, 40)
_GRID = (225, 225, 225)
_AXIS = (60, 60, 60)
_CHANCE = (150, 150, 150)


# The default font has no typographic dashes or minus signs: labels stay ASCII.
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    colour: tuple[int, int, int],
    dash: float = 6.0,
) -> None:
    length = math.dist(start, end)
    n = max(1, int(length // dash))
    for i in range(0, n, 2):
        a, b = i / n, min((i + 1) / n, 1.0)
        draw.line(
            [
                (start[0] + (end[0] - start[0]) * a, start[1] + (end[1] - start[1]) * a),
                (start[0] + (end[0] - start[0]) * b, start[1] + (end[1] - start[1]) * b),
            ],
            fill=colour,
            width=1,
        )


def draw_roc_panel(
    image: Image.Image,
    origin: tuple[int, int],
    title: str,
    fpr: Sequence[float],
    tpr: Sequence[float],
    *,
    auroc: float | None,
    operating_point: tuple[float, float] | None,
    threshold_label: str,
) -> None:
    """Draw one ROC panel of PANEL×PANEL pixels with its top-left corner at ``origin``."""
    draw = ImageDraw.Draw(image)
    ox, oy = origin
    left, top = ox + _MARGIN_LEFT, oy + _MARGIN_TOP
    right, bottom = ox + PANEL - _MARGIN_RIGHT, oy + PANEL - _MARGIN_BOTTOM
    width, height = right - left, bottom - top

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * width, bottom - y * height

    small, normal = _font(11), _font(13)
    for k in range(6):
        v = k / 5
        draw.line([xy(v, 0), xy(v, 1)], fill=_GRID)
        draw.line([xy(0, v), xy(1, v)], fill=_GRID)
        label = f"{v:.1f}"
        x, y = xy(v, 0)
        draw.text((x, y + 4), label, fill=_AXIS, font=small, anchor="mt")
        x, y = xy(0, v)
        draw.text((x - 5, y), label, fill=_AXIS, font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    _dashed(draw, xy(0, 0), xy(1, 1), _CHANCE)
    draw.text(
        ((left + right) / 2, bottom + 22), "1 - specificity", fill=_AXIS, font=small, anchor="mt"
    )
    label_img = Image.new("RGBA", (height, 14), (255, 255, 255, 0))
    ImageDraw.Draw(label_img).text(
        (height / 2, 7), "sensitivity", fill=_AXIS, font=small, anchor="mm"
    )
    rotated = label_img.rotate(90, expand=True)
    image.paste(rotated, (ox + 4, top), rotated)

    auc_text = "AUROC n/a" if auroc is None else f"AUROC {auroc:.3f}"
    draw.text(
        (ox + PANEL / 2, oy + 8), f"{title}, {auc_text}", fill=(0, 0, 0), font=normal, anchor="mt"
    )
    if len(fpr) >= 2:
        draw.line([xy(x, y) for x, y in zip(fpr, tpr, strict=True)], fill=_CURVE, width=2)
    if operating_point is not None:
        x, y = xy(*operating_point)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=_POINT, outline=(0, 0, 0))
        text = (
            f"{threshold_label}: sens {operating_point[1]:.2f}, spec {1 - operating_point[0]:.2f}"
        )
        draw.text((right - 4, bottom - 6), text, fill=_POINT, font=small, anchor="rb")


def _panel_args(name: str, group: Mapping[str, Any]) -> dict[str, Any]:
    op = group["operating_point"]
    thr = group["threshold"]
    return {
        "title": f"{name} (n={group['n_studies']})",
        "fpr": group["roc"]["fpr"],
        "tpr": group["roc"]["tpr"],
        "auroc": group["metrics"]["auroc"]["value"],
        "operating_point": None
        if op["fpr"] is None or op["tpr"] is None
        else (op["fpr"], op["tpr"]),
        "threshold_label": f"t={thr:.3f}" if isinstance(thr, float) else "per-type t",
    }


def write_roc_plots(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``roc.png`` (all groups on one grid) and ``roc_<group>.png`` per group; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: Mapping[str, Any] = report["groups"]
    written: list[Path] = []
    for name, group in groups.items():
        image = Image.new("RGB", (PANEL, PANEL), "white")
        draw_roc_panel(image, (0, 0), **_panel_args(name, group))
        path = out / f"roc_{name}.png"
        image.save(path)
        written.append(path)
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    grid = Image.new("RGB", (cols * PANEL, rows * PANEL), "white")
    for i, (name, group) in enumerate(groups.items()):
        draw_roc_panel(grid, ((i % cols) * PANEL, (i // cols) * PANEL), **_panel_args(name, group))
    path = out / "roc.png"
    grid.save(path)
    written.insert(0, path)
    return written
