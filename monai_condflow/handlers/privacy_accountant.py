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
"""Ignite handler that reports the privacy spent by a DP-SGD run after every epoch."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import optional_import

from monai_condflow.privacy.dp import check_resume_budget
from monai_condflow.utils.io import atomic_write_bytes

Events, _ = optional_import("ignite.engine", name="Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch.utils.tensorboard import SummaryWriter
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = ["PrivacyAccountantHandler"]

logger = logging.getLogger(__name__)


class PrivacyAccountantHandler:
    """Record the epsilon a DP-SGD run has spent, after every epoch and when training ends.

    At each ``EPOCH_COMPLETED`` the handler reads ``privacy_engine.get_epsilon(delta)``, stores it as
    ``engine.state.epsilon`` (so ``StatsHandler(state_attributes=["epsilon"])`` prints it), logs it, writes it to
    TensorBoard as ``tag`` (one point per epoch, at step ``epoch``) and, with ``output_file``, rewrites that JSON
    file atomically with ``summary_fn()`` (e.g. :func:`monai_condflow.privacy.dp.dp_summary`), so a killed run still
    says what it spent. At ``COMPLETED`` it records again only when the last epoch did not complete (a run
    terminated mid-epoch): an epoch that completed was recorded at its ``EPOCH_COMPLETED``.

    Args:
        privacy_engine: an Opacus ``PrivacyEngine`` (anything with ``get_epsilon(delta)`` and an ``accountant``
            whose ``history`` lists the steps taken).
        delta: the delta at which epsilon is reported.
        summary_writer: optional TensorBoard ``SummaryWriter``.
        log_dir: without ``summary_writer``, the folder of a TensorBoard writer of the handler's own, opened at the
            first write and closed at ``COMPLETED`` (``None``: no TensorBoard).
        output_file: optional JSON file for ``summary_fn()``.
        summary_fn: ``() -> dict`` written to ``output_file``; default ``{"epsilon", "delta", "steps"}``.
        tag: TensorBoard tag.
        target_epsilon: the run's target. When given, the handler checks at ``STARTED`` (attach it after the
            checkpoint loader, so a resumed run's accountant and iteration are restored) that the steps already taken
            plus the steps still to come at the optimiser's noise multiplier stay within it, and refuses to train
            otherwise (:func:`monai_condflow.privacy.dp.check_resume_budget`): a resume with a larger ``max_epochs``
            or another target cannot overspend.
    """

    def __init__(
        self,
        privacy_engine: Any,
        delta: float,
        summary_writer: Any = None,
        output_file: str | os.PathLike | None = None,
        summary_fn: Any = None,
        tag: str = "privacy/epsilon",
        target_epsilon: float | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}.")
        self.privacy_engine = privacy_engine
        self.delta = float(delta)
        self.summary_writer = summary_writer
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._own_writer: SummaryWriter | None = None
        self.output_file = Path(output_file) if output_file is not None else None
        self.summary_fn = summary_fn
        self.tag = tag
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)

    def steps(self) -> int:
        """Noisy steps recorded by the accountant so far."""
        return sum(int(h[2]) for h in getattr(self.privacy_engine.accountant, "history", []))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first step)."""
        return float(self.privacy_engine.get_epsilon(self.delta)) if self.steps() else 0.0

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED`` and ``COMPLETED`` (:meth:`completed`) of ``engine``; sets
        ``engine.state.epsilon = 0.0``."""
        engine.state.epsilon = 0.0
        if self.target_epsilon is not None:
            engine.add_event_handler(Events.STARTED, self.check_budget)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        """At ``COMPLETED``: record a last epoch that did not complete (once per epoch), then close an own writer."""
        if not epoch_completed(engine):
            self(engine)
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    def writer(self) -> Any:
        """The TensorBoard writer: ``summary_writer``, else the handler's own one in ``log_dir``, else ``None``."""
        if self.summary_writer is not None or self.log_dir is None:
            return self.summary_writer
        if self._own_writer is None:
            self._own_writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._own_writer

    def check_budget(self, engine: Engine) -> None:
        """Refuse to train when the run, as resumed, would end above ``target_epsilon``.

        Raises:
            ValueError: from :func:`monai_condflow.privacy.dp.check_resume_budget`.
        """
        epoch_length = int(engine.state.epoch_length or len(engine.state.dataloader))
        total = int(engine.state.max_epochs) * epoch_length
        projected = check_resume_budget(
            self.privacy_engine.accountant,
            float(engine.optimizer.noise_multiplier),
            1.0 / epoch_length,
            int(engine.state.iteration),
            total,
            self.target_epsilon,
            self.delta,
        )
        if engine.state.iteration:
            logger.info("DP-SGD resume: epsilon %.4f projected at the end (target %.4f)", projected,
                        self.target_epsilon)  # fmt: skip

    def __call__(self, engine: Engine) -> None:
        eps = self.epsilon()
        engine.state.epsilon = eps
        logger.info("DP-SGD: epsilon %.4f spent at delta %.3g after %d steps (epoch %d)", eps, self.delta,
                    self.steps(), engine.state.epoch)  # fmt: skip
        writer = self.writer()
        if writer is not None:
            writer.add_scalar(self.tag, eps, engine.state.epoch)
            writer.flush()
        if self.output_file is not None:
            summary = self.summary_fn() if self.summary_fn is not None else {}
            own = {"epsilon": eps, "delta": self.delta, "steps": self.steps()}  # these win over summary_fn's keys
            summary = {**own, **{k: v for k, v in summary.items() if k not in own}}
            summary["epoch"] = int(engine.state.epoch)
            atomic_write_bytes(self.output_file, json.dumps(summary, indent=2, default=str).encode("utf-8"))


def epoch_completed(engine: Engine) -> bool:
    """Whether ``engine``'s current epoch ran all its iterations (``False`` after a termination mid-epoch; ``True``
    when the epoch length is unknown, or before the first epoch)."""
    epoch_length = engine.state.epoch_length
    if not epoch_length:
        return True
    return int(engine.state.iteration) >= int(engine.state.epoch) * int(epoch_length)
