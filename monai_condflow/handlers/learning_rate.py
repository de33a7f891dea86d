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
"""Ignite handler that puts an optimiser's learning rate in the engine state, where MONAI's stats handlers read it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from monai.utils import optional_import

Events, _ = optional_import("ignite.engine", name="Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")

__all__ = ["LearningRateRecorder"]


class LearningRateRecorder:
    """Store the learning rate of each epoch as ``engine.state.<attribute>`` at ``EPOCH_STARTED``.

    MONAI's ``TensorBoardStatsHandler`` / ``StatsHandler`` with ``state_attributes=["lr"]`` then log it at every
    ``EPOCH_COMPLETED``: the rate the epoch started with (an epoch-level scheduler steps at ``EPOCH_COMPLETED``, after
    the epoch). The handler only reads ``optimizer.param_groups``: it changes neither the training nor a random state.

    Args:
        optimizer: the optimiser (an Opacus ``DPOptimizer`` shares the ``param_groups`` of the one it wraps).
        attribute: name of the engine state attribute.
        group: index of the parameter group whose rate is recorded.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, attribute: str = "lr", group: int = 0) -> None:
        self.optimizer = optimizer
        self.attribute = attribute
        self.group = int(group)

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_STARTED`` of ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        setattr(engine.state, self.attribute, float(self.optimizer.param_groups[self.group]["lr"]))
