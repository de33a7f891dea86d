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
"""Privacy audits: exact DCR on toy data, near-copy flags, the likelihood-threshold attack, and the report block."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
from monai_condflow.networks.nets.pepx_net import PEPXNet
from monai_condflow.privacy.audits import (
    dcr_audit,
    dcr_statistics,
    distance_to_closest_record,
    membership_inference_auc,
    membership_inference_scores,
    privacy_section,
    privacy_summary,
)


def _points(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, -1)  # [N, C=1, 1, W]


@pytest.mark.parametrize("batch_size", [1, 256])
def test_dcr_exact_l2_l1_cosine(batch_size):
    ref = _points([[0.0, 1.0], [6.0, 8.0]])
    query = _points([[0.0, 0.0], [3.0, 4.0]])
    dcr, idx = distance_to_closest_record(query, ref, "l2", batch_size, return_index=True)
    assert dcr.dtype == torch.float64 and dcr.shape == (2,)
    assert dcr[0].item() == 1.0 and dcr[1].item() == pytest.approx(3 * math.sqrt(2), abs=1e-12)  # vs (0,1)
    assert idx.tolist() == [0, 0]
    assert distance_to_closest_record(query, ref, "l1", batch_size).tolist() == [1.0, 6.0]
    cos_q = _points([[1.0, 0.0], [3.0, 4.0]])
    cos, cos_idx = distance_to_closest_record(cos_q, ref, "cosine", batch_size, return_index=True)
    assert cos.tolist() == pytest.approx([0.4, 0.0], abs=1e-12)  # (1,0).(0.6,0.8) = 0.6; (3,4) parallel to (6,8)
    assert cos_idx.tolist() == [1, 1]


def test_dcr_of_a_training_copy_is_zero_and_errors():
    train = torch.rand(5, 1, 4, 4)
    assert distance_to_closest_record(train, train).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="metric"):
        distance_to_closest_record(train, train, metric="chebyshev")
    with pytest.raises(ValueError, match="values"):
        distance_to_closest_record(train, torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="empty"):
        distance_to_closest_record(train[:0], train)


# 1-D toy set: train {0, 10, 20}; held-out {1, 12, 23} -> DCR {1, 2, 3}; synthetic {10, 20.5, 5} -> DCR {0, 0.5, 5}
TRAIN, HOLD, SYN = _points([[0.0], [10.0], [20.0]]), _points([[1.0], [12.0], [23.0]]), _points([[10.0], [20.5], [5.0]])


def test_dcr_statistics_hand_computed():
    stats = dcr_statistics(torch.tensor([0.0, 0.5, 5.0]), torch.tensor([1.0, 2.0, 3.0]), threshold=1.5)
    assert stats["near_copy_indices"] == [0, 1] and stats["n_near_copies"] == 2
    assert stats["near_copy_fraction"] == pytest.approx(2 / 3) and stats["expected_fraction"] == pytest.approx(1 / 3)
    assert stats["synthetic_median"] == 0.5 and stats["holdout_median"] == 2.0 and stats["median_ratio"] == 0.25
    assert stats["synthetic_min"] == 0.0 and stats["holdout_mean"] == 2.0
    assert stats["closer_auc"] == pytest.approx(6 / 9)  # 0 and 0.5 are below all three held-out values, 5 below none
    # quantile threshold: the median of {1, 2, 3} is 2 -> the same two flags; only 1 of the held-out is below it
    by_quantile = dcr_statistics(torch.tensor([0.0, 0.5, 5.0]), torch.tensor([1.0, 2.0, 3.0]), near_copy_quantile=0.5)
    assert by_quantile["threshold"] == 2.0 and by_quantile["near_copy_indices"] == [0, 1]
    # same distribution: nothing closer than the held-out set, AUC 1/2
    same = dcr_statistics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), near_copy_quantile=0.0)
    assert same["n_near_copies"] == 0 and same["closer_auc"] == 0.5 and same["median_ratio"] == 1.0


def test_a_holdout_with_copies_of_training_images_is_reported_as_an_audit_that_cannot_tell():
    """Held-out images that are training images (DCR 0) made the threshold 0, "0 near-copies" and a ratio of inf:
    a clean-looking audit of nothing. The count is kept and the report says so."""
    g = torch.Generator().manual_seed(1)
    train = torch.rand(10, 1, 4, 4, generator=g)
    holdout = torch.cat([train[:6], torch.rand(4, 1, 4, 4, generator=g)])  # 6 of 10 copied
    pixel = dcr_audit(train[:3].clone(), train, holdout, near_copy_quantile=0.01)["pixel"]
    assert pixel["holdout_copies"] == 6 and pixel["threshold"] == 0.0 and pixel["n_near_copies"] == 0
    text = privacy_section(privacy_summary(dcr_audit(train[:3].clone(), train, holdout)))
    assert "**This audit cannot tell:** 6 held-out image(s) are exact copies of training images" in text
    clean = privacy_section(privacy_summary(dcr_audit(SYN, TRAIN, HOLD)))
    assert "cannot tell" not in clean and dcr_statistics(torch.ones(2), torch.ones(3))["holdout_copies"] == 0


def test_dcr_audit_pixel_and_embedding_space():
    result = dcr_audit(SYN, TRAIN, HOLD, feature_extractor=lambda x: 2.0 * x.flatten(1), near_copy_quantile=0.5)
    pixel, emb = result["pixel"], result["embedding"]
    assert pixel["threshold"] == 2.0 and pixel["near_copy_indices"] == [0, 1]
    assert pixel["nearest_train_indices"] == [1, 2]  # 10 -> train[1], 20.5 -> train[2]
    assert pixel["synthetic_mean"] == pytest.approx(5.5 / 3) and pixel["metric"] == "l2"
    assert emb["threshold"] == 4.0 and emb["near_copy_indices"] == [0, 1] and emb["synthetic_median"] == 1.0
    only_pixel = dcr_audit(SYN, TRAIN, HOLD, threshold=0.25)
    assert only_pixel["embedding"] is None and only_pixel["pixel"]["near_copy_indices"] == [0]


def test_dcr_audit_flags_memorised_copies():
    g = torch.Generator().manual_seed(0)
    train, holdout = torch.rand(20, 1, 8, 8, generator=g), torch.rand(20, 1, 8, 8, generator=g)
    synthetic = torch.cat([train[[3, 7, 11]], torch.rand(17, 1, 8, 8, generator=g)])
    pixel = dcr_audit(synthetic, train, holdout, near_copy_quantile=0.01)["pixel"]
    assert pixel["near_copy_indices"][:3] == [0, 1, 2] and pixel["nearest_train_indices"][:3] == [3, 7, 11]
    assert pixel["synthetic_min"] == 0.0 and pixel["expected_fraction"] == pytest.approx(1 / 20)
    # fresh draws are flagged only at about the held-out rate (1 in 20 here): at most a few of the 17
    assert pixel["n_near_copies"] - 3 <= 3
    exact = dcr_audit(synthetic, train, holdout, threshold=1e-9)["pixel"]
    assert exact["near_copy_indices"] == [0, 1, 2] and exact["nearest_train_indices"] == [3, 7, 11]


class _MeanBpdFlow(nn.Module):
    """A stand-in flow whose bits/dim is the image mean (records the conditions it gets)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.conditions: list[torch.Tensor] = []

    def bits_per_dim(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_bits: int = 8) -> torch.Tensor:
        self.conditions.append(condition)
        return x.flatten(1).mean(1) + n_bits


def test_membership_inference_separable_is_one():
    flow = _MeanBpdFlow()
    train = torch.full((4, 1, 2, 2), 0.2)  # lower bpd: the attack calls them members
    holdout = torch.full((3, 1, 2, 2), 0.8)
    result = membership_inference_auc(flow, lambda x: x.flatten(1)[:, :2], train, holdout, batch_size=2)
    assert result["auc"] == 1.0 and result["advantage"] == 1.0
    assert result["train_bpd_mean"] == pytest.approx(8.2) and result["bpd_gap"] == pytest.approx(0.6)
    assert result["n_train"] == 4 and result["n_holdout"] == 3
    assert all(c.shape == (c.shape[0], 2) for c in flow.conditions)
    assert membership_inference_auc(flow, None, holdout, train)["auc"] == 0.0


def _tiny_models() -> tuple[ConditionalGlow, PEPXNet]:
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=1, num_blocks=1, hidden_channels=4, condition_dim=8
    )
    flow.mark_initialized()
    clf = PEPXNet(2, 1, 2, embedding_dim=8, channels=(4, 8), blocks=(1, 1), norm="group")
    return flow, clf


def test_membership_inference_on_a_conditional_glow():
    flow, clf = _tiny_models()
    flow.train(), clf.train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 16, 16, generator=g)
    scores = membership_inference_scores(flow, clf, images[:5], n_bits=8, batch_size=2)
    with torch.no_grad():
        expected = flow.eval().bits_per_dim(images[:5], clf.eval().embed(images[:5]), n_bits=8).double()
    flow.train(), clf.train()
    assert torch.allclose(scores, expected, atol=1e-5)
    # members == non-members: every score tied with its twin -> exactly 1/2
    assert membership_inference_auc(flow, clf, images[:8], images[:8])["auc"] == 0.5
    # two independent draws of one distribution: close to 1/2 (sd ~ 0.07 for 32 vs 32)
    assert abs(membership_inference_auc(flow, clf, images[:32], images[32:])["auc"] - 0.5) < 0.25
    assert flow.training and clf.training  # modes restored


def test_privacy_summary_and_section():
    dcr = dcr_audit(SYN, TRAIN, HOLD, near_copy_quantile=0.5)
    mia = {"auc": 0.53, "advantage": 0.1, "train_bpd_mean": 4.0, "holdout_bpd_mean": 4.1}
    summary = privacy_summary(dcr=dcr, mia=mia, epsilon=7.5, delta=1e-5, dp_covers="every flow parameter")
    assert {"epsilon", "delta", "mia_auc", "dcr"} <= set(summary)
    assert summary["epsilon"] == 7.5 and summary["mia_auc"] == 0.53 and summary["dcr"]["embedding"] is None
    assert "near_copy_indices" not in summary["dcr"]["pixel"] and summary["dcr"]["pixel"]["n_near_copies"] == 2
    json.dumps(summary)  # JSON-ready
    text = privacy_section(summary)
    assert text.startswith("## Privacy") and "epsilon = 7.5" in text and "AUC = 0.530" in text
    assert "| pixel (l2) | 0.5 | 2 | 0.250 | 0.667 | 2 | 2/3 (66.7%) | 33.3% |" in text
    empty = privacy_section(privacy_summary())
    assert "not** trained with DP-SGD" in empty and "No privacy audit" in empty
