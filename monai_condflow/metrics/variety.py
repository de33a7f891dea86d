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
"""Variety of image sets: how much the synthetic images of a class differ from one another next to the real ones.

A generator that has collapsed onto a few modes draws slices that look alike (one slice level, one heart size)
while each of them can be sharp and on-class; neither fine detail (:mod:`~monai_condflow.metrics.sharpness`) nor
class agreement shows it. :func:`pixel_spread` measures the spread of a set as the per-pixel standard deviation
across its images, averaged over the pixels,

.. math::
    V(x) = \\frac{1}{C H W} \\sum_{c, i, j}
        \\sqrt{\\frac{1}{N} \\sum_n \\left(x_{n,c,i,j} - \\bar{x}_{c,i,j}\\right)^2},

and :func:`variety_ratio` compares it class by class: the mean over the classes of ``V(synthetic_c) / V(real_c)``.
1 means the synthetic images of a class vary as much as the real ones, below 1 fewer modes (or smaller ones).
Classes are compared separately, so that two well-separated but collapsed classes do not count as variety.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pixel_spread", "variety_ratio"]


def pixel_spread(images: torch.Tensor, batch_size: int = 512) -> float:
    """Mean over pixels of the standard deviation across images (population std).

    The per-pixel moments are accumulated in float64 over chunks of ``batch_size`` images (centred on the first
    chunk's mean), so a large set is never copied to float64 at once.

    Args:
        images: ``[N, C, *spatial]`` with ``N >= 2``, finite.
        batch_size: images per chunk.

    Returns:
        The mean per-pixel standard deviation (0 for identical images).

    Raises:
        ValueError: fewer than two images, no spatial axes, or non-finite values.
    """
    if images.ndim < 3 or images.shape[0] < 2:
        raise ValueError(f"pixel_spread needs [N >= 2, C, *spatial] images, got shape {list(images.shape)}.")
    shift = total = squares = None
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(chunk).all():
            raise ValueError("pixel_spread: the images contain non-finite values.")
        if shift is None:
            shift = chunk.mean(0)
            total, squares = torch.zeros_like(shift), torch.zeros_like(shift)
        centred = chunk - shift
        total += centred.sum(0)
        squares += centred.square().sum(0)
    n = images.shape[0]
    variance = (squares / n - (total / n).square()).clamp_min(0.0)
    return float(variance.sqrt().mean())


def variety_ratio(
    synthetic: torch.Tensor, synthetic_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor
) -> float:
    """Mean over classes of ``pixel_spread(synthetic of class c) / pixel_spread(real of class c)``.

    Classes with fewer than two images on either side, or whose real images are all equal, are left out.

    Args:
        synthetic: ``[M, C, *spatial]`` synthetic images.
        synthetic_labels: ``[M]`` their (conditioning) classes.
        real: ``[N, C, *spatial]`` real images of the same size.
        real_labels: ``[N]`` their classes.

    Returns:
        The mean ratio, ``nan`` when no class can be compared.

    Raises:
        ValueError: images and labels of different lengths, or images of different sizes.
    """
    if synthetic.shape[0] != synthetic_labels.numel() or real.shape[0] != real_labels.numel():
        raise ValueError(
            f"variety_ratio: {synthetic.shape[0]} synthetic images with {synthetic_labels.numel()} labels, "
            f"{real.shape[0]} real images with {real_labels.numel()} labels."
        )
    if tuple(synthetic.shape[1:]) != tuple(real.shape[1:]):
        raise ValueError(
            f"variety_ratio: synthetic images {list(synthetic.shape[1:])} and real {list(real.shape[1:])} differ."
        )
    syn_y, real_y = synthetic_labels.reshape(-1).cpu(), real_labels.reshape(-1).cpu()
    ratios = []
    for c in sorted(set(syn_y.tolist()) & set(real_y.tolist())):
        syn_c, real_c = synthetic[syn_y == c], real[real_y == c]
        if syn_c.shape[0] < 2 or real_c.shape[0] < 2:
            continue
        reference = pixel_spread(real_c)
        if reference > 0:
            ratios.append(pixel_spread(syn_c) / reference)
    return sum(ratios) / len(ratios) if ratios else math.nan
