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
"""Variety of image sets: the per-pixel spread across images and its class-by-class ratio."""

from __future__ import annotations

import math

import pytest
import torch

from monai_condflow.metrics import pixel_spread, variety_ratio


def test_pixel_spread_by_hand():
    # two images, 0 and 1 everywhere: every pixel has population std 0.5
    assert pixel_spread(torch.stack([torch.zeros(1, 3, 3), torch.ones(1, 3, 3)])) == pytest.approx(0.5)
    assert pixel_spread(torch.full((5, 1, 4, 4), 0.3)) == 0.0
    # one pixel varies (values 0, 0, 3: std sqrt(2)), the other seven do not
    x = torch.zeros(3, 2, 2, 2)
    x[2, 1, 0, 1] = 3.0
    assert pixel_spread(x) == pytest.approx(math.sqrt(2.0) / 8)
    # chunked accumulation: the same value as torch's population std over the whole set
    g = torch.Generator().manual_seed(1)
    many = torch.rand(37, 1, 5, 5, generator=g) * 0.3 + 0.6
    expected = many.double().std(0, correction=0).mean().item()
    assert pixel_spread(many, batch_size=8) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        pixel_spread(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        pixel_spread(torch.tensor([[[0.0]], [[float("nan")]]]).reshape(2, 1, 1, 1))


def test_variety_ratio_is_per_class_by_hand():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(12, 1, 6, 6, generator=g)
    labels = torch.tensor([0] * 6 + [1] * 6)
    assert variety_ratio(real, labels, real, labels) == pytest.approx(1.0)
    # class 0 shrunk towards its mean by half, class 1 unchanged: (0.5 + 1) / 2
    syn = real.clone()
    mean0 = real[:6].mean(0, keepdim=True)
    syn[:6] = mean0 + 0.5 * (real[:6] - mean0)
    assert variety_ratio(syn, labels, real, labels) == pytest.approx(0.75)
    # a collapsed generator (one image per class) has no variety, however far apart its two classes are
    collapsed = torch.cat([torch.zeros(6, 1, 6, 6), torch.ones(6, 1, 6, 6)])
    assert variety_ratio(collapsed, labels, real, labels) == 0.0
    assert pixel_spread(collapsed) > pixel_spread(real)  # pooled over classes it would look varied
    # classes with fewer than two images on a side are left out; none left: nan
    assert variety_ratio(syn[:7], labels[:7], real, labels) == pytest.approx(0.5)
    assert math.isnan(variety_ratio(syn[:1], labels[:1], real, labels))


def test_variety_ratio_checks_its_inputs():
    x, y = torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="4 synthetic images with 3 labels"):
        variety_ratio(x, y[:3], x, y)
    with pytest.raises(ValueError, match="differ"):
        variety_ratio(torch.rand(4, 1, 6, 6), y, x, y)
