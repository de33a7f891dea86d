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
"""Tests for the per-pixel rational-quadratic spline flow layer."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.blocks.pixel_spline import PixelSpline


def _perturbed(seed: int = 0, **kwargs) -> PixelSpline:
    torch.manual_seed(seed)
    layer = PixelSpline(2, 1, (3, 3), **{"num_bins": 6, "tail_bound": 2.0, **kwargs}).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.5 * torch.randn(p.shape, dtype=p.dtype, device=p.device))
    return layer


def test_fresh_layer_is_the_identity():
    layer = PixelSpline(2, 2, (4, 4)).double()
    x = 3 * torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.allclose(y, x, atol=1e-7) and torch.allclose(logdet, torch.zeros(5, dtype=torch.float64), atol=1e-6)


def test_exact_inverse_and_logdet_against_the_brute_force_jacobian():
    layer = _perturbed()
    x = 1.5 * torch.randn(4, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = 3.0  # outside the interval: identity there
    y, logdet = layer(x)
    assert not torch.allclose(y, x)  # the perturbed spline is not the identity
    assert y[0, 0, 0, 0] == 3.0
    back, inv_logdet = layer.inverse(y)
    assert torch.allclose(back, x, atol=1e-10) and torch.allclose(inv_logdet, -logdet, atol=1e-10)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda t: layer(t.view(1, 1, 3, 3))[0].flatten(), x[b].flatten())
        assert torch.logdet(jac).item() == pytest.approx(logdet[b].item(), abs=1e-9)


def test_monotone_and_continuous_at_every_knot():
    layer = _perturbed(seed=1)
    grid = torch.linspace(-3, 3, 2001, dtype=torch.float64)
    y, _ = layer(grid.view(-1, 1, 1, 1).expand(-1, 1, 3, 3).contiguous())
    assert (y[1:] - y[:-1] > 0).all()  # strictly increasing
    knots_x, _, _ = layer._knots()  # [1, 3, 3, bins + 1], the interval's ends included
    with torch.no_grad():
        left, _ = layer((knots_x - 1e-9).movedim(-1, 0))
        right, _ = layer((knots_x + 1e-9).movedim(-1, 0))
    assert (right - left).abs().max() < 1e-6  # no jump at any knot (slopes here are below 1e3)


def test_bad_arguments_and_shapes_are_refused():
    with pytest.raises(ValueError, match="num_bins"):
        PixelSpline(2, 1, (3, 3), num_bins=1)
    with pytest.raises(ValueError, match="dimensions"):
        PixelSpline(2, 1, (3, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, 1, 3, 3\]"):
        PixelSpline(2, 1, (3, 3))(torch.zeros(2, 1, 4, 4))


def test_conditional_spline_is_exact_depends_on_the_condition_and_guides_monotonically():
    from monai_condflow.networks.blocks.coupling import GuidedCondition

    torch.manual_seed(0)
    layer = PixelSpline(2, 1, (8, 8), num_bins=6, tail_bound=2.0, condition_dim=5, condition_factor=2).double()
    x, z = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(layer(x, z)[0], x, atol=1e-7)  # zero-initialised map: the identity for every z
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn(p.shape, dtype=p.dtype, device=p.device))
    y, logdet = layer(x, z)
    back, inv_logdet = layer.inverse(y, z)
    assert torch.allclose(back, x, atol=1e-10) and torch.allclose(inv_logdet, -logdet, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t.view(1, 1, 8, 8), z[:1])[0].flatten(), x[0].flatten())
    assert torch.logdet(jac).item() == pytest.approx(logdet[0].item(), abs=1e-9)
    assert (layer(x, torch.randn(3, 5, dtype=torch.float64))[0] - y).abs().mean() > 0.05
    # guidance mixes the raw knot parameters, so an extrapolated spline (w = 3) is still monotone and invertible
    guided = GuidedCondition(z[:1].expand(2001, -1), torch.zeros(2001, 5, dtype=torch.float64), 3.0)
    grid = torch.linspace(-3, 3, 2001, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    out, out_logdet = layer(grid, guided)
    assert (out[1:] - out[:-1] > 0).all()
    assert torch.allclose(layer.inverse(out, guided)[0], grid, atol=1e-8)
    with pytest.raises(ValueError, match="one condition row per image"):
        layer(x, None)
    with pytest.raises(ValueError, match="divisible"):
        PixelSpline(2, 1, (6, 6), condition_dim=5, condition_factor=4)
