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
"""monai_condflow.handlers."""

from monai_condflow.handlers.checkpoint_saver import AtomicCheckpointSaver, BestMetricState

from .counterfactual_grid import CounterfactualGridHandler, counterfactual_grid
from .embedding_projector import EmbeddingProjectorHandler
from .epoch_checkpoint import CheckpointResumer, EpochCheckpointer, ResumableEarlyStopHandler
from .learning_rate import LearningRateRecorder
from .privacy_accountant import PrivacyAccountantHandler
from .sample_grid import SampleGridHandler
from .tensorboard_stats import OffsetTensorBoardStatsHandler

__all__ = [
    "SampleGridHandler",
    "CounterfactualGridHandler",
    "counterfactual_grid",
    "EmbeddingProjectorHandler",
    "PrivacyAccountantHandler",
    "LearningRateRecorder",
    "OffsetTensorBoardStatsHandler",
    "AtomicCheckpointSaver",
    "BestMetricState",
    "EpochCheckpointer",
    "CheckpointResumer",
    "ResumableEarlyStopHandler",
]
