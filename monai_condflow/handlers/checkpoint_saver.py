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
"""MONAI's ``CheckpointSaver`` made crash-safe, and the evaluator's best score as resumable state.

MONAI 1.6.1's ``CheckpointSaver`` writes with ``atomic=False`` (a kill leaves a truncated file under the final
name, and ``torch.save`` follows a symlink planted under that name), and the key-metric tracking is not part of a
resume unless asked for, so after a resume the first evaluated epoch replaces ``model.pt`` whatever its score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

from monai_condflow.handlers.checkpoint import _STEP_RE, AtomicDiskSaver, prune_missing_files

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["AtomicCheckpointSaver", "BestMetricState"]

logger = logging.getLogger(__name__)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written by
    :class:`~monai_condflow.handlers.checkpoint.AtomicDiskSaver`: aside, then ``os.replace`` (a symlink under the
    name is replaced, its target never written); an old file is deleted only after its successor is written.

    ``state_dict`` / ``load_state_dict`` hold the key-metric tracking list (the best score and its file), so put
    the saver in the resume checkpoint's objects: after a resume, ``model.pt`` is replaced only by a better epoch.
    With ``n_saved=1`` the first interval checkpoint of a resumed run also replaces the numbered interval files
    already in the folder (the one it resumed from, or one a kill left), once the new file is written.

    Args:
        save_dir: the folder.
        save_dict: objects to save (as for ``CheckpointSaver``).
        interval_filename: a fixed file name for the interval checkpoints (``None``: MONAI's numbered names).
        kwargs: other ``CheckpointSaver`` arguments (``save_key_metric``, ``key_metric_filename``, ``file_prefix``,
            ``save_interval``, ``n_saved``, ``epoch_level`` ...).
    """

    def __init__(self, save_dir: str, save_dict: dict, interval_filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": interval_filename,
        }
        for attr, filename in fixed.items():
            checkpoint = getattr(self, attr, None)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)
        self._swept = False

    def interval_completed(self, engine: Any) -> None:
        checkpoint = self._interval_checkpoint
        handler = getattr(checkpoint, "save_handler", None)
        if not self._swept and checkpoint is not None and checkpoint.n_saved == 1 and not checkpoint._saved:
            self._swept = True
            if isinstance(handler, AtomicDiskSaver) and handler.filename is None:
                prefix = checkpoint.filename_prefix
                for path in sorted(Path(handler.dirname).glob(f"{prefix}_*.pt" if prefix else "*.pt")):
                    if _STEP_RE.search(path.name):
                        handler.remove(path.name)  # deleted once the new file is in place
        super().interval_completed(engine)

    def state_dict(self) -> dict:
        """The key-metric tracking list (so a resumed run keeps the best score seen so far)."""
        return {} if self._key_metric_checkpoint is None else self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)
            prune_missing_files(self._key_metric_checkpoint)  # a deleted best file is not a score to beat


class BestMetricState:
    """Stateful view of an evaluator's best key metric (Ignite ``state_dict`` protocol), saved for resume.

    Restores ``best_metric`` / ``best_metric_epoch`` of a MONAI evaluator (what a stage reports as its best score)
    and the scalar metrics of the best epoch (``best_metrics``).

    Args:
        evaluator: a MONAI ``Evaluator`` with a key metric.
    """

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator
        self.best_metrics: dict[str, float] = {}
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _record(self, engine: Any) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch:
            self.best_metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "best_metrics": dict(self.best_metrics),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        self.best_metrics = dict(state_dict.get("best_metrics", {}))
