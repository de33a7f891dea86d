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
"""Reading the scalar series of a run's TensorBoard logs (``OUTPUT_DIR/tensorboard/<stage>``) for the report."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_condflow.utils.logs import raised_log_level

__all__ = ["read_tensorboard_scalars"]


def read_tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """All scalar series of the TensorBoard event files under ``log_dir``.

    Returns:
        ``{run: {tag: (steps, values)}}`` where ``run`` is the folder of the event files relative to ``log_dir``
        (``"."`` for the folder itself); empty when there are none.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return {}
    folders = sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*") if p.is_file()})
    runs: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        with raised_log_level("tensorboard", logging.WARNING):  # its reader logs "No path found after <file>" at INFO
            acc.Reload()
        tags = acc.Tags().get("scalars", [])
        if tags:
            runs[str(folder.relative_to(log_dir))] = {
                t: ([e.step for e in acc.Scalars(t)], [float(e.value) for e in acc.Scalars(t)]) for t in tags
            }
    return runs
