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
"""Tests for the Laplacian fine-detail energy and the synthetic / real sharpness ratio (hand-computed values)."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.metrics.sharpness import laplacian_energy, sharpness_ratio


def test_laplacian_energy_hand_values():
    impulse = torch.zeros(1, 1, 3, 3)
    impulse[0, 0, 1, 1] = 1.0
    assert laplacian_energy(impulse) == pytest.approx(4.0)  # one interior pixel: |4 * 1 - 0|
    # 4 x 4 ramp along the columns: the Laplacian of a linear function is 0 at every interior pixel
    ramp = torch.arange(4.0).repeat(4, 1).reshape(1, 1, 4, 4)
    assert laplacian_energy(ramp) == pytest.approx(0.0)
    # a single bright pixel at (1, 1) of a 4 x 4 image: interior responses 4 at (1, 1), -1 at (1, 2) and (2, 1),
    # 0 at (2, 2) -> (4 + 1 + 1 + 0) / 4
    dot = torch.zeros(2, 1, 4, 4)
    dot[0, 0, 1, 1] = 1.0
    assert laplacian_energy(dot) == pytest.approx(6.0 / 8.0)  # the second image is all zeros: 8 interior pixels
    assert laplacian_energy(dot, batch_size=1) == pytest.approx(6.0 / 8.0)


def test_sharpness_ratio_orders_blur_and_noise():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    assert sharpness_ratio(real, real) == pytest.approx(1.0)
    assert sharpness_ratio(smooth, real) < 0.5
    assert sharpness_ratio(real + 0.5 * torch.randn(8, 1, 16, 16, generator=g), real) > 1.0
    assert torch.isnan(torch.tensor(sharpness_ratio(real, torch.ones(2, 1, 8, 8))))


def test_laplacian_energy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        laplacian_energy(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="3 x 3"):
        laplacian_energy(torch.zeros(1, 1, 2, 8))
    with pytest.raises(ValueError, match="non-finite"):
        laplacian_energy(torch.full((1, 1, 4, 4), float("nan")))
