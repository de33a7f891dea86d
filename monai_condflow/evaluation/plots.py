# Copyright (c) monai_condflow contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Minimal PNG charts drawn with PIL (no matplotlib dependency): line charts, grouped bar charts, image grids.

Every writer saves atomically (temporary file in the same folder, then ``os.replace``) and returns the path.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_condflow.utils.io import atomic_write_png

__all__ = ["bar_chart", "image_grid", "line_chart", "save_png_atomic"]

logger = logging.getLogger(__name__)

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_W, _H, _L, _R, _T, _B = 640, 400, 70, 150, 36, 50  # canvas size and margins (left, right, top, bottom)


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (:func:`monai_condflow.utils.io.atomic_write_png`)."""
    return atomic_write_png(image, path)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _axes(draw: ImageDraw.ImageDraw, font, title: str, xlabel: str, ylabel: str, xr, yr, xticks, yticks):
    """Draw frame, ticks and labels; return the data -> pixel mapping."""
    x0, x1, y0, y1 = _L, _W - _R, _T, _H - _B

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = x0 + (x - xr[0]) / ((xr[1] - xr[0]) or 1.0) * (x1 - x0)
        py = y1 - (y - yr[0]) / ((yr[1] - yr[0]) or 1.0) * (y1 - y0)
        return px, py

    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    for t in yticks:
        _, py = to_px(xr[0], t)
        draw.line([x0 - 4, py, x0, py], fill=(0, 0, 0))
        draw.line([x0 + 1, py, x1 - 1, py], fill=(230, 230, 230))
        draw.text((4, py - 6), _fmt(t), fill=(0, 0, 0), font=font)
    for t, label in xticks:
        px, _ = to_px(t, yr[0])
        draw.line([px, y1, px, y1 + 4], fill=(0, 0, 0))
        draw.text((px - 3 * len(label), y1 + 6), label, fill=(0, 0, 0), font=font)
    draw.text((x0, 10), title, fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), _H - 20), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, y0 - 16), ylabel, fill=(0, 0, 0), font=font)
    return to_px


def _legend(draw: ImageDraw.ImageDraw, font, names: Sequence[str]) -> None:
    for i, name in enumerate(names):
        y = _T + 4 + 16 * i
        draw.rectangle([_W - _R + 10, y, _W - _R + 20, y + 10], fill=_COLORS[i % len(_COLORS)])
        draw.text((_W - _R + 25, y - 1), name[:20], fill=(0, 0, 0), font=font)


def line_chart(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Line chart of one or more ``name -> (xs, ys)`` series, with axes, ticks, labels and a legend.

    Non-finite points are skipped. Returns the PNG path.
    """
    font = ImageFont.load_default()
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    pts = {
        k: [(float(x), float(y)) for x, y in zip(*v) if math.isfinite(float(x)) and math.isfinite(float(y))]
        for k, v in series.items()
    }
    all_x = [p[0] for v in pts.values() for p in v] or [0.0, 1.0]
    all_y = [p[1] for v in pts.values() for p in v] or [0.0, 1.0]
    yt = _ticks(min(all_y), max(all_y))
    xt = _ticks(min(all_x), max(all_x))
    xr, yr = (xt[0], xt[-1]) if xt else (0, 1), (yt[0], yt[-1]) if yt else (0, 1)
    to_px = _axes(draw, font, title, xlabel, ylabel, xr, yr, [(t, _fmt(t)) for t in xt], yt)
    for i, (_, p) in enumerate(pts.items()):
        color = _COLORS[i % len(_COLORS)]
        px = [to_px(x, y) for x, y in p]
        if len(px) > 1:
            draw.line(px, fill=color, width=2)
        for x, y in px if len(px) <= 30 else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    _legend(draw, font, list(pts))
    return save_png_atomic(img, path)


def bar_chart(
    path: str | os.PathLike,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
    ylabel: str = "",
) -> Path:
    """Grouped bar chart: one group per category, one bar per series (optional +- error whiskers)."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    vals = [float(v) for s in series.values() for v in s if math.isfinite(float(v))]
    errs = [float(e) for s in (errors or {}).values() for e in s if math.isfinite(float(e))]
    hi = max(vals + [0.0]) + (max(errs) if errs else 0.0)
    yt = _ticks(min(0.0, min(vals + [0.0])), hi if hi > 0 else 1.0)
    n_cat, n_ser = len(categories), max(len(series), 1)
    to_px = _axes(
        draw,
        font,
        title,
        "",
        ylabel,
        (0, n_cat),
        (yt[0], yt[-1]),
        [(i + 0.5, str(c)[:14]) for i, c in enumerate(categories)],
        yt,
    )
    width = 0.8 / n_ser
    for j, (name, values) in enumerate(series.items()):
        color = _COLORS[j % len(_COLORS)]
        for i, v in enumerate(values):
            if not math.isfinite(float(v)):
                continue
            left = i + 0.1 + j * width
            (xa, ya), (xb, yb) = to_px(left, float(v)), to_px(left + width, 0.0)
            draw.rectangle([xa, min(ya, yb), xb, max(ya, yb)], fill=color)
            if errors and name in errors:
                e = float(errors[name][i])
                xm = (xa + xb) / 2
                _, ylo = to_px(0, float(v) - e)
                _, yhi = to_px(0, float(v) + e)
                draw.line([xm, ylo, xm, yhi], fill=(0, 0, 0), width=1)
    _legend(draw, font, list(series))
    return save_png_atomic(img, path)


def image_grid(path: str | os.PathLike, images: torch.Tensor | np.ndarray, nrow: int = 8, scale: int = 2) -> Path:
    """Save ``[N, 1, H, W]`` (or ``[N, H, W]``) images in ``[0, 1]`` as a grayscale PNG grid (2-pixel gaps).

    Non-finite pixels are drawn red so that broken samples stay visible.
    """
    arr = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"image_grid needs [N, 1, H, W] or [N, H, W] images, got shape {arr.shape}.")
    n, h, w = arr.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    canvas = np.full((nrows * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        tile = arr[k]
        bad = ~np.isfinite(tile)
        gray = (np.clip(np.nan_to_num(tile), 0.0, 1.0) * 255).round().astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        rgb[bad] = (255, 0, 0)
        y, x = 2 + r * (h + 2), 2 + c * (w + 2)
        canvas[y : y + h, x : x + w] = rgb
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_png_atomic(img, path)
