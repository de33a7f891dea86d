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
"""Epoch checkpoints and resume as attachable handlers, so that a bundle config can wire them by id.

- :class:`EpochCheckpointer`: an atomic Ignite ``Checkpoint``
  (:func:`~monai_condflow.handlers.checkpoint.create_checkpoint_handler`) saved at every ``EPOCH_COMPLETED`` of the
  engine it is attached to: the trainer's resumable state (``state_checkpoint_epoch=N.pt``), or the evaluator's best
  model under one fixed name (``model.pt``, scored on a metric). Its own bookkeeping is saved and restored like any
  other object.
- :class:`CheckpointResumer`: at the trainer's ``STARTED``, loads a checkpoint into the objects of ``load_dict``,
  restores the trainer *by epoch* (robust to a changed epoch length or world size), forgets bookkeeping entries whose
  file is gone and restores the random streams last.
- :class:`ResumableEarlyStopHandler`: MONAI's ``EarlyStopHandler`` whose counter and best score are saved with the
  checkpoints, so a resumed run stops when the uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.handlers import EarlyStopHandler
from monai.utils import optional_import

from monai_condflow.handlers.checkpoint import (
    EPOCH_FILENAME_PATTERN,
    create_checkpoint_handler,
    load_checkpoint,
    prune_missing_files,
)
from monai_condflow.utils.distributed import get_rank

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")
Checkpoint, _ = optional_import("ignite.handlers", name="Checkpoint")

__all__ = ["EpochCheckpointer", "CheckpointResumer", "ResumableEarlyStopHandler"]

logger = logging.getLogger(__name__)


def _epoch_step(engine: Engine, _: Any = None) -> int:
    """The step of a checkpoint: the engine's epoch (an evaluator run by ``ValidationHandler`` has the trainer's)."""
    return int(engine.state.epoch)


class EpochCheckpointer:
    """
    Save ``save_dict`` atomically at every ``EPOCH_COMPLETED`` of the engine it is attached to (rank 0 writes).

    File names: ``{prefix}_{name}_epoch={epoch}.pt``
    (:data:`~monai_condflow.handlers.checkpoint.EPOCH_FILENAME_PATTERN`) where ``name`` is ``checkpoint`` for several
    objects, else the one object's key: ``state_checkpoint_epoch=3.pt`` for ``prefix="state"``, the name the
    classifier's MONAI ``CheckpointSaver`` gives its state. With ``filename`` every save goes to that one name
    instead (``model.pt``), replaced atomically, and the names above only tell the saves apart in the bookkeeping.
    With ``metric_name`` only the ``n_saved`` best epochs on that metric of the engine (an evaluator) are kept (with
    ``filename``: the file is replaced only by a better epoch). ``None`` values of ``save_dict`` (disabled config
    components) are left out. A ``save_dict`` of one object is saved as that object's ``state_dict()``; a nested
    dict is saved as a dict of state dicts, so ``{"model": {"network": flow}}`` writes ``{"network": ...}``. Every
    file is written aside and moved into place, and an old file is deleted only after its successor is written
    (:class:`~monai_condflow.handlers.checkpoint.AtomicDiskSaver`).

    The handler has ``state_dict`` / ``load_state_dict`` (its list of saved files), so it can be saved in a checkpoint,
    its own included (``include_self``).

    Args:
        save_dir: the folder.
        save_dict: name -> object with ``state_dict`` (modules, optimizers, schedulers, engines ...).
        prefix: the file name prefix (``state``; ``best`` for a scored ``model.pt``).
        n_saved: how many files to keep.
        metric_name: score the files on ``engine.state.metrics[metric_name]`` (``None``: keep the newest).
        mode: ``"min"`` when a lower metric is better (bits/dim), else ``"max"``.
        include_self: save this handler's bookkeeping in its own files (key ``checkpointer``).
        filename: one fixed file name for every save (e.g. :data:`~monai_condflow.utils.io.MODEL_FILE`), or
            ``None`` for the numbered names.

    Example::

        state = EpochCheckpointer("runs/flow", {"flow": flow, "optimizer": opt, "trainer": trainer}, "state",
                                  n_saved=2, include_self=True)
        state.attach(trainer)
        model = EpochCheckpointer("runs/flow", {"model": {"network": flow}}, "best", metric_name="val_bpd",
                                  filename="model.pt")
        model.attach(evaluator)
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        prefix: str,
        n_saved: int = 1,
        metric_name: str | None = None,
        mode: str = "min",
        include_self: bool = False,
        filename: str | None = None,
    ) -> None:
        if n_saved < 1:
            raise ValueError(f"n_saved must be >= 1, got {n_saved}.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        to_save = {k: v for k, v in save_dict.items() if v is not None}
        if not to_save:
            raise ValueError("save_dict has nothing to save.")
        self.metric_name = metric_name
        self.sign = -1.0 if mode == "min" else 1.0
        kwargs: dict[str, Any] = {}
        if metric_name is not None:
            kwargs["score_function"] = self._score
            kwargs["score_name"] = f"neg_{metric_name}" if mode == "min" else metric_name
        self.checkpoint = create_checkpoint_handler(
            to_save,
            Path(save_dir),
            prefix=prefix,
            n_saved=n_saved,
            global_step_transform=_epoch_step,
            include_self=include_self,
            filename=filename,
            filename_pattern=EPOCH_FILENAME_PATTERN,
            **kwargs,
        )

    def _score(self, engine: Engine) -> float:
        return self.sign * float(engine.state.metrics[self.metric_name])

    def attach(self, engine: Engine) -> None:
        """Save at every ``EPOCH_COMPLETED`` of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The saved files' bookkeeping (Ignite ``Checkpoint.state_dict``)."""
        return self.checkpoint.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the bookkeeping (call :meth:`prune_missing` afterwards to forget files that are gone)."""
        self.checkpoint.load_state_dict(state)

    def prune_missing(self) -> list[str]:
        """Forget bookkeeping entries whose file is gone.

        See :func:`~monai_condflow.handlers.checkpoint.prune_missing_files`.
        """
        return prune_missing_files(self.checkpoint)


class CheckpointResumer:
    """
    Resume training from ``load_path`` at the trainer's ``STARTED``.

    At ``STARTED`` (attach it after every handler whose state it restores; a handler that checks the restored state,
    such as :class:`~monai_condflow.handlers.privacy_accountant.PrivacyAccountantHandler`, after it):

    1. the checkpoint is loaded with ``weights_only=True``; a key of ``required`` that it lacks stops the run with
       the key's message;
    2. the objects of ``first`` are restored first (e.g. a ``DPPlan``, which refuses a changed plan before anything
       else loads), then every other object of ``load_dict`` that the checkpoint holds;
    3. each :class:`EpochCheckpointer` (or Ignite ``Checkpoint``) in ``checkpointers`` forgets files that are gone
       (a kill mid-rotation or a user may have deleted one);
    4. the trainer restarts at the checkpoint's *epoch* with the current epoch length (checkpoints are taken at
       epoch ends; a changed world size changes the epoch length), its user state keys restored (missing ones
       keep their current value); a run resumed at or past ``max_epochs`` trains nothing;
    5. the random streams (``rng_keys``: global generators, the loader's streams) are restored last, so the resumed
       run draws what the uninterrupted one draws.

    With ``load_path=None`` nothing is loaded (a fresh start). A file of an earlier run in the folder is never taken
    for this run's: a fixed-name ``model.pt`` is replaced by this run's first evaluated epoch (the restored, or
    fresh, bookkeeping is what it competes with, never the file).

    Args:
        load_path: the checkpoint, or ``None`` for a fresh start (e.g. ``stage_io.latest_checkpoint(dir, 'state')``).
        load_dict: name -> object with ``load_state_dict``; ``None`` values (disabled components) are skipped.
        trainer_key: the key of the trainer's state in the checkpoint.
        rng_keys: keys of random-state objects, restored last.
        first: keys restored before all others.
        required: key -> message for keys the checkpoint must hold (``None`` values of ``load_dict`` exempt theirs).
        checkpointers: handlers whose restored bookkeeping is pruned of missing files.
        map_location: where the checkpoint's tensors are loaded.
    """

    def __init__(
        self,
        load_path: str | os.PathLike | None,
        load_dict: Mapping[str, Any],
        trainer_key: str = "trainer",
        rng_keys: Sequence[str] = ("rng", "loader_rng"),
        first: Sequence[str] = (),
        required: Mapping[str, str] | None = None,
        checkpointers: Sequence[Any] = (),
        map_location: Any = "cpu",
    ) -> None:
        self.load_path = None if load_path is None else Path(load_path)
        self.load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.trainer_key = trainer_key
        self.rng_keys = tuple(rng_keys)
        self.first = tuple(first)
        self.required = {k: v for k, v in dict(required or {}).items() if k in self.load_dict}
        self.checkpointers = [c for c in checkpointers if c is not None]
        self.map_location = map_location
        self.resumed_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        """Load at ``STARTED`` of ``engine`` (the trainer)."""
        engine.add_event_handler(Events.STARTED, self)

    def check(self, checkpoint: Mapping[str, Any]) -> None:
        """Steps 1-2a without training: refuse ``checkpoint`` (loaded from ``load_path``) when it lacks a ``required``
        key or the trainer's state, and restore the objects of ``first`` (which refuse a changed plan). Python builders
        call it before training so that an incompatible checkpoint fails at construction, not at the first epoch.

        Raises:
            ValueError: a required key or the trainer's state is missing (the message names the file and the key).
        """
        for key, message in self.required.items():
            if key not in checkpoint:
                raise ValueError(f"cannot resume from {self.load_path}: the checkpoint has no '{key}' ({message}).")
        if self.trainer_key not in checkpoint:
            raise ValueError(f"cannot resume from {self.load_path}: the checkpoint has no '{self.trainer_key}'.")
        for key in self.first:
            if key in self.load_dict and key in checkpoint:
                self.load_dict[key].load_state_dict(checkpoint[key])

    def __call__(self, engine: Engine) -> None:
        if self.load_path is None:
            return
        checkpoint = load_checkpoint(self.load_path, map_location=self.map_location)
        self.restore(engine, checkpoint)
        self.restore_random_state(checkpoint)

    def restore(self, engine: Engine, checkpoint: Mapping[str, Any]) -> None:
        """Steps 1-4 on ``checkpoint`` (loaded from ``load_path``): everything but the random streams. A Python
        builder may call it before ``engine.run()`` (the trainer's state then reads the resumed epoch at once) and
        leave step 5 to ``STARTED`` (:meth:`restore_random_state`)."""
        self.check(checkpoint)
        skip = {self.trainer_key, *self.rng_keys, *self.first}
        objects = {k: v for k, v in self.load_dict.items() if k not in skip and k in checkpoint}
        if objects:
            Checkpoint.load_objects(objects, checkpoint)
        if get_rank() == 0:
            for handler in self.checkpointers:
                if isinstance(handler, EpochCheckpointer):
                    handler.prune_missing()
                else:
                    prune_missing_files(handler)
        saved = checkpoint[self.trainer_key]
        epoch = int(saved["iteration"]) // int(saved["epoch_length"])
        state: dict[str, Any] = {
            "epoch": epoch,
            "epoch_length": engine.state.epoch_length,
            "max_epochs": max(int(engine.state.max_epochs), epoch),
        }
        for key in getattr(engine, "_state_dict_user_keys", []):
            state[key] = saved.get(key, getattr(engine.state, key, None))
        engine.load_state_dict(state)
        self.resumed_epoch = epoch
        logger.info("resumed from %s at epoch %d (iteration %d).", self.load_path, epoch, engine.state.iteration)
        if epoch >= engine.state.max_epochs:
            logger.info("resumed at epoch %d: max_epochs already reached, nothing to train.", epoch)

    def restore_random_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Step 5: the random streams of ``rng_keys`` (call it at ``STARTED``, after the loaders are built)."""
        for key in self.rng_keys:
            if key in self.load_dict and key in checkpoint:
                self.load_dict[key].load_state_dict(checkpoint[key])


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's :class:`~monai.handlers.EarlyStopHandler` with ``state_dict`` / ``load_state_dict`` (the counter and
    the best score), so that it can be saved with the checkpoints and a resumed run stops when the uninterrupted
    one would. Attach it to the evaluator (``validate#handlers``) and give it the trainer with ``set_trainer`` before
    training when the trainer cannot be passed at construction (a config whose trainer validates through this
    evaluator).

    Args:
        patience, score_function, trainer, min_delta, cumulative_delta, epoch_level: as ``EarlyStopHandler``
            (``score_function(engine) -> float``, higher is better).
    """

    def __init__(
        self,
        patience: int,
        score_function: Callable,
        trainer: Engine | None = None,
        min_delta: float = 0.0,
        cumulative_delta: bool = False,
        epoch_level: bool = True,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self._pending: Mapping[str, Any] | None = None
        super().__init__(patience, score_function, trainer, min_delta, cumulative_delta, epoch_level)

    def set_trainer(self, trainer: Engine) -> None:
        super().set_trainer(trainer)
        if self._pending is not None:
            self._handler.load_state_dict(self._pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """``{"counter", "best_score"}``."""
        if self._handler is None:
            return {"counter": 0, "best_score": None} if self._pending is None else dict(self._pending)
        return dict(self._handler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counter and the best score (kept until :meth:`set_trainer` when no trainer is set yet)."""
        if self._handler is None:
            self._pending = dict(state)
        else:
            self._handler.load_state_dict(state)
