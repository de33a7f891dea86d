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
"""Tests of the squeeze-lattice score against spectra computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_condflow.metrics.periodicity import lattice_bins, lattice_peak


def _cosines(size: int, terms: list[tuple[float, int, int]]) -> torch.Tensor:
    """One ``[1, 1, size, size]`` image: the sum of ``a cos(2 pi (k i + m j) / size)`` over ``(a, k, m)``."""
    i = torch.arange(size, dtype=torch.float64).view(-1, 1)
    j = torch.arange(size, dtype=torch.float64).view(1, -1)
    x = sum(a * torch.cos(2 * math.pi * (k * i + m * j) / size) for a, k, m in terms)
    return x.view(1, 1, size, size)


def test_bins_of_period_two_and_four():
    assert lattice_bins(8, 8, 2) == [(0, 4), (4, 0), (4, 4)]
    bins = lattice_bins(64, 32, 4)
    assert len(bins) == 15 and (16, 8) in bins and (48, 24) in bins and (0, 0) not in bins
    assert lattice_bins(64, 32, 4.0) == bins and all(isinstance(v, int) for ab in bins for v in ab)
    with pytest.raises(ValueError, match="divide the image sides, got 64 x 30"):
        lattice_bins(64, 30, 4)
    with pytest.raises(ValueError, match="integer >= 2"):
        lattice_bins(8, 8, 1)


def test_peak_is_the_power_over_its_neighbours_mean_by_hand():
    # a period-4 cosine along the rows (bin (16, 0) and its mirror (48, 0)) and a weaker one at the neighbouring
    # bin (17, 0): every other neighbour is empty, so the ratio is P16 / (P17 / 8) = 8 / eps^2
    eps = 0.1
    x = _cosines(64, [(1.0, 16, 0), (eps, 17, 0)])
    assert lattice_peak(x) == pytest.approx(8 / eps**2, rel=1e-9)
    # the same lattice in three of five images: the median over images is still 800; in two of five it is 0
    flat = torch.zeros(1, 1, 64, 64)
    assert lattice_peak(torch.cat([x, x, x, flat, flat])) == pytest.approx(800, rel=1e-9)
    assert lattice_peak(torch.cat([x, x, flat, flat, flat])) == 0.0


def test_period_two_pattern_counts_at_period_four_and_a_period_eight_one_does_not():
    # a checkerboard (bin (32, 32)) on a smooth ramp
    base = _cosines(64, [(1.0, 1, 0), (0.5, 0, 2)])
    checker = base + _cosines(64, [(0.2, 32, 32)])
    assert lattice_peak(checker) > 1e6 and lattice_peak(checker, period=2) > 1e6
    period8 = base + _cosines(64, [(0.2, 8, 8)])
    assert lattice_peak(period8, period=4) < 1e-6 < 1e6 < lattice_peak(period8, period=8)


def test_images_without_a_lattice_score_about_one():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(400, 1, 64, 64, generator=g)
    # white noise: each bin's power over its 8 neighbours' mean has a median just under 1 over many images
    assert 0.5 < lattice_peak(noise) < 1.3
    smooth = F.avg_pool2d(torch.rand(400, 1, 68, 68, generator=g), 5, stride=1)
    assert lattice_peak(smooth) < 1.3
    # a constant image has no power anywhere: no lattice (not a division by zero)
    assert lattice_peak(torch.full((2, 1, 8, 8), 0.3)) == 0.0


def test_channels_count_as_images_and_batches_do_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 2, 16, 16, generator=g) + _cosines(16, [(0.3, 4, 0)])
    assert lattice_peak(x, batch_size=3) == lattice_peak(x) == lattice_peak(x.reshape(14, 1, 16, 16))


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*\[4, 8, 8\]"):
        lattice_peak(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="at least one image"):
        lattice_peak(torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        lattice_peak(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="divide the image sides, got 8 x 6"):
        lattice_peak(torch.rand(1, 1, 8, 6))
