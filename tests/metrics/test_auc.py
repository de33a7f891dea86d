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
"""Exact rank-based AUC (Mann-Whitney) and the threshold-attack advantage, on hand-computed cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from monai_condflow.metrics.auc import binary_auc, mann_whitney_auc, max_advantage


def _pairwise_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_perfectly_separable_is_one_and_reversed_is_zero():
    assert mann_whitney_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert mann_whitney_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_identical_sets_give_one_half():
    assert mann_whitney_auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5
    assert mann_whitney_auc([7.0] * 4, [7.0] * 5) == 0.5


def test_ties_count_one_half():
    # pairs (1,2)=0, (1,3)=0, (2,2)=1/2, (2,3)=0 -> 0.5 / 4
    assert mann_whitney_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.125, abs=1e-15)
    # pairs vs neg [1, 2]: 3 beats both, 2 beats 1 and ties 2 -> (2 + 1.5) / 4
    assert mann_whitney_auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875, abs=1e-15)


def test_infinite_scores_are_ranked():
    # pairs (inf,-inf)=1, (inf,0)=1, (0,-inf)=1, (0,0)=1/2 -> 3.5 / 4
    assert mann_whitney_auc([float("inf"), 0.0], [float("-inf"), 0.0]) == pytest.approx(0.875, abs=1e-15)


def test_matches_pairwise_definition_with_many_ties():
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 5, (37,), generator=g).double().tolist()
    neg = torch.randint(1, 6, (23,), generator=g).double().tolist()
    assert mann_whitney_auc(pos, neg) == pytest.approx(_pairwise_auc(pos, neg), abs=1e-12)


def test_binary_auc_and_errors():
    assert binary_auc([0.1, 0.9, 0.4, 0.6], [0, 1, 0, 1]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        mann_whitney_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mann_whitney_auc([float("nan")], [1.0])
    with pytest.raises(ValueError, match="0 or 1"):
        binary_auc([0.1, 0.2], [0, 2])


def test_max_advantage_hand_computed():
    assert max_advantage([3.0, 4.0], [1.0, 2.0]) == 1.0
    # t=2: TPR 1, FPR 1/2 -> 1/2 is the best threshold
    assert max_advantage([2.0, 3.0], [1.0, 3.0]) == pytest.approx(0.5)
    # interleaved: no threshold beats chance
    assert max_advantage([1.0, 3.0], [2.0, 4.0]) == 0.0
