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
"""Novelty statistics: flow_statistics against the flow's own likelihood, scores against a hand computation."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from monai_condflow.metrics.novelty import NoveltyScorer, flow_statistics, novelty_map, png_bits_per_dim
from tests.networks.nets.test_conditional_glow import conditions, images
from tests.networks.nets.test_counterfactual import trained_like


def perturbed_background() -> torch.nn.Module:
    """A second flow: the trained-like flow with every parameter moved a little (seeded)."""
    background = trained_like()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in background.parameters():
            p.add_(0.01 * torch.randn(p.shape, dtype=p.dtype, device=p.device))
    return background


def test_flow_statistics_match_bits_per_dim_and_png_length():
    flow = trained_like()
    x, z = images(3, 8).double(), conditions(3).double()
    stats = flow_statistics(flow, x, z)
    assert torch.allclose(stats["bpd"], flow.bits_per_dim(x, z).double(), atol=1e-9)
    assert torch.allclose(stats["level_bpd"].sum(1) + 8, stats["bpd"], atol=1e-12)
    assert stats["level_bpd"].shape == (3, flow.num_levels + 1)
    # PNG length of image 1, by hand
    buf = io.BytesIO()
    Image.fromarray(np.rint(x[1, 0].numpy() * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    assert stats["png_bpd"][1].item() == pytest.approx(len(buf.getvalue()) * 8 / 64)
    assert png_bits_per_dim(torch.zeros(1, 1, 64, 64))[0] < png_bits_per_dim(torch.rand(1, 1, 64, 64))[0]


def test_scores_against_a_brute_force_computation():
    ref = {"bpd": torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64),
           "level_bpd": torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 5.0]], dtype=torch.float64),
           "png_bpd": torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64)}  # fmt: skip
    new = {"bpd": torch.tensor([7.0, 4.5], dtype=torch.float64),
           "level_bpd": torch.tensor([[2.0, 3.0], [0.0, 2.0]], dtype=torch.float64),
           "png_bpd": torch.tensor([6.0, 1.0], dtype=torch.float64)}  # fmt: skip
    assert NoveltyScorer("bpd")(new).tolist() == [7.0, 4.5]
    assert NoveltyScorer("complexity")(new).tolist() == [1.0, 3.5]
    assert NoveltyScorer("typicality", ref)(new).tolist() == [2.0, 0.5]
    # per level: mean (2, 3), sample std (1, sqrt(3)); image 0 z = (0, 0), image 1 z = (-2, -1/sqrt(3))
    got = NoveltyScorer("level_typicality", ref)(new)
    expected = [0.0, math.sqrt((4 + 1 / 3) / 2)]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        NoveltyScorer("typicality")(new)
    with pytest.raises(ValueError):
        NoveltyScorer("likelihood")


def test_likelihood_ratio_is_bpd_minus_the_background_flows_bpd():
    flow, background = trained_like(), perturbed_background()
    x, z = images(3, 8).double(), conditions(3).double()
    stats = flow_statistics(flow, x, z, background=background)
    assert torch.allclose(stats["background_bpd"], background.eval().bits_per_dim(x, z).double(), atol=1e-9)
    score = NoveltyScorer("likelihood_ratio")(stats)  # no reference needed
    assert torch.allclose(score, stats["bpd"] - stats["background_bpd"], atol=0)
    assert (score.abs() > 0).all()
    hand = {"bpd": torch.tensor([5.0, 6.0]), "background_bpd": torch.tensor([4.5, 7.0])}
    assert NoveltyScorer("likelihood_ratio")(hand).tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="background"):
        NoveltyScorer("likelihood_ratio")(flow_statistics(flow, x, z))


def test_novelty_map_is_the_per_pixel_share_of_bits_and_of_the_likelihood_ratio():
    flow, background = trained_like(), perturbed_background()
    x, z = images(3, 8).double(), conditions(3).double()
    stats = flow_statistics(flow, x, z, background=background)
    own = novelty_map(flow, x, z)
    assert own.shape == (3, 8, 8) and own.dtype == torch.float64
    assert torch.allclose(own.sum((1, 2)), 64 * (stats["bpd"] - 8), atol=1e-8)  # -log2 p split over 64 pixels
    ratio = novelty_map(flow, x, z, background=background)
    assert torch.allclose(ratio.sum((1, 2)), 64 * (stats["bpd"] - stats["background_bpd"]), atol=1e-8)
    ref = ratio[:2].mean(0)
    centred = novelty_map(flow, x, z, background=background, reference_mean=ref)
    assert torch.allclose(centred, ratio - ref, atol=1e-12)
    assert torch.allclose(centred[:2].mean(0), torch.zeros(8, 8, dtype=torch.float64), atol=1e-12)
    assert flow.training is False and background.training is False


def test_max_softmax_score_by_hand():
    from monai_condflow.metrics.novelty import max_softmax_score

    logits = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]))
    out = max_softmax_score(logits)
    assert out.dtype == torch.float64 and torch.allclose(out, torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64))
