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
"""Classifier-free guidance, condition dropout, score-based denoising and pre-clamp sample counts of ConditionalGlow."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.blocks.coupling import GuidedCondition
from monai_condflow.networks.nets.conditional_glow import SAMPLE_RANGE, ConditionalGlow, clamp_decoded

TINY = {"num_levels": 3, "num_steps": 2, "num_blocks": (1, 1, 1), "hidden_channels": 8, "image_size": 16}


def _trained_like(cond_dropout=0.2, noise_std=0.0, seed=0) -> tuple[ConditionalGlow, torch.Tensor, torch.Tensor]:
    """A tiny flow whose couplings and priors are not the identity (zero-initialised last convs perturbed)."""
    torch.manual_seed(seed)
    flow = ConditionalGlow(condition_dim=6, cond_dropout=cond_dropout, noise_std=noise_std, **TINY)
    x = torch.rand(4, 1, 16, 16) * 0.8 + 0.1
    z = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "conv_out" in name or "proj" in name:
                p.normal_(0, 0.05)
        if flow.null_condition is not None:
            flow.null_condition.normal_()
    return flow.eval(), x, z


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 3.5])
def test_guided_flow_is_an_exact_bijection_for_a_fixed_weight(w):
    flow, x, z = _trained_like()
    g = flow.guided(z, w)
    with torch.no_grad():
        nu, logdet = flow(x, g)
        back, inv_logdet = flow.inverse(nu, g)
    assert (back - x).abs().max().item() < 1e-5
    assert (logdet + inv_logdet).abs().max().item() < 1e-3 * logdet.abs().max().item()


def test_guidance_weights_one_and_zero_are_the_conditional_and_the_null_model():
    flow, x, z = _trained_like()
    with torch.no_grad():
        nu_cond, _ = flow(x, z)
        nu_w1, _ = flow(x, GuidedCondition(z, flow.null_condition.expand(4, -1), 1.0))
        nu_null, _ = flow(x, flow.null_condition.expand(4, -1).contiguous())
        nu_w0, _ = flow(x, flow.guided(z, 0.0))
        nu_w2, _ = flow(x, flow.guided(z, 2.0))
    assert torch.allclose(nu_w1, nu_cond, atol=1e-5)
    assert torch.allclose(nu_w0, nu_null, atol=1e-5)
    assert (nu_w2 - nu_cond).abs().max().item() > 1e-3  # guidance changes the map
    assert flow.guided(z, 1.0) is z


def test_guided_log_scale_is_the_linear_mix_of_conditional_and_null():
    flow, _, z = _trained_like()
    coupling = flow.levels[0][1][2]  # level 0: squeeze, then steps (actnorm, conv, coupling)
    h = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        s_c, t_c = coupling._scale_shift(h, z)
        s_n, t_n = coupling._scale_shift(h, flow.null_condition.expand(4, -1).contiguous())
        s_w, t_w = coupling._scale_shift(h, flow.guided(z, 2.5))
    assert torch.allclose(s_w, s_n + 2.5 * (s_c - s_n), atol=1e-6)
    assert torch.allclose(t_w, t_n + 2.5 * (t_c - t_n), atol=1e-6)


def test_guidance_needs_a_null_condition_and_valid_settings():
    flow, _, z = _trained_like(cond_dropout=0.0)
    assert flow.null_condition is None
    with pytest.raises(ValueError, match="null condition"):
        flow.guided(z, 2.0)
    with pytest.raises(ValueError, match="cond_dropout"):
        ConditionalGlow(condition_dim=6, cond_dropout=1.0, **TINY)
    with pytest.raises(ValueError, match="guidance"):
        ConditionalGlow(condition_dim=6, guidance=2.0, **TINY)  # no null condition to guide with
    with pytest.raises(ValueError, match="noise_std"):
        ConditionalGlow(condition_dim=6, noise_std=-0.1, **TINY)


def test_condition_dropout_replaces_rows_by_the_null_condition_at_its_rate():
    flow, _, _ = _trained_like(cond_dropout=0.25)
    z = torch.nn.functional.normalize(torch.randn(4000, 6), dim=1)
    out = flow.drop_condition(z, generator=torch.Generator().manual_seed(0))
    dropped = (out == flow.null_condition).all(1)
    kept = (out == z).all(1)
    assert bool((dropped | kept).all())
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert flow.drop_condition(None) is None


def test_denoise_step_is_sigma_squared_times_the_score():
    flow, x, z = _trained_like(noise_std=0.05)
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(flow.log_prob(xg, z).sum(), xg)
    expected = x + 0.05**2 * score
    assert torch.allclose(flow.denoise(x, z), expected, atol=1e-6)
    assert torch.equal(flow.denoise(x, z, sigma=0.0), x)


def test_sample_denoises_only_a_noise_trained_flow_and_counts_before_clamping(monkeypatch):
    flow, _, z = _trained_like(noise_std=0.05)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    raw, base = flow.sample(z, 0.9, g(), denoise=False, return_stats=True)
    den, _ = flow.sample(z, 0.9, g(), return_stats=True)
    assert (raw - den).abs().max().item() > 0  # the denoising step ran
    lo, hi = SAMPLE_RANGE

    # a decode that overflows: some pixels far outside [0, 1], some NaN; the clamp must not hide them
    real_inverse = flow.inverse

    def broken_inverse(nu, condition=None, spatial_size=None):
        x, ld = real_inverse(nu, condition, spatial_size)
        x = x.clone()
        x[0, 0, 0, :3] = hi + 1.0
        x[1, 0, 1, :2] = float("nan")
        x[2, 0, 2, 0] = lo - 1.0
        x[3, 0, 3, 0] = 1.1  # above 1 but within the sane range: clamped, not counted
        return x, ld

    monkeypatch.setattr(flow, "inverse", broken_inverse)
    x, stats = flow.sample(z, 0.9, g(), denoise=False, return_stats=True)
    # counted on top of whatever this untrained flow overflows by itself
    assert (stats["overflow_pixels"] - base["overflow_pixels"]).tolist() == [3, 2, 1, 0]
    assert (stats["nonfinite_pixels"] - base["nonfinite_pixels"]).tolist() == [0, 2, 0, 0]
    assert bool(torch.isfinite(x).all()) and x.min() >= 0 and x.max() <= 1


def test_clamp_decoded_counts_before_it_clamps():
    lo, hi = SAMPLE_RANGE
    x = torch.full((3, 1, 2, 2), 0.5)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = hi + 0.5, lo - 0.5  # two overflowed
    x[1, 0, 1, 0], x[1, 0, 1, 1] = float("nan"), float("inf")  # two non-finite (also overflowed)
    x[2, 0, 0, 0] = 1.1  # above 1, inside the sane range: clamped, not counted
    out, overflow, nonfinite = clamp_decoded(x)
    assert overflow.tolist() == [2, 2, 0] and nonfinite.tolist() == [0, 2, 0]
    assert out[1, 0, 1].tolist() == [0.5, 1.0] and out[0, 0, 0].tolist() == [1.0, 0.0] and out[2, 0, 0, 0] == 1.0
