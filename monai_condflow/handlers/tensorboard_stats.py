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
"""MONAI's ``TensorBoardStatsHandler`` with the iteration-level step shifted by an offset kept in the engine state.

An engine that is run several times over one TensorBoard folder, with another epoch length each time (the rounds of
label propagation, :class:`~monai_condflow.engines.label_propagation.SemiSupervisedWorkflow`), cannot keep
``engine.state.iteration`` equal to the run's iteration count: Ignite starts an epoch where ``iteration`` is a
multiple of the epoch length. The owner of the runs sets ``engine.state.<offset_attribute>`` instead, and the points
land at the run's own iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monai.handlers import TensorBoardStatsHandler
from monai.utils import optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")

__all__ = ["ITERATION_OFFSET", "OffsetTensorBoardStatsHandler"]

ITERATION_OFFSET = "iteration_offset"
"""The engine state attribute :class:`OffsetTensorBoardStatsHandler` reads by default."""


class OffsetTensorBoardStatsHandler(TensorBoardStatsHandler):
    """``TensorBoardStatsHandler`` writing its iteration-level scalars at ``iteration + state.<offset_attribute>``.

    Epoch-level scalars (``engine.state.metrics``, ``state_attributes``) keep MONAI's step, the epoch (through
    ``global_epoch_transform``). Without the attribute in the engine state the offset is 0, and the handler writes
    what ``TensorBoardStatsHandler`` writes. A custom ``iteration_event_writer`` is called as in MONAI, unshifted.

    Args:
        args: positional arguments of ``TensorBoardStatsHandler``.
        offset_attribute: name of the engine state attribute holding the offset (an ``int``, may be negative).
        kwargs: keyword arguments of ``TensorBoardStatsHandler`` (``log_dir``, ``tag_name``, ``output_transform``...).
    """

    def __init__(self, *args: Any, offset_attribute: str = ITERATION_OFFSET, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offset_attribute = offset_attribute
        self._offset = 0

    def iteration_completed(self, engine: Engine) -> None:
        """Write the iteration-level scalars at the shifted step."""
        self._offset = int(getattr(engine.state, self.offset_attribute, 0) or 0)
        try:
            super().iteration_completed(engine)
        finally:
            self._offset = 0

    def _write_scalar(self, _engine: Engine, writer: Any, tag: str, value: Any, step: int) -> None:
        super()._write_scalar(_engine, writer, tag, value, step + self._offset)
