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
"""monai_condflow.engines: the trainers and stage functions.

The checkpoint and distributed helpers they use live in the lower layers: :mod:`monai_condflow.handlers.checkpoint`,
:mod:`monai_condflow.handlers.checkpoint_saver` and :mod:`monai_condflow.utils.distributed`.
"""

from .acgan import ACGANLossHistory, ACGANTrainer, save_acgan, train_acgan
from .classifier import (
    KEY_METRIC_NAME,
    balanced_class_weights,
    compute_embeddings,
    create_classifier_trainer,
    lr_decay_for_label_fraction,
    train_classifier,
)
from .flow import (
    FlowBitsPerDim,
    FlowTrainer,
    conditions_per_class,
    first_global_batch,
    freeze_null_condition,
    initialize_flow,
    warmup_exponential_lambda,
)
from .flow_trainer import create_flow_trainer
from .generation import (
    GENERATION_MODES,
    generate,
    generate_tensors,
    nifti_bytes,
    pixel_range_stats,
    png16_bytes,
    summarize_sample_stats,
)
from .label_propagation import (
    SIMILARITY_KINDS,
    LabelPropagation,
    class_centroids,
    class_quotas,
    median_bandwidth,
    pairwise_distance,
    propagate_labels,
    run_semisupervised,
    similarity,
)
from .outputs import StepOutput
from .prepare_batch import (
    ConditionPrepareBatch,
    attach_conditions,
    cache_embeddings,
    compute_condition,
)

__all__ = [
    "KEY_METRIC_NAME",
    "balanced_class_weights",
    "compute_embeddings",
    "create_classifier_trainer",
    "lr_decay_for_label_fraction",
    "train_classifier",
    "SIMILARITY_KINDS",
    "LabelPropagation",
    "class_centroids",
    "class_quotas",
    "median_bandwidth",
    "pairwise_distance",
    "propagate_labels",
    "run_semisupervised",
    "similarity",
    "ACGANTrainer",
    "train_acgan",
    "ACGANLossHistory",
    "save_acgan",
    "StepOutput",
    "first_global_batch",
    "initialize_flow",
    "freeze_null_condition",
    "conditions_per_class",
    "FlowBitsPerDim",
    "FlowTrainer",
    "create_flow_trainer",
    "warmup_exponential_lambda",
    "GENERATION_MODES",
    "generate",
    "generate_tensors",
    "pixel_range_stats",
    "summarize_sample_stats",
    "nifti_bytes",
    "png16_bytes",
    "ConditionPrepareBatch",
    "attach_conditions",
    "cache_embeddings",
    "compute_condition",
]
