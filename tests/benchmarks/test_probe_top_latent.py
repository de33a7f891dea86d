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
"""benchmarks/probe_top_latent.py without a trained flow: the sources' parsing, the mixture fit and the samplers."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("probe_top_latent")


def test_sources_parse_and_bad_ones_are_named(probe, tmp_path, capsys):
    assert probe.parse_source("gmm:64:8") == ("gmm", (64.0, 8.0))
    assert probe.parse_source("own+noise:0.3") == ("own+noise", (0.3,))
    assert probe.parse_source("standard") == ("standard", ())
    for bad in ("gmm:64", "owncoef:0:0", "gmm:4:0", "own:1", "pca:3", "own+noise:x", "own+noise:-1"):
        with pytest.raises(ValueError, match="--sources"):
            probe.parse_source(bad)
    with pytest.raises(SystemExit):
        probe.parse_args([str(tmp_path), "--flows", str(tmp_path), "--sources", "gmm:64"])
    assert "'gmm:64'" in capsys.readouterr().err
    args = probe.parse_args([str(tmp_path), "--flows", str(tmp_path)])
    assert args.out == tmp_path.resolve() and args.sources == list(probe.DEFAULT_SOURCES)


def test_mixture_fit_recovers_separated_clusters(probe):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0, 0.0, 2.0], [5.0, 4.0, -3.0]], dtype=torch.double)
    sizes = (300, 100)
    x = torch.cat([c + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.double) for c, n in zip(centres, sizes)])
    weights, means, variances = probe.fit_diag_gmm(x, 2, torch.Generator().manual_seed(1), var_floor=1e-4)
    order = means[:, 0].argsort()
    torch.testing.assert_close(means[order], centres, atol=0.15, rtol=0)
    torch.testing.assert_close(weights[order], torch.tensor([0.75, 0.25], dtype=torch.double), atol=0.01, rtol=0)
    torch.testing.assert_close(variances[order], torch.full((2, 3), 0.25, dtype=torch.double), atol=0.06, rtol=0)
    # more components than rows: one per row
    assert probe.fit_diag_gmm(x[:3], 8, torch.Generator().manual_seed(0))[0].shape == (3,)


def test_samplers(probe):
    g = torch.Generator().manual_seed(0)
    n, d = 60, 12
    top = torch.randn(n, d, generator=g, dtype=torch.double) @ torch.randn(d, d, generator=g, dtype=torch.double)
    classes = (torch.arange(n) % 2).long()
    idx = torch.tensor([3, 7, 11])
    own = probe.top_sampler("own", (), top, classes, 0.9)(idx, torch.Generator())
    assert torch.equal(own, top[idx])
    # all directions kept, no residual noise: the own latents back
    full = probe.top_sampler("owncoef", (float(d), 0.0), top, classes, 0.9)(idx, torch.Generator())
    torch.testing.assert_close(full, top[idx])
    # two directions: the projection onto the two leading principal directions
    mean, vh = probe.principal_basis(top)
    two = probe.top_sampler("owncoef", (2.0, 0.0), top, classes, 0.9)(idx, torch.Generator())
    expected = mean + (top[idx] - mean) @ vh[:2].T @ vh[:2]
    torch.testing.assert_close(two, expected)
    assert not torch.allclose(two, top[idx], atol=1e-3)
    standard = probe.top_sampler("standard", (), top, classes, 0.5)(
        torch.arange(4000), torch.Generator().manual_seed(0)
    )
    assert abs(float(standard.std()) - 0.5) < 0.01 and abs(float(standard.mean())) < 0.01
    noisy = probe.top_sampler("own+noise", (0.2,), top, classes, 0.9)(torch.arange(n).repeat(50), torch.Generator())
    assert abs(float((noisy - top.repeat(50, 1)).std()) - 0.2) < 0.01


def test_mixture_sampler_keeps_each_class_apart(probe):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 6
    classes = (torch.arange(n) % 2).long()
    centres = torch.tensor([[4.0] * d, [-4.0] * d], dtype=torch.double)
    top = centres[classes] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.double)
    draw = probe.top_sampler("gmm", (2.0, 3.0), top, classes, 1.0)
    samples = draw(torch.arange(n), torch.Generator().manual_seed(2))
    for c in (0, 1):
        torch.testing.assert_close(samples[classes == c].mean(0), centres[c], atol=0.3, rtol=0)
    spread = (samples[classes == 0] - samples[classes == 0].mean(0)).std()
    assert 0.15 < float(spread) < 0.6  # the classes' own spread, not the pooled one (~4)
