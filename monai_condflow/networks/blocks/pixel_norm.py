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
"""Per-pixel affine normalisation with fixed, data-initialised statistics (a flow layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monai_condflow.networks.blocks.flow_sequential import FlowLayer, record_logdet_map

__all__ = ["PixelNorm"]


class PixelNorm(FlowLayer):
    """``y = (x - mean) / std`` with a mean and a standard deviation per channel *and* pixel.

    Chest-CT slices cropped to the lung box are roughly aligned: the body outline, the lungs and the mediastinum sit
    in similar places. Subtracting the mean image and dividing by the per-pixel spread hands the rest of the flow the
    deviations from the average anatomy, so that even a briefly trained flow decodes latents near the prior's mode
    into anatomy rather than into uniform texture. It is an exact, fixed affine map:

    .. math::
        \\log|\\det \\partial y / \\partial x| = -\\sum_{c, p} \\log \\mathrm{std}_{c, p}

    (the same for every sample). The statistics are buffers, set once by :meth:`initialize` (smoothed with a 3x3
    box filter to damp the noise of a small batch, floored at ``min_std``) and persisted in the state dict with the
    ``initialized`` flag; a fresh layer is the identity (and stays so under DP-SGD, where data-dependent
    initialisation on private data is not allowed).

    Args:
        spatial_dims: 2 or 3.
        num_channels: channels ``C``.
        spatial_size: the fixed input size ``(H, W)`` / ``(D, H, W)``.
        min_std: floor on the per-pixel standard deviation.
    """

    def __init__(self, spatial_dims: int, num_channels: int, spatial_size: tuple[int, ...], min_std: float = 0.05):
        super().__init__()
        if len(spatial_size) != spatial_dims:
            raise ValueError(f"spatial_size {spatial_size} does not have {spatial_dims} dimensions.")
        self.spatial_dims = spatial_dims
        self.min_std = min_std
        shape = (1, num_channels, *spatial_size)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("log_std", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, size={tuple(self.mean.shape[1:])}, min_std={self.min_std}"

    def _check(self, x: Tensor) -> None:
        if x.shape[1:] != self.mean.shape[1:]:
            raise ValueError(
                f"PixelNorm expects inputs of shape [B, {', '.join(map(str, self.mean.shape[1:]))}], "
                f"got {list(x.shape)}."
            )

    def _logdet(self, x: Tensor) -> Tensor:
        return (-self.log_std.sum()).to(x.dtype).expand(x.shape[0])

    @torch.no_grad()
    def initialize(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Set the per-pixel mean and standard deviation from the batch ``x`` ``[B, C, *spatial]``, then forward."""
        self._check(x)
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        pad = (1,) * (2 * self.spatial_dims)

        def smooth(t: Tensor) -> Tensor:
            return pool(F.pad(t, pad, mode="replicate"), kernel_size=3, stride=1)

        mean = smooth(x.mean(dim=0, keepdim=True))
        var = smooth(((x - mean) ** 2).mean(dim=0, keepdim=True))
        self.mean.copy_(mean)
        self.log_std.copy_(torch.log(var.sqrt().clamp_min(self.min_std)))
        self.initialized.fill_(True)
        return self.forward(x, condition)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        record_logdet_map(lambda: (-self.log_std).sum(1).to(x.dtype).expand(x.shape[0], *x.shape[2:]))
        return (x - self.mean) * torch.exp(-self.log_std), self._logdet(x)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        return y * torch.exp(self.log_std) + self.mean, -self._logdet(y)
