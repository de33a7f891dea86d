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
"""PNG grids of single-channel images in ``[0, 1]`` (real slices, synthetic samples, chain previews).

PNGs are written atomically: to a temporary file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monai_condflow.utils.io import atomic_write_png

__all__ = ["make_grid", "save_png_grid", "save_chain_preview"]

logger = logging.getLogger(__name__)


def _as_stack(images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
    """Images as float64 numpy ``[N, H, W]``."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(_to_numpy(i)) for i in images])
    arr = _to_numpy(images)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"expected images [N, 1, H, W] or [N, H, W], got shape {tuple(arr.shape)}")
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [N, 1, H, W] or [N, H, W], got shape {tuple(arr.shape)}")
    return arr.astype(np.float64)


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def make_grid(
    images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> np.ndarray:
    """Tile images in ``[0, 1]`` into one uint8 image, ``nrow`` images per row (row-major order), with
    ``padding`` pixels of ``pad_value`` between and around the tiles. Values are clipped to ``[0, 1]`` and
    mapped to ``round(255 * x)``.

    Args:
        images: ``[N, 1, H, W]`` or ``[N, H, W]`` (tensor, array, or a sequence of ``[1, H, W]`` / ``[H, W]``).
        nrow: images per grid row.
        padding: pixels between tiles and at the border.
        pad_value: value in ``[0, 1]`` of the padding.

    Returns:
        uint8 ``[rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding]`` with
        ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)``.

    Raises:
        ValueError: bad shape, ``nrow < 1``, ``padding < 0`` or non-finite values.
    """
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    stack = _as_stack(images)
    if not np.isfinite(stack).all():
        raise ValueError(f"images contain {int((~np.isfinite(stack)).sum())} non-finite value(s)")
    n, h, w = stack.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    fill = int(round(255 * min(max(pad_value, 0.0), 1.0)))
    grid = np.full((rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding), fill, dtype=np.uint8)
    tiles = np.rint(np.clip(stack, 0.0, 1.0) * 255).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y = padding + r * (h + padding)
        x = padding + c * (w + padding)
        grid[y : y + h, x : x + w] = tiles[i]
    return grid


def _add_row_titles(grid: np.ndarray, labels: Sequence[str], tile_h: int, padding: int) -> np.ndarray:
    """Prepend a white strip with one title per grid row (PIL's default bitmap font)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    widths = [probe.textbbox((0, 0), str(t), font=font)[2] for t in labels]
    strip_w = max(widths, default=0) + 2 * max(padding, 2)
    canvas = Image.new("L", (strip_w + grid.shape[1], grid.shape[0]), 255)
    canvas.paste(Image.fromarray(grid), (strip_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels):
        y = padding + r * (tile_h + padding) + tile_h // 2
        draw.text((max(padding, 2), y), str(text), fill=0, font=font, anchor="lm")
    return np.asarray(canvas)


def save_png_grid(
    images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    path: str | os.PathLike,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write :func:`make_grid` of ``images`` as an 8-bit grayscale PNG, atomically.

    Args:
        images: ``[N, 1, H, W]`` or ``[N, H, W]`` in ``[0, 1]``.
        path: target ``.png`` (parent folders are created).
        nrow: images per grid row.
        labels: optional titles, one per grid row, drawn in a strip left of the grid.
        padding: pixels between tiles.
        pad_value: value of the padding in ``[0, 1]``.

    Returns:
        the path written.

    Raises:
        ValueError: ``labels`` does not have one entry per grid row, or see :func:`make_grid`.
    """
    path = Path(path)
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    if labels is not None:
        n, h = _as_stack(images).shape[:2]
        rows = math.ceil(n / min(nrow, n))
        if len(labels) != rows:
            raise ValueError(f"labels must give one title per grid row: {rows} row(s), got {len(labels)} label(s)")
        grid = _add_row_titles(grid, labels, h, padding)
    return atomic_write_png(Image.fromarray(grid, mode="L"), path)


def save_chain_preview(
    records: Sequence[Mapping[str, Any]],
    transforms: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    path: str | os.PathLike,
    n: int = 16,
    nrow: int = 8,
    key: str = "image",
) -> Path:
    """Run ``transforms`` on the first ``n`` records and save their ``key`` images as a PNG grid, for a visual
    check of a pre-processing chain.

    Args:
        records: reader records.
        transforms: a chain (e.g. :func:`get_preprocess_transforms`) returning ``[1, S, S]`` images in ``[0, 1]``.
        path: target ``.png``.
        n: number of records shown.
        nrow: images per grid row.
        key: image key.

    Returns:
        the path written.
    """
    chosen = list(records)[:n]
    if not chosen:
        raise ValueError("save_chain_preview needs at least one record")
    images = [transforms(r)[key] for r in chosen]
    logger.info("chain preview of %d record(s) -> %s", len(images), path)
    return save_png_grid(images, path, nrow=nrow)
