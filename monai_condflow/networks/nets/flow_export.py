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
"""Deterministic single-output views of a :class:`ConditionalGlow` for export and for MONAI's bundle checks.

``ConditionalGlow.forward`` returns a tuple ``(nu, logdet)`` and ``sample`` draws its own noise under
``torch.inference_mode``; neither is what ``torch.export`` or ``monai.bundle verify_net_in_out`` expect (one tensor
out of tensors in). These wrappers hold the flow (no copy) and expose one function each:

- :class:`FlowDecoder`: ``(noise [B, C, *spatial], condition [B, condition_dim]) -> image [B, C, *spatial]``, the
  decoding step of :meth:`ConditionalGlow.sample` with the noise given (standard normal, shaped like the image:
  the flow's latent has exactly one value per pixel), scaled by the temperature and clamped to ``[0, 1]``.
- :class:`FlowLogProb`: ``(image, condition) -> log p(image | condition)`` ``[B, 1]`` in nats.

Both export with :func:`torch.export.export` (``docs/export.md``) and give the same values as the flow's own
methods (``tests/networks/nets/test_flow_export.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

__all__ = ["FlowLogProb", "FlowDecoder"]


class FlowDecoder(nn.Module):
    """``forward(noise, condition)``: images decoded from given standard-normal noise, like ``flow.sample`` (with the
    flow's fitted sampling prior for the top latent when it has one, as ``sample(prior="auto")``).

    Args:
        flow: the conditional flow (initialised or loaded).
        temperature: the noise scale ``T`` (``nu = T * noise``), as in :meth:`ConditionalGlow.sample`.
    """

    def __init__(self, flow: ConditionalGlow, temperature: float = 0.9) -> None:
        super().__init__()
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        self.flow = flow
        self.temperature = float(temperature)

    def forward(self, noise: Tensor, condition: Tensor) -> Tensor:
        """Args:
            noise: ``[B, in_channels, *spatial]`` standard normal values (one per pixel).
            condition: ``[B, condition_dim]``, e.g. l2-normalised classifier embeddings ``z``.

        Returns:
            ``[B, in_channels, *spatial]`` in ``[0, 1]``.
        """
        nu = noise.flatten(1) * self.temperature
        size = tuple(noise.shape[2:])
        prior = getattr(self.flow, "sampling_prior", None)
        if prior is not None and prior.fitted and size == tuple(self.flow.image_size):  # as sample(prior="auto")
            d = self.flow.top_latent_dim
            nu = torch.cat([nu[:, :-d], prior.draw(nu[:, -d:], condition)], dim=1)
        x, _ = self.flow.inverse(nu, condition, size)
        return torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


class FlowLogProb(nn.Module):
    """``forward(image, condition)``: ``log p(image | condition)`` in nats as a ``[B, 1]`` tensor.

    Args:
        flow: the conditional flow (initialised or loaded).
    """

    def __init__(self, flow: ConditionalGlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, image: Tensor, condition: Tensor) -> Tensor:
        """Args:
            image: ``[B, in_channels, *spatial]`` in ``[0, 1]``.
            condition: ``[B, condition_dim]``.

        Returns:
            ``[B, 1]`` log-density.
        """
        return self.flow.log_prob(image, condition).unsqueeze(1)
