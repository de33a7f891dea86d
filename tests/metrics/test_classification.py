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
"""Tests of the classification report and its Ignite metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from monai_condflow.metrics import (
    ClassificationAccuracy,
    ClassificationReportMetric,
    MacroF1,
    MacroPrecision,
    MacroRecall,
    classification_report,
    confusion_matrix,
)

# 3 classes; confusion matrix (rows true, cols predicted) [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 1, 0, 1, 2, 2]
HAND = {
    "accuracy": 4 / 6,
    "precision": [2 / 2, 1 / 2, 1 / 2],
    "recall": [2 / 3, 1 / 2, 1 / 1],
    "f1": [0.8, 0.5, 2 / 3],
}


def test_report_matches_hand_values():
    report = classification_report(Y_TRUE, Y_PRED, num_classes=3)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["accuracy"] == pytest.approx(HAND["accuracy"])
    for key in ("precision", "recall", "f1"):
        assert report["per_class"][key] == pytest.approx(HAND[key])
    assert report["macro_precision"] == pytest.approx(np.mean(HAND["precision"]))
    assert report["macro_recall"] == pytest.approx(13 / 18)
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report["per_class"]["support"] == [3, 2, 1]
    assert report["num_samples"] == 6


@pytest.mark.parametrize("as_type", [list, np.asarray, torch.tensor])
def test_report_accepts_array_likes(as_type):
    report = classification_report(as_type(Y_TRUE), as_type(Y_PRED), num_classes=3)
    assert report["accuracy"] == pytest.approx(HAND["accuracy"])


def test_zero_division_gives_zero():
    # class 2 never occurs and is never predicted; class 1 is predicted once
    report = classification_report([0, 0, 1, 1], [0, 0, 0, 1], num_classes=3)
    assert report["per_class"]["precision"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert report["per_class"]["recall"] == pytest.approx([1.0, 0.5, 0.0])
    assert report["per_class"]["f1"] == pytest.approx([0.8, 2 / 3, 0.0])
    assert report["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 3)
    empty = classification_report([], [], num_classes=2)
    assert empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix([0, 1], [0], num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0], [0], num_classes=0)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.5], [0], num_classes=2)


def _logits(pred: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float() * 3.0 - 1.0


@pytest.mark.parametrize(
    "metric_cls, expected",
    [
        (ClassificationAccuracy, 4 / 6),
        (MacroF1, (0.8 + 0.5 + 2 / 3) / 3),
        (MacroPrecision, 2 / 3),
        (MacroRecall, 13 / 18),
    ],
)
def test_ignite_metrics_accumulate_batches(metric_cls, expected):
    metric = metric_cls(num_classes=3)
    with pytest.raises(NotComputableError):
        metric.compute()
    # two batches: logits for the first, class ids for the second
    metric.update((_logits(Y_PRED[:4], 3), torch.tensor(Y_TRUE[:4])))
    metric.update((torch.tensor(Y_PRED[4:]), torch.tensor(Y_TRUE[4:])))
    assert metric.compute() == pytest.approx(expected)
    metric.reset()
    with pytest.raises(NotComputableError):
        metric.compute()


def test_metric_on_engine_with_decollated_lists():
    """MONAI engines with decollate=True hand over lists of per-sample tensors."""
    batches = [(Y_PRED[:3], Y_TRUE[:3]), (Y_PRED[3:], Y_TRUE[3:])]

    def step(engine, batch):
        pred, true = batch
        return {"pred": list(_logits(pred, 3)), "label": [torch.tensor(t) for t in true]}

    engine = Engine(step)
    ClassificationReportMetric(3, output_transform=lambda o: (o["pred"], o["label"])).attach(engine, "report")
    MacroF1(3, output_transform=lambda o: (o["pred"], o["label"])).attach(engine, "f1")
    engine.run(batches, max_epochs=1)
    report = engine.state.metrics["report"]
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert engine.state.metrics["f1"] == pytest.approx(report["macro_f1"])
    assert engine.state.metrics["accuracy"] == pytest.approx(4 / 6)  # dict entries are copied by Ignite


def test_one_hot_labels_and_state_dict():
    metric = MacroRecall(num_classes=2)
    y = torch.tensor([0, 1, 1])
    metric.update((_logits([0, 1, 0], 2), torch.nn.functional.one_hot(y, 2)))
    assert metric.compute() == pytest.approx((1.0 + 0.5) / 2)
    state = metric.state_dict()
    other = MacroRecall(num_classes=2)
    other.load_state_dict(state)
    assert other.compute() == pytest.approx((1.0 + 0.5) / 2)
