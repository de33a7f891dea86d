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
"""Classification report (accuracy, macro F1 / precision / recall) as a function and as Ignite metrics.

The paper's evaluation protocol (TSTR) reports accuracy, macro-F1, macro precision and macro recall. Every quantity
here is derived from one ``num_classes x num_classes`` confusion matrix (rows: true class, columns: predicted class),
so the Ignite metrics only accumulate that matrix and all-reduce it across ranks before computing.

Zero-division convention (as scikit-learn's ``zero_division=0``): a class that is never predicted has precision 0, a
class that never occurs has recall 0, and F1 is 0 when precision + recall is 0. Macro averages are unweighted means
over *all* ``num_classes`` classes, absent ones included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")
reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)
sync_all_reduce, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "sync_all_reduce", as_type="decorator"
)
NotComputableError, _ = optional_import(
    "ignite.exceptions", IgniteInfo.OPT_IMPORT_VERSION, min_version, "NotComputableError"
)

__all__ = [
    "confusion_matrix",
    "report_from_confusion_matrix",
    "classification_report",
    "ClassificationReportMetric",
    "ClassificationAccuracy",
    "MacroF1",
    "MacroPrecision",
    "MacroRecall",
]

logger = logging.getLogger(__name__)


def _as_class_ids(values: Any, name: str) -> torch.Tensor:
    """Turn a sequence / array / tensor of class ids into a 1-D ``int64`` tensor (a tensor keeps its device)."""
    if isinstance(values, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in values):
        tensor = torch.cat([torch.as_tensor(v).reshape(-1) for v in values])
    elif isinstance(values, torch.Tensor):
        tensor = values
    else:
        tensor = torch.as_tensor(np.asarray(values))
    if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
        raise ValueError(f"{name} must hold integer class ids, got non-integer values.")
    return tensor.reshape(-1).long()


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> torch.Tensor:
    """Count matrix ``cm[i, j]`` = number of samples of true class ``i`` predicted as class ``j``.

    Args:
        y_true: true class ids, any array-like of shape ``[N]``.
        y_pred: predicted class ids, shape ``[N]``.
        num_classes: number of classes ``C``.

    Returns:
        ``int64`` tensor ``[C, C]`` on the device of ``y_true`` (CPU for non-tensor inputs).

    Raises:
        ValueError: on mismatched lengths, a non-positive ``num_classes`` or a class id outside ``[0, C)``.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    t = _as_class_ids(y_true, "y_true")
    p = _as_class_ids(y_pred, "y_pred").to(t.device)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.numel()} and {p.numel()}.")
    for name, ids in (("y_true", t), ("y_pred", p)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(
                f"{name} holds class ids outside [0, {num_classes}): min {int(ids.min())}, max {int(ids.max())}."
            )
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` element-wise with 0 where ``den == 0``."""
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def report_from_confusion_matrix(cm: Any) -> dict[str, Any]:
    """Compute the classification report from a confusion matrix.

    Args:
        cm: ``[C, C]`` counts, rows = true class, columns = predicted class.

    Returns:
        A dict of plain Python values: ``accuracy``, ``macro_f1``, ``macro_precision``, ``macro_recall`` (floats),
        ``per_class`` (dict of lists ``precision``, ``recall``, ``f1``, ``support``), ``confusion_matrix`` (list of
        lists of ints) and ``num_samples``. Zero divisions give 0 (see the module docstring); an empty matrix gives
        accuracy 0.
    """
    cm_t = torch.as_tensor(cm).detach().to("cpu", torch.float64)
    if cm_t.ndim != 2 or cm_t.shape[0] != cm_t.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {tuple(cm_t.shape)}.")
    tp = torch.diagonal(cm_t)
    support = cm_t.sum(dim=1)
    predicted = cm_t.sum(dim=0)
    total = cm_t.sum()
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    accuracy = float(tp.sum() / total) if total > 0 else 0.0
    return {
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(s) for s in support.tolist()],
        },
        "confusion_matrix": [[int(v) for v in row] for row in cm_t.tolist()],
        "num_samples": int(total),
    }


def classification_report(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro F1 / precision / recall, per-class scores and the confusion matrix.

    Args:
        y_true: true class ids ``[N]`` (list, numpy array or tensor).
        y_pred: predicted class ids ``[N]``.
        num_classes: number of classes ``C``; macro averages run over all ``C`` classes.

    Returns:
        See :func:`report_from_confusion_matrix`.

    Example::

        report = classification_report([0, 0, 1, 1], [0, 1, 1, 1], num_classes=2)
        report["accuracy"]  # 0.75
        report["confusion_matrix"]  # [[1, 1], [0, 2]]
    """
    return report_from_confusion_matrix(confusion_matrix(y_true, y_pred, num_classes))


class _ConfusionMatrixMetric(Metric):
    """Ignite metric base accumulating a confusion matrix; subclasses reduce it in :meth:`_reduce`.

    ``update`` takes ``(y_pred, y)`` where ``y_pred`` is logits / probabilities ``[B, C]`` (argmax is taken) or class
    ids ``[B]``, and ``y`` is class ids ``[B]`` (a one-hot ``[B, C]`` is also accepted). Both may also be lists of
    per-sample tensors, as produced by MONAI engines with ``decollate=True`` and ``from_engine``.

    Args:
        num_classes: number of classes ``C``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``; e.g. ``from_engine(["pred", "label"])``.
        device: device of the accumulated matrix (for the all-reduce in distributed runs).
    """

    _state_dict_all_req_keys = ("_confusion",)

    def __init__(
        self,
        num_classes: int,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.num_classes = num_classes
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self._device)

    @staticmethod
    def _stack(values: Any) -> torch.Tensor:
        if isinstance(values, (list, tuple)):
            return torch.stack([torch.as_tensor(v) for v in values])
        return torch.as_tensor(values)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = self._stack(output[0]).detach(), self._stack(output[1]).detach()
        if y.ndim == 2 and y.shape[1] == self.num_classes and y_pred.ndim == 2 and y.shape[0] == y_pred.shape[0]:
            y = y.argmax(dim=1)  # one-hot labels
        y = y.reshape(-1)
        if y_pred.ndim >= 2 and y_pred.numel() == y.numel() * self.num_classes and self.num_classes > 1:
            y_pred = y_pred.reshape(y.numel(), self.num_classes).argmax(dim=1)
        y_pred = y_pred.reshape(-1)
        cm = confusion_matrix(y.to(self._device), y_pred.to(self._device), self.num_classes)
        self._confusion += cm.to(self._device)

    @sync_all_reduce("_confusion")
    def compute(self) -> Any:
        if int(self._confusion.sum()) == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one example before it can be computed.")
        return self._reduce(self._confusion)

    def _reduce(self, cm: torch.Tensor) -> Any:
        raise NotImplementedError


class ClassificationReportMetric(_ConfusionMatrixMetric):
    """The full :func:`classification_report` as one Ignite metric (its ``compute`` returns the report dict).

    Ignite copies the scalar entries of a dict result into ``engine.state.metrics`` (``accuracy``, ``macro_f1``,
    ``macro_precision``, ``macro_recall``, ...); for a *key* metric of a MONAI evaluator use a scalar metric such as
    :class:`MacroF1` instead.
    """

    def _reduce(self, cm: torch.Tensor) -> dict[str, Any]:
        return report_from_confusion_matrix(cm)


class ClassificationAccuracy(_ConfusionMatrixMetric):
    """Accuracy (trace / total of the confusion matrix) as an Ignite metric."""

    def _reduce(self, cm: torch.Tensor) -> float:
        return float(report_from_confusion_matrix(cm)["accuracy"])


class MacroF1(_ConfusionMatrixMetric):
    """Unweighted mean of the per-class F1 scores (zero division -> 0) as an Ignite metric."""

    def _reduce(self, cm: torch.Tensor) -> float:
        return float(report_from_confusion_matrix(cm)["macro_f1"])


class MacroPrecision(_ConfusionMatrixMetric):
    """Unweighted mean of the per-class precisions (zero division -> 0) as an Ignite metric."""

    def _reduce(self, cm: torch.Tensor) -> float:
        return float(report_from_confusion_matrix(cm)["macro_precision"])


class MacroRecall(_ConfusionMatrixMetric):
    """Unweighted mean of the per-class recalls (zero division -> 0) as an Ignite metric."""

    def _reduce(self, cm: torch.Tensor) -> float:
        return float(report_from_confusion_matrix(cm)["macro_recall"])
