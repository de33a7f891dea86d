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
"""Issue 16: the hand-written metrics against the libraries' implementations.

- :func:`mann_whitney_auc` equals ``U / (n_pos n_neg)`` with ``U`` from :func:`scipy.stats.mannwhitneyu` (ties count
  one half in both).
- The confusion-matrix metrics (accuracy, macro precision / recall / F1) equal Ignite's ``Accuracy``,
  ``Precision(average=True)``, ``Recall(average=True)`` and ``Fbeta(1.0, average=True)`` on the same predictions,
  fed batch by batch through an engine, including a class that is never predicted (zero division gives 0 in both).
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from ignite.metrics import Accuracy, Fbeta, Precision, Recall
from scipy.stats import mannwhitneyu

from monai_condflow.metrics import ClassificationAccuracy, MacroF1, MacroPrecision, MacroRecall
from monai_condflow.metrics.auc import binary_auc, mann_whitney_auc


def _scipy_auc(pos, neg) -> float:
    u = mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic  # U of the first sample
    return float(u) / (len(pos) * len(neg))


@pytest.mark.parametrize(
    "n_pos, n_neg, levels, seed",
    [(30, 40, None, 0), (25, 25, 4, 1), (7, 91, 3, 2), (100, 3, 10, 3), (1, 1, 2, 4)],
)
def test_auc_equals_scipy_mannwhitneyu(n_pos, n_neg, levels, seed):
    g = torch.Generator().manual_seed(seed)
    if levels is None:  # continuous scores, shifted positives
        pos, neg = torch.randn(n_pos, generator=g) + 0.5, torch.randn(n_neg, generator=g)
    else:  # few distinct values: many ties
        pos = torch.randint(0, levels, (n_pos,), generator=g).double()
        neg = torch.randint(0, levels, (n_neg,), generator=g).double() - 0.5 * (seed % 2)
    expected = _scipy_auc(pos.numpy(), neg.numpy())
    assert mann_whitney_auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    labels = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).long()
    assert binary_auc(torch.cat([pos, neg]), labels) == pytest.approx(expected, abs=1e-12)


def test_auc_all_tied_is_one_half_like_scipy():
    pos, neg = [2.0] * 5, [2.0] * 8
    assert mann_whitney_auc(pos, neg) == pytest.approx(_scipy_auc(pos, neg)) == pytest.approx(0.5)


def _batches(num_classes: int, seed: int, n: int = 120, batch: int = 32, never_predicted: int | None = None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), y] += 1.0  # better than chance
    if never_predicted is not None:
        logits[:, never_predicted] = -1e9
    return [(logits[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _run(metrics: dict, data) -> dict:
    engine = Engine(lambda e, b: b)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    return engine.run(data).metrics


@pytest.mark.parametrize("num_classes, seed, never_predicted", [(2, 0, None), (3, 1, None), (5, 2, None), (3, 3, 1)])
def test_macro_metrics_equal_ignite(num_classes, seed, never_predicted):
    data = _batches(num_classes, seed, never_predicted=never_predicted)
    ours = _run(
        {
            "accuracy": ClassificationAccuracy(num_classes),
            "precision": MacroPrecision(num_classes),
            "recall": MacroRecall(num_classes),
            "f1": MacroF1(num_classes),
        },
        data,
    )
    # Ignite treats [B, 2] logits as multiclass (is_multilabel=False), so the 2-class case is macro over both classes
    theirs = _run(
        {
            "accuracy": Accuracy(),
            "precision": Precision(average=True),
            "recall": Recall(average=True),
            "f1": Fbeta(1.0, average=True),
        },
        data,
    )
    for key in ("accuracy", "precision", "recall", "f1"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-6), key
    if never_predicted is not None:  # the zero-division convention is exercised, not skipped
        assert float(theirs["precision"]) < 1.0
