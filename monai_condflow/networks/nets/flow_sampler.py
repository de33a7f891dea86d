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
"""A conditional flow seen as a generator network: conditions ``z`` in, synthetic images out (``inference.json``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from monai_condflow.utils.checks import check_temperature

__all__ = ["FlowSampler"]


class FlowSampler(nn.Module):
    """``forward(z)`` draws one image per condition from a conditional flow at a fixed temperature.

    This is the bundle's ``network_def`` in ``inference.json``: the flow's weights live in ``self.flow`` (a
    ``CheckpointLoader`` loads ``flow/model.pt`` into it), and a MONAI inferer / evaluator calls the sampler like any
    network, so ``monai.bundle verify_net_in_out`` checks it with a condition tensor ``[1, condition_dim]``.

    Args:
        flow: a conditional flow with ``sample(condition, temperature, generator)``, e.g.
            :class:`~monai_condflow.networks.nets.ConditionalGlow`.
        temperature: temperature ``T > 0`` of the latent ``nu ~ N(0, T^2 I)`` (0.9 in the paper).
        seed: seed of the sampler's own generator (``None``: the global torch generator), so that the same
            conditions give the same images run after run.

    Example::

        sampler = FlowSampler(ConditionalGlow.from_preset("small", image_size=64), temperature=0.9)
        images = sampler(z)  # z [B, 32] -> images [B, 1, 64, 64] in [0, 1]
    """

    def __init__(self, flow: nn.Module, temperature: float = 0.9, seed: int | None = 0) -> None:
        super().__init__()
        self.flow = flow
        self.temperature = check_temperature(temperature)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def forward(self, z: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` for conditions ``z`` ``[B, condition_dim]`` (plain tensors)."""
        z = z.as_tensor() if hasattr(z, "as_tensor") else z  # no image metadata (file names) on the samples
        if z.ndim != 2:
            raise ValueError(f"FlowSampler needs conditions [B, condition_dim], got shape {tuple(z.shape)}.")
        if self.seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        x = self.flow.sample(z, temperature=self.temperature, generator=self._generator)
        x = x[0] if isinstance(x, tuple) else x
        return x.clamp(0.0, 1.0)
