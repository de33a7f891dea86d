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
"""Tests for the per-pixel affine normalisation flow layer."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.blocks.pixel_norm import PixelNorm


def test_identity_until_initialised_and_exact_inverse():
    layer = PixelNorm(2, 1, (4, 4)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))
    layer.initialize(torch.rand(16, 1, 4, 4, dtype=torch.float64) * 2 + 1)
    assert bool(layer.initialized)
    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-12) and torch.allclose(inv_logdet, -logdet)


def test_statistics_and_logdet_against_jacobian():
    torch.manual_seed(0)
    layer = PixelNorm(2, 2, (3, 3), min_std=1e-3).double()
    batch = torch.randn(64, 2, 3, 3, dtype=torch.float64) * torch.linspace(0.5, 2.0, 18).view(1, 2, 3, 3) + 3.0
    y, _ = layer.initialize(batch)
    # a constant image at every pixel: mean 3 up to the smoothing of a constant field, std follows the scales
    assert torch.allclose(layer.mean, torch.full_like(layer.mean, 3.0), atol=0.35)
    assert y.shape == batch.shape
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], x).reshape(18, 18)
    assert torch.allclose(torch.logdet(jac), layer(x)[1][0], atol=1e-10)


def test_min_std_floor_and_state_dict_roundtrip():
    layer = PixelNorm(2, 1, (4, 4), min_std=0.1)
    layer.initialize(torch.ones(8, 1, 4, 4))  # zero spread everywhere -> the floor
    assert torch.allclose(layer.log_std, torch.full_like(layer.log_std, torch.log(torch.tensor(0.1)).item()))
    fresh = PixelNorm(2, 1, (4, 4), min_std=0.1)
    fresh.load_state_dict(layer.state_dict())
    x = torch.rand(2, 1, 4, 4)
    assert bool(fresh.initialized) and torch.equal(fresh(x)[0], layer(x)[0])


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[B, 1, 4, 4\]"):
        PixelNorm(2, 1, (4, 4))(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="dimensions"):
        PixelNorm(2, 1, (4, 4, 4))
