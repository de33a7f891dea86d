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
"""Tests for the embedding FID (functions and Ignite metric) against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from monai_condflow.metrics.fid import (
    EmbeddingFID,
    embedding_fid,
    extract_features,
    fid_floor,
    fid_from_features,
    fid_to_floor_ratio,
    frechet_distance,
)


class _MeanPool(nn.Module):
    """Feature stand-in: 4 quadrant means of a [B, 1, 4, 4] image -> [B, 4]; ``embed`` is what FID uses."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits, must not be used
        raise AssertionError("FID must use embed(), not forward()")


def _gauss(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_sets_zero():
    x = _gauss(200, 5, 0)
    assert fid_from_features(x, x.clone()) == pytest.approx(0.0, abs=1e-8)


def test_shift_is_squared_norm():
    # same sample covariance, means differ by `shift` -> FID = |shift|^2 exactly
    x = _gauss(300, 4, 1)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert fid_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_scaled_set_hand_computed():
    # Y = 2X: sqrt(S * 4S) = 2S -> FID = |mean(X)|^2 + Tr(S) + 4 Tr(S) - 4 Tr(S) = |mean(X)|^2 + Tr(S)
    x = _gauss(400, 3, 2)
    s = torch.cov(x.T)
    expected = float(x.mean(0) @ x.mean(0) + torch.trace(s))
    assert fid_from_features(x, 2 * x) == pytest.approx(expected, rel=1e-6)


def test_independent_gaussians_closed_form():
    # N(0, I) vs N(m, 4 I) in D dims: |m|^2 + D * (1 + 4 - 2 * 2) = |m|^2 + D
    d, m = 3, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a, b = _gauss(20000, d, 3), 2 * _gauss(20000, d, 4) + m
    assert fid_from_features(a, b) == pytest.approx(float(m @ m) + d, rel=0.03)


def test_too_few_samples_message():
    with pytest.raises(ValueError, match=r"N=4 .*D=4"):
        fid_from_features(_gauss(4, 4, 0), _gauss(50, 4, 1))


def test_embedding_fid_uses_embed_and_floor_ratio():
    net = _MeanPool()
    imgs = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    feats = extract_features(net, imgs, batch_size=10)
    assert feats.shape == (64, 4)
    assert embedding_fid(net, imgs, imgs, batch_size=7) == pytest.approx(0.0, abs=1e-8)
    shifted = embedding_fid(net, imgs, imgs + 0.5, batch_size=16)
    assert shifted == pytest.approx(4 * 0.25, rel=1e-5)  # 4 features each shifted by 0.5
    floor = fid_floor(net, imgs[:32], imgs[32:], batch_size=16)
    assert floor > 0
    assert fid_to_floor_ratio(shifted, floor) == pytest.approx(shifted / floor)
    assert fid_to_floor_ratio(0.0, 0.0) == 1.0 and math.isinf(fid_to_floor_ratio(1.0, 0.0))


def test_metric_batches_equal_function():
    a, b = _gauss(150, 4, 5), _gauss(170, 4, 6) + 0.3
    metric = EmbeddingFID()
    for i in range(0, 150, 40):
        metric.update((a[i : i + 40], b[i : i + 40]))
    metric.update((a[:0], b[160:]))
    assert metric.compute() == pytest.approx(fid_from_features(a, b), rel=1e-8)
    metric.reset()
    with pytest.raises(NotComputableError):
        metric.compute()


def test_metric_images_on_engine():
    net = _MeanPool()
    real = torch.rand(60, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    batches = [(real[i : i + 20] + 0.5, real[i : i + 20]) for i in range(0, 60, 20)]
    engine = Engine(lambda e, batch: batch)
    EmbeddingFID(net, batch_size=8).attach(engine, "fid")
    state = engine.run(batches, max_epochs=1)
    assert state.metrics["fid"] == pytest.approx(1.0, rel=1e-5)


def test_metric_errors():
    metric = EmbeddingFID()
    with pytest.raises(ValueError, match="feature_extractor"):
        metric.update((torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)))
    metric.update((_gauss(3, 4, 0), _gauss(3, 4, 1)))
    with pytest.raises(ValueError, match=r"N=3 .*D=4"):
        metric.compute()


def test_one_dimensional_features_closed_form():
    # 1-D Frechet distance: (m1 - m2)^2 + (s1 - s2)^2
    a = _gauss(500, 1, 7)
    b = 3 * a + 2
    m1, s1 = float(a.mean()), float(a.std())
    expected = (m1 - (3 * m1 + 2)) ** 2 + (s1 - 3 * s1) ** 2
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_works_with_a_scipy_without_sqrtm_disp(monkeypatch):
    """SciPy 1.18 removed ``sqrtm(disp=...)`` (which MONAI 1.6's FIDMetric passes): the FID must not need it.

    Replaces the old "clear error" test: with Ignite's ``fid_score`` the value is computed, and it is the same.
    """
    import scipy.linalg

    original = scipy.linalg.sqrtm
    calls = []

    def sqrtm_without_disp(a, **kwargs):
        if "disp" in kwargs:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        calls.append(a.shape)
        return original(a, **kwargs)

    x, y = _gauss(64, 4, 0), 1.5 * _gauss(80, 4, 1)
    before = fid_from_features(x, y + 1.0)
    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    assert fid_from_features(x, y + 1.0) == pytest.approx(before, rel=1e-12)
    assert calls == [(4, 4)]  # the patched sqrtm was the one used
    metric = EmbeddingFID()
    metric.update((y + 1.0, x))
    assert metric.compute() == pytest.approx(before, rel=1e-9)


# FID values of the implementation before issue 16 (MONAI 1.6.1 FIDMetric / compute_frechet_distance, SciPy 1.17.1)
# on fixed float64 features: the Ignite-based distance must reproduce them.
_PREVIOUS_VALUES = [
    ((300, 8, 11, 1.5, 0.3), 2.7578806242598084, 2.7578806242597977),
    ((120, 32, 21, None, None), 8.14642936258015, 8.1464293625801),
    ((200, 2, 31, None, None), 4.008910658992518, 4.008910658992519),
]


def _previous_case(n: int, d: int, seed: int, scale: float | None, shift: float | None):
    a = _gauss(n, d, seed)
    if scale is not None:
        return a, scale * _gauss(250, d, seed + 1) + shift
    if d == 32:
        return a, _gauss(140, d, seed + 1) @ torch.linspace(0.5, 1.5, d, dtype=torch.float64).diag()
    return a, _gauss(n, d, seed + 1) * torch.tensor([1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("case, functional, metric", _PREVIOUS_VALUES)
def test_values_equal_those_of_monai_fidmetric(case, functional, metric):
    a, b = _previous_case(*case)
    assert fid_from_features(a, b) == pytest.approx(functional, rel=1e-6)
    m = EmbeddingFID()
    m.update((a, b))
    assert m.compute() == pytest.approx(metric, rel=1e-6)


def test_frechet_distance_is_ignites_fid_score():
    from ignite.metrics.gan.fid import fid_score

    a, b = _gauss(100, 3, 5), 2.0 * _gauss(90, 3, 6) - 1.0
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    assert frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(fid_score(mu_a, mu_b, s_a, s_b), rel=1e-12)
