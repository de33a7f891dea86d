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
"""OffsetTensorBoardStatsHandler: iteration-level scalars at ``iteration + state.iteration_offset``, epoch-level ones
at the epoch."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from monai_condflow.evaluation.tensorboard import read_tensorboard_scalars
from monai_condflow.handlers import OffsetTensorBoardStatsHandler


def _engine() -> Engine:
    engine = Engine(lambda e, batch: float(batch))

    @engine.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.metrics["val"] = float(e.state.epoch)

    return engine


def test_iteration_scalars_are_shifted_by_the_state_offset(tmp_path):
    engine = _engine()
    OffsetTensorBoardStatsHandler(log_dir=str(tmp_path), tag_name="loss", output_transform=lambda x: x).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration_offset", 10))
    engine.run([1, 2, 3], max_epochs=2)
    scalars = read_tensorboard_scalars(tmp_path)["."]
    assert scalars["loss"] == ([11, 12, 13, 14, 15, 16], pytest.approx([1, 2, 3, 1, 2, 3]))
    assert scalars["val"] == ([1, 2], pytest.approx([1, 2]))  # epoch-level: the epoch, unshifted


def test_without_the_attribute_it_writes_what_monai_writes(tmp_path):
    engine = _engine()
    OffsetTensorBoardStatsHandler(log_dir=str(tmp_path), tag_name="loss", output_transform=lambda x: x).attach(engine)
    engine.run([1, 2], max_epochs=2)
    scalars = read_tensorboard_scalars(tmp_path)["."]
    assert scalars["loss"][0] == [1, 2, 3, 4] and scalars["val"][0] == [1, 2]
