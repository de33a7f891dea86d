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
"""Periodic lattices in image sets: the hatching a multi-scale flow draws at its squeeze periods.

Every level of a Glow squeezes 2 x 2 blocks into channels, so a flow that has not learnt to treat the block's
positions alike decodes a regular pattern with the period of its squeezes (one dot every 2 or 4 pixels). Classifier
features and FID barely see it; an eye does at once. :func:`lattice_peak` measures it in the power spectrum
``P = |FFT2(x - mean(x))|^2`` of each image: at every frequency bin ``(a, b)`` that a pattern of period ``p`` can
occupy (``a, b`` multiples of ``H / p``, ``W / p``; not ``(0, 0)``) the power over the mean power of its 8
neighbouring bins (circular),

.. math::
    r_{a,b}(x) = \\frac{P_{a,b}}{\\tfrac{1}{8} \\sum_{(i, j) \\neq (0, 0)} P_{a+i, b+j}},

then the median of ``r_{a,b}`` over the images (the lower middle value for an even count) and the largest of
those medians over the bins. Images without a periodic pattern have a smooth spectrum there and score about 1 (real
chest CT: 0.3-1.4); a lattice in most images of the set makes its bins stand out (10-25 for the flows that show
hatching by eye).
"""

from __future__ import annotations

import torch

__all__ = ["lattice_bins", "lattice_peak"]

_RELATIVE_FLOOR = 1e-12  # spectral power below this fraction of an image's total is float rounding


def lattice_bins(height: int, width: int, period: int) -> list[tuple[int, int]]:
    """The frequency bins ``(a, b)`` of an ``height x width`` spectrum where a pattern of period ``period`` (in
    both axes) puts its power: ``a`` a multiple of ``height / period``, ``b`` of ``width / period``, not ``(0, 0)``.

    Raises:
        ValueError: ``period < 2`` or a side not divisible by ``period``.
    """
    if int(period) != period or period < 2:
        raise ValueError(f"lattice period must be an integer >= 2, got {period}.")
    if height % period or width % period:
        raise ValueError(f"lattice period {period} must divide the image sides, got {height} x {width}.")
    period = int(period)
    rows = [k * height // period for k in range(period)]
    cols = [k * width // period for k in range(period)]
    return [(a, b) for a in rows for b in cols if (a, b) != (0, 0)]


def lattice_peak(images: torch.Tensor, period: int = 4, batch_size: int = 512) -> float:
    """The strongest periodic lattice of period ``period`` (or a divisor of it) in a set of 2-D images (see the
    module docstring): the largest, over the lattice's frequency bins, median over images of the bin's power over
    the mean power of its 8 neighbours.

    Args:
        images: ``[N, C, H, W]``, finite; every channel of every image counts as one image. ``H, W`` divisible by
            ``period`` and at least 3.
        period: the lattice's period in pixels (4: the patterns of two 2x squeezes, period 2 included).
        batch_size: images per FFT call.

    Returns:
        A float >= 0: about 1 without a lattice, far above 1 with one.

    Raises:
        ValueError: wrong rank, empty, too small or non-finite input, or a bad ``period``.
    """
    if images.ndim != 4:
        raise ValueError(f"lattice_peak expects [N, C, H, W] images, got shape {list(images.shape)}.")
    height, width = int(images.shape[-2]), int(images.shape[-1])
    if images.shape[0] == 0 or images.shape[1] == 0 or min(height, width) < 3:
        raise ValueError(f"lattice_peak needs at least one image of at least 3 x 3 pixels, got {list(images.shape)}.")
    bins = lattice_bins(height, width, period)
    rows = torch.tensor([a for a, _ in bins])
    cols = torch.tensor([b for _, b in bins])
    offsets = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    ratios = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(chunk).all():
            raise ValueError("lattice_peak: the images contain non-finite values.")
        x = chunk.reshape(-1, height, width)
        power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().square()
        centre = power[:, rows, cols]
        around = torch.stack([power[:, (rows + i) % height, (cols + j) % width] for i, j in offsets]).mean(0)
        # power below 1e-12 of the image's total is rounding, not signal: such a bin scores 0 and such neighbours
        # count as that floor (a constant image has no lattice; an exact tone has a finite, huge score)
        floor = (power.sum(dim=(-2, -1)) * _RELATIVE_FLOOR).clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
        ratios.append(torch.where(centre > floor, centre / torch.maximum(around, floor), 0.0))
    return float(torch.cat(ratios).median(dim=0).values.max())
