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
"""
Per-class grids of samples from the conditional flow during training (TensorBoard images and PNG files).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.utils import optional_import

from monai_condflow.transforms.grid import make_grid, save_png_grid
from monai_condflow.utils.checks import check_temperature
from monai_condflow.utils.distributed import get_rank, unwrap_model

Events, _ = optional_import("ignite.engine", name="Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch.utils.tensorboard import SummaryWriter
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = ["SampleGridHandler"]

logger = logging.getLogger(__name__)


class EpochGridSchedule:
    """When a grid handler writes: every ``every_n_epochs`` epochs and once more at the end of a run that stopped
    between two of them; closes a writer the handler opened itself. Subclasses set ``every_n_epochs``, ``_writer``
    and ``_own_writer`` and write in ``__call__(engine)``."""

    every_n_epochs: int
    _writer: SummaryWriter | None
    _own_writer: bool

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED(every=every_n_epochs)`` and ``COMPLETED`` (idempotent)."""
        if getattr(engine, "_sample_grid_handlers", None) is None:
            engine._sample_grid_handlers = set()
        if id(self) in engine._sample_grid_handlers:
            return
        engine._sample_grid_handlers.add(id(self))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_n_epochs), self)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.every_n_epochs != 0:
            self(engine)
        if self._own_writer and self._writer is not None:
            self._writer.close()


class SampleGridHandler(EpochGridSchedule):
    """
    Every ``every_n_epochs`` epochs (and at the end of training), sample the flow for each class's conditions and
    write one grid per class to TensorBoard (``add_image``, tag ``{tag}/class_{c}``) and/or as PNG
    (``{output_dir}/samples_epoch{epoch:04d}_class{c}.png``).

    The noise is drawn from a generator seeded with ``seed`` at every call, so grids of successive epochs show the
    same latent codes and differ only by the model. The flow's train/eval mode is restored afterwards; only rank 0
    writes (the handler does nothing on other ranks).

    Args:
        flow: the conditional flow (``sample(condition, temperature, generator) -> [B, C, H, W]`` in ``[0, 1]``);
            a DDP wrapper is unwrapped.
        conditions: class -> ``[n, condition_dim]`` conditions (e.g. embeddings of a few real images per class).
        every_n_epochs: period in epochs.
        temperature: sampling temperature (> 0).
        summary_writer: a TensorBoard writer; if ``None`` and ``log_dir`` is given, one is created (and closed at
            the end of training).
        log_dir: TensorBoard folder when no writer is given.
        output_dir: folder of the PNG grids, or ``None`` for none.
        samples_per_condition: samples drawn per condition row.
        seed: seed of the sampling noise.
        tag: TensorBoard tag prefix.

    Example::

        SampleGridHandler(flow, {0: z_normal[:4], 1: z_covid[:4]}, every_n_epochs=5, output_dir="runs/samples")
            .attach(trainer)
    """

    def __init__(
        self,
        flow: torch.nn.Module,
        conditions: Mapping[int, torch.Tensor],
        every_n_epochs: int = 1,
        temperature: float = 0.9,
        summary_writer: SummaryWriter | None = None,
        log_dir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        samples_per_condition: int = 4,
        seed: int = 0,
        tag: str = "samples",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        check_temperature(temperature)
        if samples_per_condition < 1:
            raise ValueError(f"samples_per_condition must be >= 1, got {samples_per_condition}.")
        if not conditions:
            raise ValueError("conditions must give at least one class.")
        self.conditions = {}
        for c, z in conditions.items():
            z = torch.as_tensor(z).float()
            if z.ndim != 2 or z.shape[0] == 0:
                raise ValueError(f"conditions[{c}] must be [n, condition_dim] with n >= 1, got {tuple(z.shape)}.")
            self.conditions[int(c)] = z
        self.flow = flow
        self.every_n_epochs = every_n_epochs
        self.temperature = temperature
        self.samples_per_condition = samples_per_condition
        self.seed = seed
        self.tag = tag
        self.output_dir = None if output_dir is None else Path(output_dir)
        self._writer = summary_writer
        self._log_dir = log_dir
        self._own_writer = False
        self.written: list[Path] = []

    def sample_grids(self, device: torch.device | None = None) -> dict[int, torch.Tensor]:
        """Class -> grid ``[1, H, W]`` float in ``[0, 1]`` (rows: conditions, columns: samples)."""
        flow = unwrap_model(self.flow)
        if device is None:
            param = next(flow.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        was_training = flow.training
        flow.eval()
        grids = {}
        try:
            with torch.no_grad():
                for c in sorted(self.conditions):
                    z = self.conditions[c].to(device).repeat_interleave(self.samples_per_condition, dim=0)
                    x = flow.sample(z, temperature=self.temperature, generator=generator)
                    grid = make_grid(x.detach().cpu().float(), nrow=self.samples_per_condition)
                    grids[c] = torch.from_numpy(grid).float().div_(255.0).unsqueeze(0)
        finally:
            flow.train(was_training)
        return grids

    def __call__(self, engine: Engine) -> None:
        if get_rank() != 0:
            return
        epoch = int(engine.state.epoch)
        grids = self.sample_grids()
        if self._writer is None and self._log_dir is not None:
            self._writer = SummaryWriter(log_dir=str(self._log_dir))
            self._own_writer = True
        for c, grid in grids.items():
            if self._writer is not None:
                self._writer.add_image(f"{self.tag}/class_{c}", grid, epoch)
            if self.output_dir is not None:
                path = self.output_dir / f"samples_epoch{epoch:04d}_class{c}.png"
                save_png_grid(grid.numpy(), path, nrow=1, padding=0)
                self.written.append(path)
        if self._writer is not None:
            self._writer.flush()
        logger.info("epoch %d: wrote sample grids for classes %s", epoch, sorted(grids))
