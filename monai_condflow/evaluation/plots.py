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
"""Charts drawn with matplotlib (Agg canvas, no pyplot state) and image grids drawn with PIL.

Every chart is written twice, atomically (temporary file in the same folder, then ``os.replace``): the PNG named by
``path`` (for ``report.md``) and a PDF beside it with the same stem (vector output for papers). Legend entries and
tick labels are never truncated. The writers return the PNG path.

- :func:`line_chart`: one or more ``name -> (xs, ys)`` series, optional +- error bars and a log x axis.
- :func:`bar_chart`: grouped bars with optional +- error bars.
- :func:`label_sweep_chart`: accuracy against the number of labels (log axis) with error bars, from sweep rows.
- :func:`image_grid`: ``[N, 1, H, W]`` images as one grayscale PNG, tiled by
  :func:`monai_condflow.transforms.grid.make_grid` (non-finite pixels red).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from monai_condflow.transforms.grid import make_grid
from monai_condflow.utils.io import atomic_write_bytes, atomic_write_png, shareable_file_mode

__all__ = [
    "bar_chart",
    "bar_figure",
    "image_grid",
    "label_sweep_chart",
    "label_sweep_figure",
    "line_chart",
    "line_figure",
    "save_figure_atomic",
    "save_png_atomic",
]

logger = logging.getLogger(__name__)

VECTOR_FORMAT = "pdf"
"""Format of the vector copy written beside every chart's PNG."""

_FIGSIZE = (6.4, 4.0)  # inches
_DPI = 150


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (:func:`monai_condflow.utils.io.atomic_write_png`)."""
    return atomic_write_png(image, path)


def save_figure_atomic(fig: Figure, path: str | os.PathLike, vector_format: str | None = VECTOR_FORMAT) -> Path:
    """Save a matplotlib figure as ``path`` (PNG) and, unless ``vector_format`` is ``None``, as
    ``path.with_suffix("." + vector_format)`` beside it; both atomically, with ordinary file permissions.

    Args:
        fig: the figure (any canvas; it is drawn with Agg).
        path: the PNG file.
        vector_format: ``"pdf"`` or ``"svg"`` (or ``None`` for the PNG only).

    Returns:
        The PNG path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    targets = [(path, "png")] + ([(path.with_suffix(f".{vector_format}"), vector_format)] if vector_format else [])
    for target, fmt in targets:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=_DPI, bbox_inches="tight", metadata=_metadata(fmt))
        atomic_write_bytes(target, buffer.getvalue(), mode=shareable_file_mode())
    return path


def _metadata(fmt: str) -> dict[str, Any]:
    """No creation date in the files, so that the same data gives the same bytes."""
    if fmt == "pdf":
        return {"CreationDate": None, "ModDate": None}
    if fmt == "svg":
        return {"Date": None}
    return {}


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _new_axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _legend(ax, handles: list | None = None) -> None:
    """Full legend names in the order the series were given, outside the data area when they are long."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    else:
        labels = [h.get_label() for h in handles]
    if not labels:
        return
    if max(len(label) for label in labels) > 24 or len(labels) > 4:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    else:
        ax.legend(handles, labels, loc="best")


def line_chart(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    errors: Mapping[str, Sequence[float | None]] | None = None,
    logx: bool = False,
    xticks: Sequence[tuple[float, str]] | None = None,
) -> Path:
    """Write :func:`line_figure` to ``path`` (PNG) and a PDF beside it; returns the PNG path."""
    return save_figure_atomic(line_figure(series, title, xlabel, ylabel, errors, logx, xticks), path)


def line_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    errors: Mapping[str, Sequence[float | None]] | None = None,
    logx: bool = False,
    xticks: Sequence[tuple[float, str]] | None = None,
) -> Figure:
    """Line chart of one or more ``name -> (xs, ys)`` series, with axes, labels and a legend of the full names.

    Args:
        series: ``name -> (xs, ys)``; non-finite points are skipped.
        title: chart title.
        xlabel: x axis label.
        ylabel: y axis label.
        errors: ``name -> +- error per point`` (``None`` or non-finite: no bar at that point).
        logx: logarithmic x axis (points with ``x <= 0`` are skipped).
        xticks: ``(position, label)`` pairs replacing the automatic x ticks.

    Returns:
        The figure (not yet saved).
    """
    fig, ax = _new_axes(title, xlabel, ylabel)
    handles: list = []
    for name, (xs, ys) in series.items():
        errs = list((errors or {}).get(name) or [None] * len(list(xs)))
        pts = [
            (float(x), float(y), float(e) if _finite(e) else 0.0)
            for x, y, e in zip(xs, ys, errs)
            if _finite(x) and _finite(y) and (not logx or float(x) > 0)
        ]
        if not pts:
            handles += ax.plot([], [], label=name)
            continue
        px, py, pe = (list(v) for v in zip(*pts))
        marker = "o" if len(pts) <= 30 else None
        if errors and name in errors:
            handles.append(ax.errorbar(px, py, yerr=pe, label=name, marker=marker, capsize=3, linewidth=1.5))
        else:
            handles += ax.plot(px, py, label=name, marker=marker, linewidth=1.5)
    if logx:
        ax.set_xscale("log")
    if xticks:
        ax.set_xticks([t for t, _ in xticks], [label for _, label in xticks])
        if logx:
            ax.minorticks_off()
    _legend(ax, handles)
    return fig


def bar_chart(
    path: str | os.PathLike,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
    ylabel: str = "",
) -> Path:
    """Write :func:`bar_figure` to ``path`` (PNG) and a PDF beside it; returns the PNG path."""
    return save_figure_atomic(bar_figure(categories, series, errors, title, ylabel), path)


def bar_figure(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    errors: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
    ylabel: str = "",
) -> Figure:
    """Grouped bar chart: one group per category, one bar per series, optional +- error bars.

    Args:
        categories: group names (x axis).
        series: ``name -> one value per category``; non-finite values draw no bar.
        errors: ``name -> +- error per category``.
        title: chart title.
        ylabel: y axis label.

    Returns:
        The figure (not yet saved).
    """
    fig, ax = _new_axes(title, "", ylabel)
    n_ser = max(len(series), 1)
    width = 0.8 / n_ser
    for j, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(categories))]
        vals = [float(v) if _finite(v) else float("nan") for v in values]
        errs = None
        if errors and name in errors:
            errs = [float(e) if _finite(e) else 0.0 for e in errors[name]]
        ax.bar(xs, vals, width=width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    ax.grid(False, axis="x")
    if series:  # below the axes: bars fill the data area, so a legend inside would hide some
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(series), 3), frameon=False)
    return fig


def label_sweep_chart(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], n_all: int | None = None, title: str = ""
) -> Path:
    """Write :func:`label_sweep_figure` to ``path`` (PNG) and a PDF beside it; returns the PNG path."""
    return save_figure_atomic(label_sweep_figure(rows, n_all, title), path)


def label_sweep_figure(rows: Sequence[Mapping[str, Any]], n_all: int | None = None, title: str = "") -> Figure:
    """TSTR and TRTR accuracy against the number of labels (log x axis), with +- std error bars.

    Args:
        rows: sweep rows (:func:`~monai_condflow.evaluation.sweep.summarize_sweep`) with ``level``, ``num_labels``,
            ``tstr_accuracy``, ``trtr_accuracy`` and optionally ``tstr_accuracy_std`` / ``trtr_accuracy_std``.
        n_all: the label count of the ``all`` level when its row has no ``num_labels`` (the training set size).
        title: chart title (default: "Accuracy against the number of labels").

    Returns:
        The figure (not yet saved). Rows without a label count are left out, with a warning.
    """

    def count(row: Mapping[str, Any]) -> float | None:
        n = row.get("num_labels")
        if not _finite(n) and str(row.get("level")) == "all":
            n = n_all
        return float(n) if _finite(n) and float(n) > 0 else None

    usable = sorted(((count(r), r) for r in rows if count(r) is not None), key=lambda t: t[0])
    if len(usable) < len(rows):
        logger.warning("label sweep chart: %d level(s) without a label count left out", len(rows) - len(usable))
    xs = [n for n, _ in usable]
    series, errors = {}, {}
    # the two series side by side (x 0.97 and x 1.03) so that their error bars do not hide each other
    for key, name, shift in (("tstr_accuracy", "flow synthetic (TSTR)", 0.97), ("trtr_accuracy", "real (TRTR)", 1.03)):
        series[name] = ([x * shift for x in xs], [r.get(key) for _, r in usable])
        errors[name] = [r.get(f"{key}_std") for _, r in usable]
    ticks: list[tuple[float, str]] = []
    for n, r in usable:
        label = f"{n:g}\n(all)" if str(r.get("level")) == "all" else f"{n:g}"
        if ticks and n / ticks[-1][0] < 1.25:  # too close to read apart on a log axis: one tick "20/21"
            ticks[-1] = (ticks[-1][0], ticks[-1][1].split("\n")[0] + "/" + label)
        else:
            ticks.append((n, label))
    return line_figure(
        series,
        title or "Accuracy against the number of labels",
        "labelled training images (log scale)",
        "accuracy on the real test split",
        errors=errors,
        logx=True,
        xticks=ticks,
    )


def image_grid(path: str | os.PathLike, images: torch.Tensor | np.ndarray, nrow: int = 8, scale: int = 2) -> Path:
    """Save images in ``[0, 1]`` as a grayscale PNG grid (2-pixel white gaps), non-finite pixels drawn red.

    The tiling is :func:`monai_condflow.transforms.grid.make_grid`'s (called twice: once for the gray levels with
    non-finite pixels set to 0, once for the non-finite mask); this function only colours the broken pixels, so
    that broken samples stay visible, and enlarges the grid.

    Args:
        path: target ``.png`` (written atomically).
        images: ``[N, C, H, W]`` (channel 0 is shown) or ``[N, H, W]``.
        nrow: images per grid row (at least 1 is used).
        scale: integer enlargement factor (nearest neighbour); ``<= 1`` keeps the size.

    Returns:
        the path written: an RGB PNG of ``scale * (rows * (H + 2) + 2)`` by ``scale * (cols * (W + 2) + 2)`` pixels
        with ``cols = min(nrow, N)``, ``rows = ceil(N / cols)``.

    Raises:
        ValueError: ``images`` is not ``[N, C, H, W]`` or ``[N, H, W]`` with ``N >= 1``.
    """
    arr = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"image_grid needs [N, 1, H, W] or [N, H, W] images, got shape {arr.shape}.")
    bad = ~np.isfinite(arr)
    nrow = max(1, nrow)
    gray = make_grid(np.where(bad, 0.0, arr), nrow=nrow, padding=2, pad_value=1.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if bad.any():
        rgb[make_grid(bad.astype(np.float64), nrow=nrow, padding=2, pad_value=0.0) > 0] = (255, 0, 0)
    img = Image.fromarray(rgb)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_png_atomic(img, path)
