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
"""Conditional ACGAN baseline (Odena et al. 2017) built from MONAI's ``Generator`` and ``Discriminator``.

The generator maps ``noise * embedding(label)`` through MONAI's :class:`~monai.networks.nets.Generator` to an image
in ``[0, 1]`` (sigmoid); the discriminator is MONAI's :class:`~monai.networks.nets.Discriminator` whose final linear
layer outputs ``1 + num_classes`` logits: the real/fake logit and the auxiliary class logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets import Discriminator, Generator

__all__ = ["ACGANDiscriminator", "ACGANGenerator"]

logger = logging.getLogger(__name__)


class ACGANGenerator(nn.Module):
    """Class-conditional generator ``G(noise, label) -> image [B, 1, S, S]`` in ``[0, 1]``.

    Args:
        num_classes: number of classes.
        latent_dim: noise dimension.
        image_size: output side ``S`` (divisible by the product of ``strides``).
        out_channels: image channels.
        channels: channels of MONAI ``Generator``'s up-sampling layers (the last is set to ``out_channels``).
        strides: up-sampling factors per layer.
        num_res_units: residual units per layer.
    """

    def __init__(
        self,
        num_classes: int = 2,
        latent_dim: int = 64,
        image_size: int = 64,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 32, 16),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
    ) -> None:
        super().__init__()
        factor = int(np.prod(strides))
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by prod(strides) = {factor}.")
        self.num_classes, self.latent_dim, self.image_size = num_classes, latent_dim, image_size
        self.embedding = nn.Embedding(num_classes, latent_dim)
        start = image_size // factor
        chans = tuple(channels[1:]) + (out_channels,)
        self.net = Generator(
            latent_shape=(latent_dim,),
            start_shape=(channels[0], start, start),
            channels=chans,
            strides=tuple(strides),
            num_res_units=num_res_units,
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: noise ``[B, latent_dim]``, labels ``[B]``. Returns: images ``[B, 1, S, S]`` in ``[0, 1]``."""
        return torch.sigmoid(self.net(noise * self.embedding(labels.long())))

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images for the given class ids; noise drawn on the CPU with ``generator`` (reproducible on any device)."""
        noise = torch.randn(labels.shape[0], self.latent_dim, generator=generator)
        device = self.embedding.weight.device
        with torch.no_grad():
            return self(noise.to(device), labels.to(device))


class ACGANDiscriminator(Discriminator):
    """MONAI ``Discriminator`` with an auxiliary classifier: ``forward(x) -> (adv_logit [B], class_logits [B, C])``.

    Args:
        num_classes: number of classes.
        image_size: input side ``S``.
        in_channels: image channels.
        channels: channels of the down-sampling layers.
        strides: strides of the down-sampling layers.
        num_res_units: residual units per layer.
        dropout: dropout rate.
    """

    def __init__(
        self,
        num_classes: int = 2,
        image_size: int = 64,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        dropout: float | None = 0.25,
    ) -> None:
        self.num_classes = num_classes  # read by _get_final_layer during the parent constructor
        super().__init__(
            in_shape=(in_channels, image_size, image_size),
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
            last_act=None,
        )

    def _get_final_layer(self, in_shape: Sequence[int]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), 1 + self.num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = self.final(self.net(x))
        return out[:, 0], out[:, 1:]
