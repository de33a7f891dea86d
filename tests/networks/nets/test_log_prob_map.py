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
"""``ConditionalGlow.log_prob_map``: the per-pixel split of ``log p(x | z)`` sums to it and stays where the image
changed; the layers record nothing outside ``recording_logdet_maps``."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.blocks.flow_sequential import _LOGDET_MAPS, record_logdet_map, recording_logdet_maps
from monai_condflow.networks.nets import ConditionalGlow
from tests.networks.nets.test_conditional_glow import COND, conditions, images, perturb

BASE = dict(num_levels=3, num_steps=2, num_blocks=(1, 2, 1), hidden_channels=8, condition_dim=COND, pixel_norm=True,
            pixel_spline_bins=4, pixel_spline_conditional=True, cond_dropout=0.1)  # fmt: skip


def trained(size: int = 8, spatial_dims: int = 2, **overrides) -> ConditionalGlow:
    torch.manual_seed(0)
    model = ConditionalGlow(spatial_dims=spatial_dims, image_size=size, **{**BASE, **overrides}).double()
    x = images(16, size).double()
    if spatial_dims == 3:
        x = x[..., None].expand(-1, -1, -1, -1, size).contiguous()
    model.initialize(x, conditions(16).double() if model.condition_dim else None)
    perturb(model, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"condition_pixels": True, "spatial_top_prior": True}, {"condition_dim": 0, "cond_dropout": 0.0},
     {"pixel_norm": False, "pixel_spline_bins": 0}],
    ids=["small-like", "pixel-affine+spatial-top", "unconditional", "plain-glow"],
)  # fmt: skip
def test_map_sums_to_log_prob(overrides):
    model = trained(**overrides)
    x = images(3, 8).double()
    z = conditions(3).double() if model.condition_dim else None
    with torch.no_grad():
        m = model.log_prob_map(x, z)
        lp = model.log_prob(x, z)
    assert m.shape == (3, 8, 8)
    assert torch.allclose(m.sum((1, 2)), lp, atol=1e-9, rtol=0)
    assert m.std() > 0  # not one constant spread evenly


def test_map_sums_to_log_prob_with_guidance_and_in_3d():
    model = trained()
    x, z = images(2, 8).double(), conditions(2).double()
    guided = model.guided(z, 2.0)
    with torch.no_grad():
        assert torch.allclose(model.log_prob_map(x, guided).sum((1, 2)), model.log_prob(x, guided), atol=1e-9)
    model3 = trained(spatial_dims=3, num_levels=2, num_blocks=(1, 1), pixel_spline_bins=0)
    x3 = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        m3 = model3.log_prob_map(x3, z)
        assert m3.shape == (2, 8, 8, 8)
        assert torch.allclose(m3.sum((1, 2, 3)), model3.log_prob(x3, z), atol=1e-9)


def test_a_local_change_moves_the_map_where_it_happened():
    """Changing a 4 x 4 corner of a 16 x 16 image: most of the map's change lies in that corner's 8 x 8 quadrant
    (a map spread evenly would put a quarter there)."""
    model = trained(size=16)
    x, z = images(4, 16).double(), conditions(4).double()
    x2 = x.clone()
    x2[..., :4, :4] = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        change = (model.log_prob_map(x2, z) - model.log_prob_map(x, z)).abs()
    share = change[:, :8, :8].sum((1, 2)) / change.sum((1, 2))
    assert (share > 0.6).all(), share


def test_layers_record_only_inside_the_context():
    model = trained()
    x, z = images(2, 8).double(), conditions(2).double()
    calls = []
    record_logdet_map(lambda: calls.append(1) or torch.zeros(1))  # outside: not evaluated, nothing kept
    assert calls == [] and _LOGDET_MAPS.get() is None
    with recording_logdet_maps() as outer:
        with torch.no_grad():
            model(x, z)
        with recording_logdet_maps() as inner:
            record_logdet_map(lambda: torch.ones(2, 3, 3))
        n_outer = len(outer)
    assert len(inner) == 1 and n_outer > 0
    assert all(t.shape[0] == 2 and t.ndim == 3 for t in outer)  # [B, *spatial] per layer
    assert _LOGDET_MAPS.get() is None
    with torch.no_grad():  # the inverse records nothing even inside the context
        nu, _ = model(x, z)
        with recording_logdet_maps() as during_inverse:
            model.inverse(nu, z)
    assert during_inverse == []
