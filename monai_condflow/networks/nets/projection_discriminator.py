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
"""A discriminator conditioned on a continuous embedding by projection, for the flow's adversarial fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["ProjectionDiscriminator"]


class ProjectionDiscriminator(nn.Module):
    """``D(x, z) = psi(phi(x)) + <E z, phi(x)>`` (Miyato and Koyama 2018), one logit per image.

    ``phi`` is a spectral-normalised CNN (a stride-1 stem, then one stride-2 convolution per entry of ``channels``,
    LeakyReLU 0.2) followed by a sum over space; ``psi`` and ``E`` are spectral-normalised linear maps. The projection
    makes a sample that looks real but does not match its condition ``z`` score as fake, so the flow's fine-tuning
    (:class:`~monai_condflow.engines.flow_adversarial.AdversarialFlowTrainer`) is pushed towards its condition's class
    as well as towards realistic images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        condition_dim: size of the condition ``z`` (0: an unconditional discriminator, ``condition`` ignored).
        channels: widths of the stride-2 stages; images need sides divisible by ``2 ** len(channels)``.
        high_pass: also feed the stem the high-pass residual ``x - mean_3x3(x)`` (extra channels), so that pixel-scale
            patterns (speckle, grids) reach the first layer unmixed with the anatomy's intensities.
        channels_last: with ``spatial_dims=2``, keep the convolution weights in channels-last layout (oneDNN's NHWC
            kernels; same values, measured 1.3x faster for the adversarial phase's critic passes on 2 CPU
            threads, ``benchmarks/bench_channels_last.py``). ``False`` keeps PyTorch's default layout.

    Example::

        disc = ProjectionDiscriminator(2, 1, 32)
        logits = disc(x, z)   # x [B, 1, 64, 64], z [B, 32] -> [B]
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        condition_dim: int = 32,
        channels: Sequence[int] = (32, 64, 128, 128),
        high_pass: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ProjectionDiscriminator supports spatial_dims 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or condition_dim < 0 or not channels or min(channels) < 1:
            raise ValueError(
                f"ProjectionDiscriminator needs in_channels >= 1, condition_dim >= 0 and positive channels; got "
                f"in_channels={in_channels}, condition_dim={condition_dim}, channels={list(channels)}."
            )
        conv = Conv[Conv.CONV, spatial_dims]
        self.high_pass = bool(high_pass)
        stem_in = 2 * in_channels if self.high_pass else in_channels
        layers: list[nn.Module] = [spectral_norm(conv(stem_in, channels[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        prev = channels[0]
        for ch in channels:
            layers += [spectral_norm(conv(prev, ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            prev = ch
        self.spatial_dims = spatial_dims
        self.condition_dim = condition_dim
        self.size_multiple = 2 ** len(channels)
        self.features = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Linear(prev, 1))
        self.embed = spectral_norm(nn.Linear(condition_dim, prev, bias=False)) if condition_dim else None
        if channels_last and spatial_dims == 2:
            self.to(memory_format=torch.channels_last)  # 4-D weights only; values unchanged

    def _input(self, x: Tensor) -> Tensor:
        """``x``, with its high-pass residual ``x - mean_3x3(x)`` as extra channels when ``high_pass``."""
        if not self.high_pass:
            return x
        pool = nn.functional.avg_pool2d if self.spatial_dims == 2 else nn.functional.avg_pool3d
        return torch.cat([x, x - pool(x, 3, stride=1, padding=1, count_include_pad=False)], dim=1)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """Args: ``x`` ``[B, in_channels, *spatial]``, ``condition`` ``[B, condition_dim]``. Returns: ``[B]`` logits
        (higher: more likely a real image of that condition)."""
        if x.ndim != self.spatial_dims + 2 or any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(
                f"ProjectionDiscriminator expects [B, C, *spatial] with {self.spatial_dims} spatial dims divisible by "
                f"{self.size_multiple}, got {list(x.shape)}."
            )
        if self.embed is None:
            return self.head(self.features(self._input(x)).flatten(2).sum(dim=2)).squeeze(1)
        if condition is None or condition.shape != (x.shape[0], self.condition_dim):
            raise ValueError(
                f"ProjectionDiscriminator expects a condition of shape [{x.shape[0]}, {self.condition_dim}], got "
                f"{None if condition is None else list(condition.shape)}."
            )
        h = self.features(self._input(x)).flatten(2).sum(dim=2)
        return self.head(h).squeeze(1) + (self.embed(condition) * h).sum(dim=1)
