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
"""TensorBoard grid of counterfactual triplets (source | counterfactual | difference) of fixed real images."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from monai.utils import optional_import

from monai_condflow.handlers.sample_grid import EpochGridSchedule
from monai_condflow.networks.nets.counterfactual import restrict_change
from monai_condflow.transforms.grid import make_grid
from monai_condflow.utils.distributed import get_rank, unwrap_model

if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch.utils.tensorboard import SummaryWriter
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = ["CounterfactualGridHandler", "counterfactual_grid"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def counterfactual_grid(
    flow: torch.nn.Module, images: torch.Tensor, conditions: torch.Tensor, targets: torch.Tensor,
    guidance: float | None = None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One row per image: source, counterfactual (:meth:`ConditionalGlow.counterfactual`), difference
    ``0.5 + (x' - x) / 2`` (mid-grey = unchanged).

    Args:
        flow: the conditional flow (a DDP wrapper is unwrapped); its train / eval mode is restored.
        images: ``[N, 1, H, W]`` in ``[0, 1]``.
        conditions: ``[N, D]``, the images' own embeddings.
        targets: ``[N, D]``, the target conditions.
        guidance: guidance weight of both passes (default: the flow's).
        masks: ``[N, 1, H, W]`` weights in ``[0, 1]`` where the counterfactual may change the source
            (:func:`~monai_condflow.networks.nets.counterfactual.restrict_change`, e.g. estimated lung masks as
            ``counterfactual.json``'s ``counterfactual_region lungs``); ``None``: the whole image.

    Returns:
        ``[1, H', W']`` float grid in ``[0, 1]``.
    """
    net = unwrap_model(flow)
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    try:
        x = images.to(param.device, param.dtype)
        x_cf = net.counterfactual(x, conditions.to(x), targets.to(x), guidance=guidance).clamp(0, 1)
        if masks is not None:
            x_cf = restrict_change(x, x_cf, masks.to(x))
    finally:
        net.train(was_training)
    rows = torch.stack([x, x_cf, (0.5 + (x_cf - x) / 2).clamp(0, 1)], 1).flatten(0, 1).cpu().float()
    return torch.from_numpy(make_grid(rows, nrow=3)).float().div_(255.0).unsqueeze(0)


class CounterfactualGridHandler(EpochGridSchedule):
    """Every ``every_n_epochs`` epochs (and at the end), write :func:`counterfactual_grid` of fixed images to
    TensorBoard (``add_image``, tag ``{tag}``). Only rank 0 writes.

    Args:
        flow: the conditional flow being trained (or evaluated).
        images: ``[N, 1, H, W]`` real images.
        conditions: ``[N, D]`` their embeddings.
        targets: ``[N, D]`` target conditions (e.g. the other class's centroid).
        every_n_epochs: period in epochs.
        summary_writer: a TensorBoard writer; if ``None``, one is created in ``log_dir`` (closed at the end).
        log_dir: TensorBoard folder when no writer is given.
        guidance: guidance weight (default: the flow's).
        tag: TensorBoard tag.
        masks: ``[N, 1, H, W]`` regions the counterfactual may change (see :func:`counterfactual_grid`).

    Example::

        CounterfactualGridHandler(flow, x[:4], z[:4], centroids[1 - y[:4]], log_dir="runs/tb").attach(trainer)
    """

    def __init__(
        self,
        flow: torch.nn.Module,
        images: torch.Tensor,
        conditions: torch.Tensor,
        targets: torch.Tensor,
        every_n_epochs: int = 1,
        summary_writer: SummaryWriter | None = None,
        log_dir: str | os.PathLike | None = None,
        guidance: float | None = None,
        tag: str = "counterfactual",
        masks: torch.Tensor | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if images.ndim != 4 or conditions.shape != targets.shape or conditions.shape[0] != images.shape[0]:
            raise ValueError(
                f"images [N, C, H, W], conditions and targets [N, D] expected, got {list(images.shape)}, "
                f"{list(conditions.shape)}, {list(targets.shape)}."
            )
        if masks is not None and (masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[1] != 1
                                  or masks.shape[2:] != images.shape[2:]):  # fmt: skip
            raise ValueError(f"masks [N, 1, H, W] like the images {list(images.shape)} expected, got "
                             f"{list(masks.shape)}.")  # fmt: skip
        self.flow, self.images, self.conditions, self.targets = flow, images, conditions, targets
        self.masks = masks
        self.every_n_epochs, self.guidance, self.tag = every_n_epochs, guidance, tag
        self._writer, self._log_dir, self._own_writer = summary_writer, log_dir, False

    def __call__(self, engine: Engine) -> None:
        if get_rank() != 0:
            return
        grid = counterfactual_grid(self.flow, self.images, self.conditions, self.targets, self.guidance, self.masks)
        if self._writer is None and self._log_dir is not None:
            self._writer = SummaryWriter(log_dir=str(self._log_dir))
            self._own_writer = True
        if self._writer is not None:
            self._writer.add_image(self.tag, grid, int(engine.state.epoch))
            self._writer.flush()
