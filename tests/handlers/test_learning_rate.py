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
"""LearningRateRecorder: the learning rate of each epoch in the engine state, logged by MONAI's TensorBoard handler."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import LrScheduleHandler, TensorBoardStatsHandler

from monai_condflow.evaluation.tensorboard import read_tensorboard_scalars
from monai_condflow.handlers import LearningRateRecorder


def test_the_learning_rate_each_epoch_started_with_is_logged_once_per_epoch(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    engine = Engine(lambda e, batch: optimizer.step())
    # the order of the bundle's train#handlers: the epoch-level scheduler steps first at EPOCH_COMPLETED
    LrScheduleHandler(torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5), print_lr=False).attach(engine)
    TensorBoardStatsHandler(log_dir=str(tmp_path), iteration_log=False, state_attributes=["lr"]).attach(engine)
    LearningRateRecorder(optimizer).attach(engine)
    rng = torch.get_rng_state()
    engine.run(range(2), max_epochs=3)
    steps, values = read_tensorboard_scalars(tmp_path)["."]["lr"]
    assert steps == [1, 2, 3] and values == pytest.approx([0.1, 0.05, 0.025])
    assert engine.state.lr == pytest.approx(0.025)
    assert torch.equal(torch.get_rng_state(), rng)  # it only reads the optimiser


def test_attribute_and_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.3}], lr=0.1)
    engine = Engine(lambda e, batch: None)
    LearningRateRecorder(optimizer, attribute="head_lr", group=1).attach(engine)
    engine.run(range(1), max_epochs=1)
    assert engine.state.head_lr == pytest.approx(0.3) and not hasattr(engine.state, "lr")
