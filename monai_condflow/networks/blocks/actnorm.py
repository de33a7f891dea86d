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
"""Activation normalisation (Glow's ActNorm) with an explicit, persisted data-dependent initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from monai_condflow.networks.blocks.flow_sequential import FlowLayer, defer_constant_logdet, record_logdet_map

__all__ = ["ActNorm"]


class ActNorm(FlowLayer):
    """Per-channel affine normalisation ``y = x * exp(log_scale) + bias``.

    The log-determinant is the same for every sample:

    .. math::
        \\log|\\det \\partial y / \\partial x| = N_{\\mathrm{spatial}} \\sum_c \\mathrm{log\\_scale}_c.

    Initialisation is explicit: :meth:`initialize` sets ``bias`` and ``log_scale`` so that the output on the given
    batch has zero mean and unit variance per channel, and sets the ``initialized`` buffer, which lives in the state
    dict, so a reloaded layer is never re-initialised. :meth:`forward` never initialises: on a fresh layer it runs with
    the identity parameters (``log_scale = 0``, ``bias = 0``). Whole models are initialised with
    :meth:`monai_condflow.networks.nets.ConditionalGlow.initialize`, which refuses to train an uninitialised model.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        num_channels: number of channels ``C``.
        min_std: floor on the per-channel standard deviation used by :meth:`initialize`, so that a channel that is
            constant on the initialisation batch does not get a huge scale.
    """

    def __init__(self, spatial_dims: int, num_channels: int, min_std: float = 1e-3) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"ActNorm needs num_channels >= 1, got {num_channels}.")
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.min_std = min_std
        shape = (1, num_channels) + (1,) * spatial_dims
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, num_channels={self.num_channels}"

    def _logdet(self, x: Tensor) -> Tensor:
        n_spatial = math.prod(x.shape[2:])
        return (self.log_scale.sum() * n_spatial).to(x.dtype).expand(x.shape[0])

    @torch.no_grad()
    def initialize(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Set the parameters from the batch statistics of ``x``, mark the layer initialised, run :meth:`forward`.

        Args:
            x: ``[B, C, *spatial]`` initialisation batch.
            condition: ignored.

        Returns:
            ``(y, logdet)`` of the newly initialised layer.
        """
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(self.min_std)
        self.log_scale.copy_(-torch.log(std))
        self.bias.copy_(-mean / std)
        self.initialized.fill_(True)
        return self.forward(x, condition)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = x * exp(log_scale) + bias``.

        Args:
            x: ``[B, C, *spatial]``.
            condition: ignored.

        Returns:
            ``(y [B, C, *spatial], logdet [B])`` (``logdet`` ``None`` when left to an enclosing
            :func:`~monai_condflow.networks.blocks.flow_sequential.deferring_constant_logdets` block).
        """
        record_logdet_map(lambda: self.log_scale.sum().to(x.dtype).expand(x.shape[0], *x.shape[2:]))
        y = torch.addcmul(self.bias, x, self.log_scale.exp())
        if defer_constant_logdet(self.log_scale, math.prod(x.shape[2:])):  # summed by the enclosing pass
            return y, None
        return y, self._logdet(x)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x = (y - bias) * exp(-log_scale)``; returns ``(x, -logdet)``."""
        x = y - self.bias
        scale = torch.exp(-self.log_scale)
        # without autograd the product goes in place into the fresh difference (same values, one allocation less)
        return (x * scale if torch.is_grad_enabled() else x.mul_(scale)), -self._logdet(y)
