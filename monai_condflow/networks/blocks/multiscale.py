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
"""Fine-grained multi-scale architecture (Ma et al. 2021, Wolf): conditional split priors and internal levels.

In an internal level, the channels leave the flow a little at a time: after each block of flow steps, another
``C / M`` of the level's ``C`` channels (``M`` = granularity) is factored out. Each factored-out part is standardised
under a conditional Gaussian prior whose mean and log-std come from the remaining channels and the condition ``z``,

.. math::
    \\varepsilon = (x_{out} - \\mu(x_{keep}, z)) \\, e^{-\\log\\sigma(x_{keep}, z)}, \\qquad
    \\log|\\det J| = -\\sum \\log\\sigma,

so ``eps ~ N(0, I)`` under the prior and the prior's log-density is part of the flow's log-determinant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from monai_condflow.networks.blocks.coupling import (
    DEFAULT_ACT,
    ConditionalCouplingNet,
    ConditionalFlowStep,
    _bound_scale,
    _check_condition,
    _exp,
    _soft_bound,
    guided_parameters,
)
from monai_condflow.networks.blocks.flow_sequential import FlowLayer, FlowSequential, record_logdet_map

__all__ = ["FineGrainedSplit", "ConditionalTopPrior", "FineGrainedLevel"]


class FineGrainedSplit(FlowLayer):
    """Factor out the last ``out_channels`` channels, standardised under a conditional Gaussian prior.

    ``(m, r) = NN(x_keep, z)`` (the coupling network of the paper, zero-initialised last conv, so the prior starts as
    ``N(0, I)``), ``mu = b * tanh(m / b)``, ``log sigma = a * tanh(r / a)`` (both bounded, as in the coupling).
    As a flow layer the output is ``cat([x_keep, eps])`` (same shape as the input); :meth:`factor_out` / :meth:`restore`
    give the two parts separately.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels entering the split.
        out_channels: channels factored out (``1 <= out_channels < in_channels``).
        condition_dim: size of ``z`` (0: unconditional).
        hidden_channels: width of the prior network.
        act: activation of the prior network.
        scale_bound: bound ``a`` on ``|log sigma|``.
        shift_bound: bound ``b`` on ``|mu|``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        condition_dim: int,
        hidden_channels: int,
        act: str | tuple = DEFAULT_ACT,
        scale_bound: float = 2.0,
        shift_bound: float = 5.0,
    ) -> None:
        super().__init__()
        if not 1 <= out_channels < in_channels:
            raise ValueError(
                f"FineGrainedSplit needs 1 <= out_channels < in_channels, got out_channels={out_channels}, "
                f"in_channels={in_channels}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.keep_channels = in_channels - out_channels
        self.scale_bound = float(scale_bound)
        self.shift_bound = float(shift_bound)
        self.net = ConditionalCouplingNet(
            spatial_dims, self.keep_channels, 2 * out_channels, condition_dim, hidden_channels, act
        )
        # per output channel of the network: b for the mean half, a for the log-std half
        bound = _bound_scale(out_channels, self.shift_bound, out_channels, self.scale_bound, spatial_dims)
        self.register_buffer("_bound", bound, persistent=False)

    def _prior(self, x_keep: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(b tanh(m / b), a tanh(r / a))`` with ``(m, r)`` the two halves of the network output (guided mix for
        a :class:`~monai_condflow.networks.blocks.coupling.GuidedCondition`)."""
        return guided_parameters(
            lambda h, c: _soft_bound(self.net(h, c), self._bound).chunk(2, dim=1), x_keep, condition
        )

    def factor_out(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``x`` ``[B, in_channels, *S]`` into ``(x_keep [B, keep, *S], eps [B, out, *S], logdet [B])``."""
        x_keep, x_out = x.split([self.keep_channels, self.out_channels], dim=1)
        mean, log_std = self._prior(x_keep, condition)
        eps = (x_out - mean) * torch.exp(-log_std)
        record_logdet_map(lambda: (-log_std).sum(1))
        return x_keep, eps, -log_std.flatten(1).sum(1)

    def restore(self, x_keep: Tensor, eps: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`factor_out`: returns ``(x [B, in_channels, *S], log|det dx/d(x_keep, eps)| [B])``."""
        mean, log_std = self._prior(x_keep, condition)
        x_out = torch.addcmul(mean, eps, _exp(log_std))
        return torch.cat([x_keep, x_out], dim=1), log_std.flatten(1).sum(1)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(cat([x_keep, eps]), logdet [B])`` with the shape of ``x``."""
        x_keep, eps, logdet = self.factor_out(x, condition)
        return torch.cat([x_keep, eps], dim=1), logdet

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`forward`."""
        return self.restore(*y.split([self.keep_channels, self.out_channels], dim=1), condition)


class ConditionalTopPrior(FlowLayer):
    """Standardise the top latent under a Gaussian whose mean / log-std are a linear function of ``z``.

    ``(m, r) = A z + c`` (zero-initialised), ``mu = b tanh(m / b)``, ``log sigma = a tanh(r / a)``,
    ``y = (x - mu) e^{-log sigma}``. Per channel and broadcast over space by default (Glow's conditional top prior),
    ``log|det J| = -N_spatial * sum_c log sigma_c``; with ``spatial_shape`` one mean and log-std per entry of the
    ``[C, *spatial_shape]`` latent, ``log|det J| = -sum log sigma``, so ``z`` can place structure in space.
    Unconditional (``condition_dim = 0``): ``m`` and ``r`` are free parameters.

    Args:
        spatial_dims: number of spatial dimensions.
        num_channels: channels of the top latent.
        condition_dim: size of ``z``.
        scale_bound: bound ``a`` on ``|log sigma|``.
        shift_bound: bound ``b`` on ``|mu|``.
        spatial_shape: the top latent's spatial size for a per-entry prior; ``None``: per channel.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int,
        condition_dim: int,
        scale_bound: float = 2.0,
        shift_bound: float = 5.0,
        spatial_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.shift_bound = float(shift_bound)
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.condition_dim = condition_dim
        self.scale_bound = float(scale_bound)
        if spatial_shape is not None:
            spatial_shape = tuple(int(s) for s in spatial_shape)
            if len(spatial_shape) != spatial_dims or min(spatial_shape) < 1:
                raise ValueError(
                    f"ConditionalTopPrior: spatial_shape needs {spatial_dims} sizes >= 1, got {list(spatial_shape)}."
                )
        self.spatial_shape = spatial_shape
        self._param_shape = spatial_shape if spatial_shape is not None else (1,) * spatial_dims
        size = 2 * num_channels * math.prod(self._param_shape)
        if condition_dim > 0:
            self.proj = nn.Linear(condition_dim, size)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = None
            self.params = nn.Parameter(torch.zeros(size))

    def _prior(self, x: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        return guided_parameters(self._prior_params, x, condition)

    def _prior_params(self, x: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.proj is not None:
            _check_condition(condition, x.shape[0], self.condition_dim, type(self).__name__)
            out = self.proj(condition)
        else:
            out = self.params.expand(x.shape[0], -1)
        if self.spatial_shape is not None and tuple(x.shape[2:]) != self.spatial_shape:
            raise ValueError(
                f"{type(self).__name__}: a per-entry prior for a top latent of spatial size {list(self.spatial_shape)}"
                f" got {list(x.shape[2:])} (the flow's image size is fixed)."
            )
        out = out.view(x.shape[0], 2 * self.num_channels, *self._param_shape)
        mean, raw = out.chunk(2, dim=1)
        a, b = self.scale_bound, self.shift_bound
        return b * torch.tanh(mean / b), a * torch.tanh(raw / a)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[B, C, *spatial]``.
            condition: ``[B, condition_dim]``.

        Returns:
            ``(eps [B, C, *spatial], logdet [B])``.
        """
        mean, log_std = self._prior(x, condition)
        record_logdet_map(lambda: (-log_std).expand(x.shape[0], -1, *x.shape[2:]).sum(1))
        return (x - mean) * torch.exp(-log_std), -self._log_std_sum(log_std, x)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x = mu + eps e^{log sigma}``; returns ``(x, -logdet)``."""
        mean, log_std = self._prior(y, condition)
        return torch.addcmul(mean, y, log_std.exp()), self._log_std_sum(log_std, y)

    @staticmethod
    def _log_std_sum(log_std: Tensor, x: Tensor) -> Tensor:
        """``sum log sigma`` over every entry of ``x`` ``[B]`` (a per-channel log-std counts once per position)."""
        return log_std.flatten(1).sum(1) * (math.prod(x.shape[2:]) // math.prod(log_std.shape[2:]))


class FineGrainedLevel(FlowLayer):
    """An internal level: ``num_blocks`` blocks of flow steps, each followed by a :class:`FineGrainedSplit` that
    factors out ``in_channels // granularity`` channels.

    The output has the input's shape, laid out as ``cat([h, eps_1, ..., eps_K])``: the first
    :attr:`keep_channels` channels ``h`` continue to the next level, ``eps_k`` (``split_channels`` each) left after
    block ``k``.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels ``C`` entering the level.
        condition_dim: size of ``z``.
        num_blocks: number of blocks ``K`` (``K * (C // M) < C``).
        num_steps: flow steps per block.
        hidden_channels: coupling and prior network width.
        granularity: ``M``.
        act: network activation.
        scale_bound: bound on log-scales.
        shift_bound: bound on shifts and prior means.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        condition_dim: int,
        num_blocks: int,
        num_steps: int,
        hidden_channels: int,
        granularity: int = 4,
        act: str | tuple = DEFAULT_ACT,
        scale_bound: float = 2.0,
        shift_bound: float = 5.0,
    ) -> None:
        super().__init__()
        split = in_channels // granularity
        if granularity < 2 or split < 1 or num_blocks < 1 or in_channels - num_blocks * split < 1:
            raise ValueError(
                f"FineGrainedLevel: {num_blocks} blocks each factoring out in_channels // granularity = "
                f"{in_channels} // {granularity} = {split} channels must leave at least one of the {in_channels} "
                "channels (need granularity >= 2, in_channels >= granularity, num_blocks * split < in_channels)."
            )
        self.in_channels = in_channels
        self.split_channels = split
        self.keep_channels = in_channels - num_blocks * split
        blocks, splits, channels = [], [], in_channels
        for _ in range(num_blocks):
            steps = [
                ConditionalFlowStep(
                    spatial_dims, channels, condition_dim, hidden_channels, act, scale_bound, shift_bound
                )
                for _ in range(num_steps)
            ]
            blocks.append(FlowSequential(*steps))
            splits.append(
                FineGrainedSplit(
                    spatial_dims, channels, split, condition_dim, hidden_channels, act, scale_bound, shift_bound
                )
            )
            channels -= split
        self.blocks = nn.ModuleList(blocks)
        self.splits = nn.ModuleList(splits)

    def _run(self, x: Tensor, condition: Tensor | None, init: bool) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        eps_all = []
        for block, split in zip(self.blocks, self.splits):
            x, ld = block.initialize(x, condition) if init else block(x, condition)
            x, eps, ld_split = split.factor_out(x, condition)
            logdet = logdet + ld + ld_split
            eps_all.append(eps)
        return torch.cat([x, *eps_all], dim=1), logdet

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[B, in_channels, *spatial]``.
            condition: ``[B, condition_dim]``.

        Returns:
            ``(cat([h, eps_1, ..., eps_K]) [B, in_channels, *spatial], logdet [B])``.
        """
        return self._run(x, condition, init=False)

    def initialize(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Initialise the ActNorms of every block in order, returning the forward output."""
        return self._run(x, condition, init=True)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`forward`; returns ``(x, log|det dx/dy|)``."""
        logdet = y.new_zeros(y.shape[0])
        eps_all = y[:, self.keep_channels :].split(self.split_channels, dim=1)
        x = y[:, : self.keep_channels]
        for k in reversed(range(len(self.blocks))):
            x, ld_split = self.splits[k].restore(x, eps_all[k], condition)
            x, ld = self.blocks[k].inverse(x, condition)
            logdet = logdet + ld + ld_split
        return x, logdet
