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
"""Counterfactual encode / decode path of ConditionalGlow, its per-level likelihood split and the target choices."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets import (
    ConditionalGlow,
    class_centroids,
    nearest_of_class,
    restrict_change,
    target_conditions,
)
from tests.networks.nets.test_conditional_glow import COND, conditions, images, perturb


def trained_like(**overrides) -> ConditionalGlow:
    """A small flow with every parameter away from its (identity) initialisation, as after training, with the
    front layers the ``small`` preset uses (PixelNorm, conditional pixel spline) and a null condition."""
    kwargs = dict(num_levels=3, image_size=8, num_steps=2, num_blocks=(1, 2, 1), hidden_channels=8,
                  condition_dim=COND, pixel_norm=True, pixel_spline_bins=4, pixel_spline_conditional=True,
                  cond_dropout=0.1)  # fmt: skip
    torch.manual_seed(0)
    kwargs.update(overrides)
    model = ConditionalGlow(**kwargs).double()
    model.initialize(images(16, kwargs["image_size"]).double(), conditions(16).double())
    perturb(model, 0.2)
    return model.eval()


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_counterfactual_with_own_condition_returns_the_source(guidance):
    model = trained_like()
    x, z = images(4, 8).double(), conditions(4).double()
    x_cf, nu = model.counterfactual(x, z, z, guidance=guidance, return_latents=True)
    assert torch.allclose(x_cf, x, atol=1e-9)
    assert nu.shape == (4, 64)


def test_counterfactual_keeps_the_source_nu_and_changes_the_image():
    model = trained_like()
    x, z, z_new = images(3, 8).double(), conditions(3).double(), conditions(3).double()
    x_cf, nu = model.counterfactual(x, z, z_new, return_latents=True)
    nu_src, _ = model(x, z)
    assert torch.equal(nu, nu_src)
    # the counterfactual's own code under the target condition is the source's code
    nu_cf, _ = model(x_cf, z_new)
    assert torch.allclose(nu_cf, nu_src, atol=1e-8)
    assert (x_cf - x).abs().max() > 1e-3  # the condition does reach the image
    # guided: the same holds under the guided condition of both passes
    x_g, nu_g = model.counterfactual(x, z, z_new, guidance=2.0, return_latents=True)
    nu_back, _ = model(x_g, model.guided(z_new, 2.0))
    assert torch.allclose(nu_back, nu_g, atol=1e-8)


def test_counterfactual_checks_shapes():
    model = trained_like()
    x, z = images(2, 8).double(), conditions(2).double()
    with pytest.raises(ValueError):
        model.counterfactual(x, z, conditions(3).double())


def test_level_log_probs_sum_to_log_prob_and_match_a_hand_split():
    model = trained_like()
    x, z = images(3, 8).double(), conditions(3).double()
    cols = model.level_log_probs(x, z)
    assert cols.shape == (3, model.num_levels + 1)
    assert torch.allclose(cols.sum(1), model.log_prob(x, z), atol=1e-9)
    # by hand: the front layers' log-det, then each level's log-det plus the Gaussian density of what it emits
    log_n = lambda t: -0.5 * (t.pow(2) + torch.log(torch.tensor(2 * torch.pi, dtype=t.dtype))).flatten(1).sum(1)  # noqa: E731
    h, front = model.pixel_norm(x - 0.5)
    h, ld = model.pixel_spline(h, z)
    assert torch.allclose(cols[:, 0], front + ld, atol=1e-10)
    for lvl, keep in enumerate(model._keep_channels):
        h, ld = model.levels[lvl](h, z)
        expected = ld + log_n(h[:, keep:]) if keep < h.shape[1] else ld
        assert torch.allclose(cols[:, lvl + 1], expected, atol=1e-10)
        h = h[:, :keep]


def test_centroids_and_nearest_by_hand():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    cent = class_centroids(z, labels, 2)
    expected0 = torch.nn.functional.normalize((z[0] + z[1]) / 2, dim=0)
    assert torch.allclose(cent[0], expected0) and torch.allclose(cent.norm(dim=1), torch.ones(2))
    query = torch.nn.functional.normalize(torch.tensor([[0.9, 0.5], [0.1, 1.0]]), dim=1)
    got, idx = nearest_of_class(query, z, labels, torch.tensor([1, 0]))
    # query 0 (class-1 target): z[2] (cos 0.49) beats z[3] (cos < 0); query 1 (class-0 target): z[1]
    assert idx.tolist() == [2, 1] and torch.equal(got, z[[2, 1]])
    assert torch.equal(target_conditions(query, torch.tensor([1, 0]), z, labels, 2, "nearest"), z[[2, 1]])
    assert torch.equal(target_conditions(query, torch.tensor([1, 0]), z, labels, 2, "centroid"), cent[[1, 0]])
    with pytest.raises(ValueError):
        class_centroids(z, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        target_conditions(query, torch.tensor([1, 0]), z, labels, 2, "median")


def test_restrict_change_keeps_the_source_outside_the_mask():
    torch.manual_seed(1)
    source, cf = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2] = 1.0  # top half of image 0 may change
    mask[1] = 0.25  # image 1: a quarter of the way everywhere
    out = restrict_change(source, cf, mask)
    assert torch.equal(out[0, 0, :2], cf[0, 0, :2]) and torch.equal(out[0, 0, 2:], source[0, 0, 2:])
    assert torch.allclose(out[1], 0.75 * source[1] + 0.25 * cf[1])
    assert torch.equal(restrict_change(source, cf, torch.ones(1, 1, 1, 1)), cf)
    with pytest.raises(ValueError, match="shape"):
        restrict_change(source, cf[:1], mask)
    with pytest.raises(ValueError, match="broadcast"):
        restrict_change(source, cf, torch.ones(3, 1, 4, 4))
    with pytest.raises(ValueError, match="broadcast"):  # would turn the 1-channel source into 3 channels
        restrict_change(source, cf, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        restrict_change(source, cf, mask * 2)
    with pytest.raises(ValueError, match="NaN"):
        restrict_change(source, cf, torch.full((2, 1, 4, 4), float("nan")))
    # a float64 mask follows the source's dtype
    assert restrict_change(source, cf, mask.double()).dtype == source.dtype
