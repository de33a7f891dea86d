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
"""Evaluation of synthetic data: TSTR / TRTR, embedding FID, augmentation study, ACGAN baseline comparison, report."""

from __future__ import annotations

from .augmentation import augmentation_study, plot_augmentation
from .plots import bar_chart, image_grid, line_chart
from .report import (
    find_model_checkpoint,
    load_module,
    read_tensorboard_scalars,
    run_evaluation,
    sample_synthetic_set,
    write_report,
)
from .tstr import (
    METRIC_KEYS,
    as_image_set,
    class_agreement,
    default_fit_fn,
    evaluate_tstr,
    match_class_composition,
    per_class_agreement,
    summarize_scores,
    train_real_classifier,
    train_real_classifiers,
)

__all__ = [
    "METRIC_KEYS",
    "as_image_set",
    "augmentation_study",
    "bar_chart",
    "class_agreement",
    "default_fit_fn",
    "evaluate_tstr",
    "find_model_checkpoint",
    "image_grid",
    "line_chart",
    "load_module",
    "match_class_composition",
    "per_class_agreement",
    "plot_augmentation",
    "read_tensorboard_scalars",
    "run_evaluation",
    "sample_synthetic_set",
    "summarize_scores",
    "train_real_classifier",
    "train_real_classifiers",
    "write_report",
]
