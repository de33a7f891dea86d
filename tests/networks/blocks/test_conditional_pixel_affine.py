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
"""Tests for the condition-computed per-pixel affine flow layer."""

from __future__ import annotations

import math

import pytest
import torch

from monai_condflow.networks.blocks.conditional_pixel_affine import ConditionalPixelAffine
from monai_condflow.networks.blocks.coupling import GuidedCondition
from monai_condflow.networks.nets import ConditionalGlow


def _layer(seed: int = 0) -> ConditionalPixelAffine:
    torch.manual_seed(seed)
    layer = ConditionalPixelAffine(2, 1, (8, 8), condition_dim=5, factor=2).double()
    with torch.no_grad():
        layer.proj.weight.normal_()
        layer.proj.bias.normal_(std=0.3)
    return layer


def test_fresh_layer_is_the_identity():
    layer = ConditionalPixelAffine(2, 2, (8, 8), condition_dim=3).double()
    x, z = torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y, logdet = layer(x, z)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4, dtype=torch.float64))


def test_exact_inverse_logdet_against_the_jacobian_and_the_condition_matters():
    layer = _layer()
    x, z = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    y, logdet = layer(x, z)
    back, inv_logdet = layer.inverse(y, z)
    assert torch.allclose(back, x, atol=1e-12) and torch.allclose(inv_logdet, -logdet, atol=1e-12)
    for b in range(3):
        zb = z[b : b + 1]
        jac = torch.autograd.functional.jacobian(lambda t, zb=zb: layer(t.view(1, 1, 8, 8), zb)[0].flatten(), x[b])
        assert torch.logdet(jac.reshape(64, 64)).item() == pytest.approx(logdet[b].item(), abs=1e-9)
    other, _ = layer(x, torch.randn(3, 5, dtype=torch.float64))
    assert (other - y).abs().mean() > 0.1
    # bounded: a huge condition cannot move a pixel by more than shift_bound, or scale it beyond exp(scale_bound)
    far, _ = layer(torch.zeros(1, 1, 8, 8, dtype=torch.float64), 1e6 * torch.ones(1, 5, dtype=torch.float64))
    assert far.abs().max() <= layer.shift_bound * math.exp(layer.scale_bound) * (1 + 1e-9)


def test_guidance_mixes_the_parameters_at_the_condition_and_the_null():
    layer = _layer(1)
    x, z, null = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, 5)
    null = null.double()
    assert torch.allclose(layer(x, GuidedCondition(z, null, 1.0))[0], layer(x, z)[0])
    assert torch.allclose(layer(x, GuidedCondition(z, null, 0.0))[0], layer(x, null)[0])
    guided = GuidedCondition(z, null, 3.0)
    y, logdet = layer(x, guided)
    back, inv_logdet = layer.inverse(y, guided)
    assert torch.allclose(back, x, atol=1e-12) and torch.allclose(inv_logdet, -logdet, atol=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        ConditionalPixelAffine(2, 1, (9, 8), condition_dim=5, factor=2)
    layer = _layer()
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        layer(torch.zeros(2, 1, 4, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="one condition row per image"):
        layer(torch.zeros(2, 1, 8, 8), None)


def test_conditional_glow_option_round_trips_and_persists():
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=2, num_blocks=1, hidden_channels=8, condition_pixels=True
    ).double()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.randn(4, 32, dtype=torch.float64), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        flow.condition_pixels.proj.weight.normal_()
    nu, logdet = flow(x, z)
    back, inv_logdet = flow.inverse(nu, z)
    assert torch.allclose(back, x, atol=1e-10) and torch.allclose(inv_logdet, -logdet, atol=1e-8)
    flow.log_prob(x, z).sum().backward()
    assert flow.condition_pixels.proj.weight.grad.abs().sum() > 0
    other = ConditionalGlow(**flow.config).double()
    other.load_state_dict(flow.state_dict())
    assert other.config["condition_pixels"] is True and torch.equal(other(x, z)[0], nu)
