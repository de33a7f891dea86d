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
"""FittedLatentPrior: the fitted mean and covariance, the draw / whiten bijection, shrinkage, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.blocks.coupling import GuidedCondition
from monai_condflow.networks.blocks.latent_prior import FittedLatentPrior, LatentMoments

D, C = 5, 3


def _gaussian_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=g, dtype=torch.float64)
    bias = torch.randn(D, generator=g, dtype=torch.float64)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5 + torch.eye(D, dtype=torch.float64)
    cov = mix @ mix.T
    z = torch.randn(n, C, generator=g, dtype=torch.float64)
    t = z @ weight + bias + torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return z, t, weight, bias, cov


def _fitted(z, t, shrinkage=1e-9, batches=1):
    moments = LatentMoments(D, C)
    for zb, tb in zip(z.chunk(batches), t.chunk(batches)):
        moments.update(tb, zb)
    prior = FittedLatentPrior(D, C)
    info = prior.fit(moments, shrinkage=shrinkage, ridge=0.0)
    return prior, info


def test_fit_recovers_the_mean_and_covariance_of_a_known_gaussian():
    z, t, weight, bias, cov = _gaussian_data(20000)
    prior, info = _fitted(z, t)
    assert info["count"] == 20000 and prior.fitted and float(prior.shrinkage) == pytest.approx(1e-9)
    assert torch.allclose(prior.loc_weight[:-1].double(), weight, atol=0.05)
    assert torch.allclose(prior.loc_weight[-1].double(), bias, atol=0.05)
    fitted_cov = prior.scale_tril.double() @ prior.scale_tril.double().T
    assert torch.allclose(fitted_cov, cov, atol=0.1 * float(cov.diagonal().mean()))
    # the linear mean explains the share of the variance it should: 1 - tr(cov) / total variance
    total = float((t - t.mean(0)).pow(2).sum(1).mean())
    assert info["explained_by_condition"] == pytest.approx(1 - float(cov.trace()) / total, abs=0.02)


def test_streaming_batches_give_the_same_fit_as_one_batch():
    z, t, *_ = _gaussian_data(300)
    one, _ = _fitted(z, t, shrinkage=0.3)
    many, _ = _fitted(z, t, shrinkage=0.3, batches=7)
    assert torch.allclose(one.loc_weight, many.loc_weight, atol=1e-5)
    assert torch.allclose(one.scale_tril, many.scale_tril, atol=1e-5)


def test_shrinkage_one_keeps_only_the_fitted_variances():
    z, t, *_ = _gaussian_data(500)
    full, _ = _fitted(z, t, shrinkage=1e-9)
    diag, _ = _fitted(z, t, shrinkage=1.0)
    assert torch.count_nonzero(torch.tril(diag.scale_tril, diagonal=-1)) == 0
    full_cov = full.scale_tril.double() @ full.scale_tril.double().T
    assert torch.allclose(diag.scale_tril.diagonal().double().pow(2), full_cov.diagonal(), rtol=1e-4)
    # half-way: the off-diagonal entries are halved, the diagonal kept
    half, _ = _fitted(z, t, shrinkage=0.5)
    half_cov = half.scale_tril.double() @ half.scale_tril.double().T
    off = ~torch.eye(D, dtype=torch.bool)
    assert torch.allclose(half_cov[off], 0.5 * full_cov[off], atol=1e-4)
    assert torch.allclose(half_cov.diagonal(), full_cov.diagonal(), rtol=1e-4)


def test_draw_and_whiten_are_inverse_and_the_draws_have_the_fitted_moments():
    z, t, *_ = _gaussian_data(400)
    prior, _ = _fitted(z, t, shrinkage=0.2)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(8, C, generator=g)
    eps = torch.randn(8, D, generator=g)
    drawn = prior.draw(eps, cond)
    assert torch.allclose(prior.whiten(drawn, cond), eps, atol=1e-4)
    many = prior.draw(torch.randn(40000, D, generator=g), torch.zeros(40000, C))
    cov = prior.scale_tril @ prior.scale_tril.T
    assert torch.allclose(many.mean(0), prior.loc_weight[-1], atol=0.05)
    assert torch.allclose(torch.cov(many.T), cov, atol=0.08 * float(cov.diagonal().mean()))


def test_guided_condition_guides_the_linear_mean():
    z, t, *_ = _gaussian_data(200)
    prior, _ = _fitted(z, t, shrinkage=0.5)
    cond, null = torch.randn(4, C), torch.randn(4, C)
    eps = torch.zeros(4, D)
    at = prior.draw(eps, cond)
    at_null = prior.draw(eps, null)
    guided = prior.draw(eps, GuidedCondition(cond, null, 3.0))
    assert torch.allclose(guided, at_null + 3.0 * (at - at_null), atol=1e-4)


def test_an_unfitted_prior_is_empty_and_checkpoints_round_trip(tmp_path):
    prior = FittedLatentPrior(D, C)
    assert not prior.fitted and prior.loc_weight.numel() == 0 and prior.scale_tril.numel() == 0
    with pytest.raises(RuntimeError, match="not been fitted"):
        prior.draw(torch.zeros(1, D), torch.zeros(1, C))
    z, t, *_ = _gaussian_data(100)
    fitted, _ = _fitted(z, t, shrinkage=0.4)
    torch.save(fitted.state_dict(), tmp_path / "p.pt")
    fresh = FittedLatentPrior(D, C)
    fresh.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert fresh.fitted and torch.equal(fresh.scale_tril, fitted.scale_tril)
    assert float(fresh.shrinkage) == pytest.approx(0.4)
    old = FittedLatentPrior(D, C)
    old.load_state_dict({})  # a checkpoint from before the prior existed: loads unfitted
    assert not old.fitted
    with pytest.raises(ValueError, match=r"scale_tril has shape \[4, 4\], expected \[5, 5\]"):
        FittedLatentPrior(D, C).load_state_dict({"scale_tril": torch.eye(4)})


def test_bad_values_are_refused_with_the_reason():
    moments = LatentMoments(D, C)
    with pytest.raises(ValueError, match="at least 2 latents"):
        FittedLatentPrior(D, C).fit(moments)
    z, t, *_ = _gaussian_data(50)
    moments.update(t, z)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="shrinkage must be in"):
            FittedLatentPrior(D, C).fit(moments, shrinkage=bad)
    with pytest.raises(ValueError, match="moments of D=5"):
        FittedLatentPrior(D + 1, C).fit(moments)
    t_bad = t.clone()
    t_bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LatentMoments(D, C).update(t_bad, z)
    with pytest.raises(ValueError, match=r"expected conditions \[50, 3\]"):
        LatentMoments(D, C).update(t, None)
    prior, _ = _fitted(z.double(), t.double())
    with pytest.raises(ValueError, match=r"expected a condition \[2, 3\]"):
        prior.draw(torch.zeros(2, D), torch.zeros(2, C + 1))
