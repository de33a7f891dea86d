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
"""
Bits per dimension of a normalising flow: a helper from ``(nu, logdet)`` and an Ignite metric.

For an image quantised to ``n_bits`` and dequantised to ``x`` in ``[0, 1]^D``, the discrete negative
log-likelihood in bits per dimension is

.. math::

    \\mathrm{bpd}(x) = \\frac{-\\log p(x)}{D \\ln 2} + n_\\text{bits},
    \\qquad \\log p(x) = \\log \\mathcal{N}(\\nu; 0, I) + \\log |\\det \\partial \\nu / \\partial x|,

the second term being the correction for the bin width :math:`2^{-n_\\text{bits}}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.utils import optional_import

Metric, _ = optional_import("ignite.metrics", name="Metric", as_type="base")
reinit__is_reduced, _ = optional_import("ignite.metrics.metric", name="reinit__is_reduced", as_type="decorator")
sync_all_reduce, _ = optional_import("ignite.metrics.metric", name="sync_all_reduce", as_type="decorator")
NotComputableError, _ = optional_import("ignite.exceptions", name="NotComputableError")

__all__ = ["bits_per_dim_from_latent", "BitsPerDim"]

_LOG_2PI = math.log(2.0 * math.pi)


def bits_per_dim_from_latent(nu: torch.Tensor, logdet: torch.Tensor, num_dims: int, n_bits: int = 8) -> torch.Tensor:
    """
    Per-sample bits/dim from a flow's output under a standard normal prior.

    Args:
        nu: latents ``[B, D']`` (or any shape ``[B, ...]``); summed over all but the first dimension.
        logdet: ``log|det d nu / d x|`` per sample, ``[B]``.
        num_dims: ``D``, the number of dimensions of ``x`` (e.g. ``C * H * W``).
        n_bits: bits of the quantised data; ``0`` gives the continuous density in bits/dim.

    Returns:
        ``[B]`` bits per dimension.
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}.")
    log_prior = -0.5 * (nu.flatten(1).pow(2) + _LOG_2PI).sum(dim=1)
    log_px = log_prior + logdet
    return -log_px / (num_dims * math.log(2.0)) + n_bits


class BitsPerDim(Metric):
    """
    Mean bits/dim over an epoch, accumulated from per-sample values (e.g. ``ConditionalGlow.bits_per_dim``).

    ``update`` takes the per-sample bits/dim ``[B]`` (or a ``(bpd, y)`` pair whose first item is used). Sums are
    kept as tensors and all-reduced across ranks in ``compute``. Non-finite values are counted in
    ``num_nonfinite`` and make the result ``inf``, so that a diverged model is never "best".

    Args:
        output_transform: maps the engine output to the per-sample values,
            e.g. ``monai.handlers.from_engine(["pred"], first=True)``.
        device: device of the running sums.

    Example::

        metric = BitsPerDim(output_transform=lambda out: out["pred"])
        metric.attach(evaluator, "val_bpd")
    """

    _state_dict_all_req_keys = ("_sum", "_num_examples", "_num_nonfinite")

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._num_examples = 0
        self._num_nonfinite = 0

    @reinit__is_reduced
    def update(self, output: torch.Tensor | Sequence[torch.Tensor]) -> None:
        values = output[0] if isinstance(output, (tuple, list)) else output
        values = torch.as_tensor(values).detach().reshape(-1).to(self._device, torch.float64)
        finite = torch.isfinite(values)
        self._num_nonfinite += int((~finite).sum().item())
        self._sum += values[finite].sum()
        self._num_examples += values.numel()

    @sync_all_reduce("_sum", "_num_examples", "_num_nonfinite")
    def compute(self) -> float:
        if self._num_examples == 0:
            raise NotComputableError("BitsPerDim must have at least one example before it can be computed.")
        if self._num_nonfinite > 0:
            return float("inf")
        return float(self._sum.item()) / self._num_examples

    @property
    def num_nonfinite(self) -> int:
        """Non-finite per-sample values seen since the last reset (this rank)."""
        return self._num_nonfinite
