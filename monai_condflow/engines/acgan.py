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
generator ``BCE(fake -> real) + CE(class | fake)``. :func:`train_acgan` writes ``model.pt`` =
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

from monai_condflow.utils.io import MODEL_FILE, atomic_torch_save

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ACGANTrainer", "acgan_d_loss", "acgan_g_loss", "train_acgan"]

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
    batch's real labels (so the class ratio of the data is kept). The output dict holds ``g_loss`` and ``d_loss``.

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
        return {"g_loss": float(g_loss.detach()), "d_loss": d_total / max(engine.d_train_steps, 1)}


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
    history: dict[str, list[float]] = {"g_loss": [], "d_loss": [], "_g": [], "_d": []}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine: ACGANTrainer) -> None:
        history["_g"].append(engine.state.output["g_loss"])
        history["_d"].append(engine.state.output["d_loss"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch(engine: ACGANTrainer) -> None:
        for key in ("g", "d"):
            values = history.pop(f"_{key}")
            history[f"{key}_loss"].append(sum(values) / max(len(values), 1))
            history[f"_{key}"] = []
        logger.info(
            "ACGAN epoch %d: g_loss %.4f d_loss %.4f", engine.state.epoch, history["g_loss"][-1], history["d_loss"][-1]
        )

    trainer.run()
    path = None
    if output_dir is not None:
        path = atomic_torch_save(
            {"network": generator.state_dict(), "discriminator": discriminator.state_dict()},
            Path(output_dir) / MODEL_FILE,
        )
    return {
        "epochs": int(trainer.state.epoch),
        "g_loss": history["g_loss"],
        "d_loss": history["d_loss"],
        "checkpoint": str(path) if path is not None else None,
    }
