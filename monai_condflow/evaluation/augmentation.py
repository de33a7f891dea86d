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
"""Augmentation study (paper Fig. 7): real imbalanced training set + synthetic minority-class images.

For each fraction ``f`` of the class gap (``n_majority - n_minority``), ``round(f * gap)`` synthetic minority images
are added to the real training set; a fresh classifier is trained and scored on the real test split (bootstrapped).
Recall comes first: the point of balancing is to stop missing the minority (COVID) class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from monai_condflow.evaluation.plots import line_chart
from monai_condflow.evaluation.tstr import (
    ImageSet,
    as_image_set,
    bootstrap_indices,
    bootstrap_scores,
    default_fit_fn,
    predict,
    summarize_scores,
)
from monai_condflow.metrics.classification import confusion_matrix, report_from_confusion_matrix
from monai_condflow.progress import ProgressLog

__all__ = ["augmentation_study", "plot_augmentation"]

logger = logging.getLogger(__name__)


def augmentation_study(
    real_train: ImageSet | Sequence[Mapping[str, Any]],
    real_val: ImageSet | Sequence[Mapping[str, Any]] | None,
    real_test: ImageSet | Sequence[Mapping[str, Any]],
    synthetic_pool: ImageSet,
    *,
    network_factory: Callable[[], nn.Module],
    num_classes: int = 2,
    minority_class: int | None = None,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    fit_fn: Callable[..., nn.Module] = default_fit_fn,
    train_kwargs: Mapping[str, Any] | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    real_classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Train on real + ``f`` x gap synthetic minority images for each ``f`` and score on the real test split.

    Args:
        real_train: real (imbalanced) training set.
        real_val: real validation set for epoch selection, or ``None``.
        real_test: real test set.
        synthetic_pool: synthetic images; only those labelled ``minority_class`` are used, in order (the first
            ``n`` for ``n`` added images), so smaller fractions are subsets of larger ones.
        network_factory: ``() -> nn.Module`` building a fresh classifier (same seed for every fraction).
        num_classes: number of classes.
        minority_class: class to top up (default: the rarest class of ``real_train``).
        fractions: fractions of the gap in ``[0, 1]`` (values above 1 over-sample beyond balance).
        fit_fn: training function (see :func:`~monai_condflow.evaluation.tstr.default_fit_fn`).
        train_kwargs: passed to ``fit_fn``.
        n_bootstrap: test-set bootstraps (shared by every fraction).
        seed: initialisation / data-order / bootstrap seed.
        device: training device.
        progress: log ``augmentation study: done/total trainings, ETA`` lines.
        real_classifier: a classifier already trained on ``real_train`` alone with this ``seed``, ``fit_fn`` and
            ``train_kwargs`` (the evaluation's TRTR classifier, :func:`~monai_condflow.evaluation.tstr.
            train_real_classifier`): it is the ``f = 0`` model, which is then not trained a second time.

    Returns:
        ``{"minority_class", "gap", "rows": [{"fraction", "n_added", "minority_recall", "minority_recall_std",
        "recall", "recall_std", "accuracy", ..., "f1", ..., "precision", ...}]}`` (fractions in [0, 1]).

    Raises:
        ValueError: when the pool has fewer minority images than the largest fraction needs, or on a negative
            fraction.
    """
    train, test = as_image_set(real_train), as_image_set(real_test)
    val = as_image_set(real_val) if real_val is not None else None
    pool_images, pool_labels = as_image_set(synthetic_pool)
    counts = torch.bincount(train[1], minlength=num_classes)
    minority = int(counts.argmin()) if minority_class is None else int(minority_class)
    gap = int(counts.max() - counts[minority])
    pool = pool_images[pool_labels == minority]
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0, got {list(fractions)}.")
    need = max(round(f * gap) for f in fractions)
    if pool.shape[0] < need:
        raise ValueError(f"synthetic pool has {pool.shape[0]} images of class {minority}, {need} are needed.")
    idx = bootstrap_indices(test[1].numel(), n_bootstrap, seed)
    rows = []
    reused = int(real_classifier is not None and any(round(f * gap) == 0 for f in fractions))
    bar = ProgressLog(len(fractions) - reused, "augmentation study", unit="trainings", enabled=progress)
    for f in fractions:
        n_add = round(f * gap)
        images = torch.cat([train[0], pool[:n_add]])
        labels = torch.cat([train[1], torch.full((n_add,), minority, dtype=torch.long)])
        logger.info("augmentation: +%d synthetic images of class %d (%.0f %% of the gap)", n_add, minority, 100 * f)
        if n_add == 0 and real_classifier is not None:
            net = real_classifier.eval()  # the same training as below with nothing added
        else:
            torch.manual_seed(seed)
            net = fit_fn(network_factory(), (images, labels), val, seed=seed, device=device, **dict(train_kwargs or {}))
        preds = predict(net, test[0])
        row: dict[str, Any] = {"fraction": float(f), "n_added": int(n_add)}
        row.update(summarize_scores(bootstrap_scores(test[1], preds, num_classes, idx)))
        rows_idx = [None] if idx.shape[0] == 0 else list(idx)
        minority_recalls = []
        for b in rows_idx:
            t, p = (test[1], preds) if b is None else (test[1][b], preds[b])
            minority_recalls.append(
                report_from_confusion_matrix(confusion_matrix(t, p, num_classes))["per_class"]["recall"][minority]
            )
        row["minority_recall"] = float(np.mean(minority_recalls))
        row["minority_recall_std"] = float(np.std(minority_recalls))
        rows.append(row)
        if net is not real_classifier:
            bar.update()
    return {"minority_class": minority, "gap": gap, "n_bootstrap": int(n_bootstrap), "rows": rows}


def plot_augmentation(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Minority recall, macro recall, accuracy and macro-F1 (+- bootstrap std) against the % of the gap filled.

    Writes the PNG ``path`` and a PDF beside it; returns the PNG path.
    """
    xs = [100 * r["fraction"] for r in result["rows"]]
    keys = ("minority_recall", "recall", "accuracy", "f1")
    names = {"minority_recall": "minority recall", "recall": "macro recall", "accuracy": "accuracy", "f1": "macro F1"}
    series = {names[key]: (xs, [r[key] for r in result["rows"]]) for key in keys}
    errors = {names[key]: [r.get(f"{key}_std") for r in result["rows"]] for key in keys}
    return line_chart(
        path,
        series,
        "Augmentation with synthetic minority images",
        "synthetic minority images added (% of the class gap)",
        "score on the real test split",
        errors=errors,
    )
