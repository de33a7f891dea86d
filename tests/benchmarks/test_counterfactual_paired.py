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
"""benchmarks/counterfactual_paired.py: the paired phantom slices and the counterfactual figures by hand."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("counterfactual_paired")


class _Mean(torch.nn.Module):
    """A stand-in classifier: class 1 when the image's mean exceeds 0.5; ``embed`` = (mean, 1 - mean), normalised."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], dim=1)

    def embed(self, x):
        m = x.flatten(1).mean(1)
        return torch.nn.functional.normalize(torch.stack([m, 1 - m], dim=1), dim=1)


def test_figures_by_hand(bench):
    source = torch.zeros(2, 1, 2, 2)
    truth = torch.zeros(2, 1, 2, 2)
    truth[:, 0, 0, :] = 1.0  # the true change: the top row (the "lungs")
    mask = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    mask[:, 0, 0, :] = True
    cf = torch.zeros(2, 1, 2, 2)
    cf[0, 0, 0, :] = 0.8  # image 0: the right change, inside the mask: mean 0.4 -> class 0
    cf[1, 0, 1, :] = 1.0  # image 1: the bottom row instead, outside the mask ...
    cf[1, 0, 0, 0] = 0.6  # ... and a bit inside: mean 0.65 -> class 1
    bank = torch.stack([torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.1)])
    labels = torch.tensor([1, 0])
    out = bench.counterfactual_figures(source, cf, truth, mask, 1, _Mean(), bank, labels)
    assert out["flip"] == pytest.approx(0.5)  # image 1 is called class 1, image 0 is not
    # |cf - truth|: image 0 sqrt(0.08) < |source - truth| sqrt(2); image 1 sqrt(0.16 + 1 + 2) > sqrt(2)
    assert out["closer_pixel"] == pytest.approx(0.5)
    # share inside the mask: image 0 all of it, image 1 0.36 / 2.36
    assert out["in_lungs"] == pytest.approx((1.0 + 0.36 / 2.36) / 2)
    # |cf - source| against the nearest class-1 bank slice (0.9 everywhere): image 0 sqrt(1.28) < sqrt(1.64), kept;
    # image 1 sqrt(2.36) > sqrt(0.09 + 0.81 + 0.01 + 0.01), not kept
    assert out["anatomy_kept"] == pytest.approx(0.5)
    # embeddings (m, 1 - m) normalised: truth m = 0.5; image 0 m = 0.4 is nearer it than the source's m = 0, and
    # image 1 m = 0.65 too
    assert out["closer_embedding"] == pytest.approx(1.0)


def test_paired_slices_differ_inside_the_lungs_only(bench):
    pairs = bench.paired_slices(2, 7, image_size=32)
    assert pairs["with"].shape == pairs["without"].shape == pairs["mask"].shape == (2, 1, 32, 32)
    assert pairs["mask"].dtype == torch.bool and pairs["mask"].any()
    diff = (pairs["with"] - pairs["without"]).pow(2)
    assert float(diff.sum()) > 0  # COVID-19 findings were drawn
    share = float((diff * pairs["mask"]).sum() / diff.sum())
    assert share > 0.9  # the findings are in the lungs (the resized mask's border loses a little)


def test_summary_mean_and_sample_std(bench):
    runs = [{d: {f: v for f in bench.FIGURES} for d in bench.DIRECTIONS} for v in (0.2, 0.4, 0.9)]
    out = bench.summarize(runs)
    flip = out["covid->non-covid"]["flip"]
    assert flip["mean"] == pytest.approx(0.5) and flip["per_run"] == [0.2, 0.4, 0.9]
    assert flip["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5, abs=1e-4)
