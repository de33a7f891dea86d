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
"""Exact ROC AUC from ranks (Mann-Whitney U), with ties counted as one half.

For scores ``s`` of ``n_pos`` positives and ``n_neg`` negatives,

.. math::
    \\mathrm{AUC} = P(s^+ > s^-) + \\tfrac12 P(s^+ = s^-)
    = \\frac{R^+ - n^+ (n^+ + 1) / 2}{n^+ n^-},

where ``R^+`` is the sum of the mid-ranks of the positives in the pooled sample. Used by the membership-inference
audit (:mod:`monai_condflow.privacy.audits`): an AUC of 0.5 means the attack cannot tell members from non-members.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["mann_whitney_auc", "binary_auc", "max_advantage"]

logger = logging.getLogger(__name__)


def _as_scores(values: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    scores = torch.as_tensor(values).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: the AUC needs at least one positive and one negative score.")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN ({int(torch.isnan(scores).sum())} of {scores.numel()}).")
    return scores


def _midranks(pooled: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``pooled`` ``[N]`` with tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)  # rank of the last element of each tie group
    mid = last - (counts.to(torch.float64) - 1.0) / 2.0
    return mid[inverse]


def mann_whitney_auc(positive: torch.Tensor | Sequence[float], negative: torch.Tensor | Sequence[float]) -> float:
    """Exact AUC of "higher score means positive".

    Args:
        positive: ``[n_pos]`` scores of the positive class (e.g. training members); ``+-inf`` allowed.
        negative: ``[n_neg]`` scores of the negative class (e.g. held-out non-members).

    Returns:
        AUC in ``[0, 1]``: 1.0 when every positive outscores every negative, 0.5 for identical score sets.

    Raises:
        ValueError: an empty set or a NaN score.
    """
    pos = _as_scores(positive, "positive")
    neg = _as_scores(negative, "negative")
    ranks = _midranks(torch.cat([pos, neg]))
    n_pos, n_neg = pos.numel(), neg.numel()
    u_stat = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def binary_auc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]) -> float:
    """:func:`mann_whitney_auc` from one score vector and 0/1 labels (1 = positive).

    Args:
        scores: ``[N]``.
        labels: ``[N]`` of 0 and 1.
    """
    scores_t = torch.as_tensor(scores).reshape(-1)
    labels_t = torch.as_tensor(labels).reshape(-1)
    if scores_t.shape != labels_t.shape:
        raise ValueError(f"scores {list(scores_t.shape)} and labels {list(labels_t.shape)} differ in shape.")
    if not bool(((labels_t == 0) | (labels_t == 1)).all()):
        raise ValueError("labels must be 0 or 1.")
    return mann_whitney_auc(scores_t[labels_t == 1], scores_t[labels_t == 0])


def max_advantage(positive: torch.Tensor | Sequence[float], negative: torch.Tensor | Sequence[float]) -> float:
    """Largest ``TPR - FPR`` of a threshold attack ``score >= t`` over every threshold (the membership advantage).

    Args:
        positive: ``[n_pos]`` positive scores.
        negative: ``[n_neg]`` negative scores.

    Returns:
        ``max_t TPR(t) - FPR(t)`` in ``[0, 1]`` (the threshold above every score gives 0).
    """
    pos = _as_scores(positive, "positive")
    neg = _as_scores(negative, "negative")
    thresholds = torch.unique(torch.cat([pos, neg]))
    tpr = (pos[None, :] >= thresholds[:, None]).double().mean(1)
    fpr = (neg[None, :] >= thresholds[:, None]).double().mean(1)
    return float(max((tpr - fpr).max().item(), 0.0))
