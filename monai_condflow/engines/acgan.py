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
"""Training of the ACGAN baseline with a MONAI :class:`~monai.engines.GanTrainer` whose iteration adds class labels.

Losses (Odena et al. 2017): discriminator ``BCE(real) + BCE(fake) + CE(class | real) + CE(class | fake)``;
generator ``BCE(fake -> real) + CE(class | fake)``. :func:`save_acgan` (called by :func:`train_acgan` and by the
bundle's ``train_acgan.json``, which wires :class:`ACGANTrainer` by config ids) writes ``model.pt`` =
``{"network": generator state_dict, "discriminator": state_dict}`` atomically, which
:func:`~monai_condflow.evaluation.report.run_evaluation` picks up from ``output_dir/acgan``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.engines import GanTrainer
from monai.utils import IgniteInfo, min_version, optional_import
from torch.utils.data import DataLoader, TensorDataset

from monai_condflow.engines.outputs import StepOutput
from monai_condflow.utils.io import MODEL_FILE, atomic_torch_save

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ACGANTrainer", "ACGANLossHistory", "acgan_d_loss", "acgan_g_loss", "save_acgan", "train_acgan"]

logger = logging.getLogger(__name__)


def acgan_d_loss(real: tuple, fake: tuple, labels: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
    """Discriminator loss; ``real`` / ``fake`` are the discriminator's ``(adv_logit [B], class_logits [B, C])``."""
    adv = F.binary_cross_entropy_with_logits(real[0], torch.ones_like(real[0])) + F.binary_cross_entropy_with_logits(
        fake[0], torch.zeros_like(fake[0])
    )
    return adv + F.cross_entropy(real[1], labels) + F.cross_entropy(fake[1], fake_labels)


def acgan_g_loss(fake: tuple, fake_labels: torch.Tensor) -> torch.Tensor:
    """Generator loss: fool the real/fake head and be classified as the requested class."""
    return F.binary_cross_entropy_with_logits(fake[0], torch.ones_like(fake[0])) + F.cross_entropy(fake[1], fake_labels)


class ACGANTrainer(GanTrainer):
    """MONAI ``GanTrainer`` for a class-conditional generator ``G(noise, labels)`` and an ACGAN discriminator.

    Batches are ``(images [B, 1, S, S], labels [B])`` (or dicts with ``image`` / ``label``); fake labels are the
    batch's real labels (so the class ratio of the data is kept). The output
    (a :class:`~monai_condflow.engines.outputs.StepOutput`, read like a dict) holds ``g_loss`` and ``d_loss``
    (floats) and ``loss`` = ``{"g_loss": ..., "d_loss": ...}``, so MONAI's handlers reading the loss with
    ``from_engine(["loss"], first=True)`` (the experiment-tracking settings of ``monai.bundle run --tracking``)
    record both losses under their names.

    Args:
        device, max_epochs, train_data_loader, g_network, g_optimizer, d_network, d_optimizer: as ``GanTrainer``.
        latent_dim: generator noise dimension.
        kwargs: other ``GanTrainer`` arguments (``train_handlers``, ``d_train_steps``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        g_network: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        latent_dim: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            g_network=g_network,
            g_optimizer=g_optimizer,
            g_loss_function=acgan_g_loss,
            d_network=d_network,
            d_optimizer=d_optimizer,
            d_loss_function=acgan_d_loss,
            latent_shape=latent_dim,
            **kwargs,
        )

    def _iteration(self, engine: ACGANTrainer, batchdata: Any) -> dict[str, Any]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if isinstance(batchdata, dict):
            images, labels = batchdata["image"], batchdata["label"]
        else:
            images, labels = batchdata[0], batchdata[1]
        device = engine.state.device
        images, labels = images.to(device).float(), torch.as_tensor(labels).to(device).long().reshape(-1)
        b = images.shape[0]
        d_total = 0.0
        for _ in range(engine.d_train_steps):
            noise = torch.randn(b, engine.latent_shape, device=device)
            with torch.no_grad():
                fake = engine.g_network(noise, labels)
            engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            d_loss = engine.d_loss_function(engine.d_network(images), engine.d_network(fake), labels, labels)
            d_loss.backward()
            engine.d_optimizer.step()
            d_total += float(d_loss.detach())
        noise = torch.randn(b, engine.latent_shape, device=device)
        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        g_loss = engine.g_loss_function(engine.d_network(engine.g_network(noise, labels)), labels)
        g_loss.backward()
        engine.g_optimizer.step()
        losses = {"g_loss": float(g_loss.detach()), "d_loss": d_total / max(engine.d_train_steps, 1)}
        return StepOutput({**losses, "loss": dict(losses)})


class ACGANLossHistory:
    """Per-epoch means of the ACGAN's ``g_loss`` and ``d_loss``, logged at every epoch end.

    Attributes:
        history: ``{"g_loss": [...], "d_loss": [...]}``, one mean per completed epoch.

    Example::

        history = ACGANLossHistory()
        history.attach(trainer)
        trainer.run()
        history.history["g_loss"]
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {"g_loss": [], "d_loss": []}
        self._epoch: dict[str, list[float]] = {"g_loss": [], "d_loss": []}

    def attach(self, engine: ACGANTrainer) -> None:
        """Collect after every iteration, average at every epoch end."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _collect(self, engine: ACGANTrainer) -> None:
        for key in self._epoch:
            self._epoch[key].append(float(engine.state.output[key]))

    def _epoch_completed(self, engine: ACGANTrainer) -> None:
        for key, values in self._epoch.items():
            self.history[key].append(sum(values) / max(len(values), 1))
            self._epoch[key] = []
        logger.info(
            "ACGAN epoch %d: g_loss %.4f d_loss %.4f",
            engine.state.epoch,
            self.history["g_loss"][-1],
            self.history["d_loss"][-1],
        )


def save_acgan(generator: nn.Module, discriminator: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/model.pt`` = ``{"network": generator, "discriminator": discriminator}`` (state dicts)
    atomically; returns its path."""
    return atomic_torch_save(
        {"network": generator.state_dict(), "discriminator": discriminator.state_dict()},
        Path(output_dir) / MODEL_FILE,
    )


def train_acgan(
    generator: nn.Module,
    discriminator: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_epochs: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    device: str | torch.device = "cpu",
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train the ACGAN on real ``(images [N, 1, S, S] in [0, 1], labels [N])`` with Adam (DCGAN settings).

    Give it a budget comparable to the flow's (same epochs or wall time) for a fair Table-2 comparison.

    Returns:
        ``{"epochs", "g_loss", "d_loss" (per-epoch means), "checkpoint" (path or None)}``.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    generator, discriminator = generator.to(device), discriminator.to(device)
    loader = DataLoader(
        TensorDataset(images.float(), labels.long()),
        batch_size=batch_size,
        shuffle=True,
        drop_last=images.shape[0] > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = ACGANTrainer(
        device,
        max_epochs,
        loader,
        generator,
        torch.optim.Adam(generator.parameters(), lr=lr, betas=betas),
        discriminator,
        torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas),
        latent_dim=int(getattr(generator, "latent_dim", 64)),
    )
    losses = ACGANLossHistory()
    losses.attach(trainer)
    trainer.run()
    path = None if output_dir is None else save_acgan(generator, discriminator, output_dir)
    history = losses.history
    return {
        "epochs": int(trainer.state.epoch),
        "g_loss": history["g_loss"],
        "d_loss": history["d_loss"],
        "checkpoint": str(path) if path is not None else None,
    }
