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
"""Conditional affine coupling with a bounded log-scale, and the Glow flow step built around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer
from torch import Tensor, nn

from monai_condflow.networks.blocks.actnorm import ActNorm
from monai_condflow.networks.blocks.compiled_steps import run_step
from monai_condflow.networks.blocks.flow_sequential import FlowLayer, FlowSequential, record_logdet_map
from monai_condflow.networks.blocks.invertible_conv import InvertibleConv1x1

__all__ = [
    "ConditionalCouplingNet",
    "ConditionalAffineCoupling",
    "ConditionalFlowStep",
    "GuidedCondition",
    "guided_parameters",
    "set_coupling_dtype",
]

DEFAULT_ACT: tuple = ("elu", {"inplace": True})


def _bound_scale(num_first: int, first: float, num_second: int, second: float, spatial_dims: int) -> Tensor:
    """``[1, num_first + num_second, 1, ...]``: ``first`` for the first channels, ``second`` for the rest."""
    scale = torch.cat([torch.full((num_first,), first), torch.full((num_second,), second)])
    return scale.view(1, -1, *([1] * spatial_dims))


def _soft_bound(raw: Tensor, bound: Tensor, out_scale: Tensor | None = None) -> Tensor:
    """``out_scale * tanh(raw / bound)`` per channel (``out_scale`` defaults to ``bound``), in one pass per op over
    the whole network output.

    ``raw`` must be a fresh tensor that nothing else holds (a conv output): it is divided in place (neither the
    conv's backward nor the division's needs it). Bit-identical to bounding each channel group on its own; without
    autograd every op runs in place. ``out_scale = -bound`` on some channels gives their exact negation for free
    (the coupling's inverse needs ``-log s``).
    """
    out_scale = bound if out_scale is None else out_scale
    raw = raw.div_(bound).tanh_()
    return raw.mul_(out_scale) if not (torch.is_grad_enabled() and raw.requires_grad) else raw * out_scale


def _exp(t: Tensor) -> Tensor:
    """``exp(t)``; on the CPU a channel slice of a channels-last tensor is first copied to a dense tensor.

    On such a slice (2-16 contiguous elements, then a jump) the CPU's elementwise kernels fall back to their scalar
    loop, which for ``exp`` is ~10x slower than the copy plus the vectorised ``exp`` (measured on
    ``[32, 2, 32, 32]``). A GPU's kernel reads the strided slice directly, so there the copy would only add a kernel
    and a pass over the tensor.
    """
    if (
        t.device.type != "cpu"
        or t.is_contiguous()
        or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))
    ):
        return t.exp()
    return t.clone(memory_format=torch.preserve_format).exp_()


class GuidedCondition(NamedTuple):
    """A condition for classifier-free guidance: every conditional layer computes its parameters (coupling log-scale
    and shift, prior mean and log-std) once with ``condition`` and once with ``null``, and uses
    ``null_params + weight * (cond_params - null_params)``.

    For a fixed ``weight`` every layer is still an exact bijection (its parameters depend only on the untouched
    channels), so sampling and encoding stay exact; only the density is no longer the trained model's.

    Attributes:
        condition: ``[B, condition_dim]``.
        null: ``[B, condition_dim]``, the learned null condition expanded to the batch.
        weight: the guidance weight ``w`` (1: plain conditional model, 0: unconditional).
    """

    condition: Tensor
    null: Tensor
    weight: float


def guided_parameters(fn: Callable[[Tensor, Tensor | None], Any], x: Tensor, condition: Any) -> Any:
    """``fn(x, condition)``; for a :class:`GuidedCondition`, the guided mix of ``fn`` at the condition and the null.

    ``fn`` returns a tensor or a tuple of tensors (each is mixed). Both evaluations run as one pass over a doubled
    batch.
    """
    if not isinstance(condition, GuidedCondition):
        return fn(x, condition)
    out = fn(torch.cat([x, x]), torch.cat([condition.condition, condition.null]))
    w = float(condition.weight)

    def mix(t: Tensor) -> Tensor:
        cond, null = t.chunk(2, dim=0)
        return torch.lerp(null, cond, w)

    return tuple(mix(t) for t in out) if isinstance(out, tuple) else mix(out)


def _check_condition(condition: Tensor | None, batch: int, condition_dim: int, owner: str) -> None:
    if isinstance(condition, GuidedCondition):
        _check_condition(condition.condition, batch, condition_dim, owner)
        _check_condition(condition.null, batch, condition_dim, owner)
        return
    if condition is None:
        raise ValueError(f"{owner} was built with condition_dim={condition_dim} but got condition=None.")
    if condition.ndim != 2 or condition.shape[0] != batch or condition.shape[1] != condition_dim:
        raise ValueError(
            f"{owner} expects a condition of shape [{batch}, {condition_dim}], got {list(condition.shape)}."
        )


class ConditionalCouplingNet(nn.Module):
    """The paper's coupling network: 3x3 conv -> act -> 1x1 conv -> (+ Linear(z) per channel) -> act -> 3x3 conv.

    .. math::
        h = W_2 * \\mathrm{act}(W_1 * x) + (A z)_{c}, \\qquad \\mathrm{out} = W_3 * \\mathrm{act}(h),

    where ``(A z)_c`` is broadcast over the spatial positions of channel ``c``. The last conv is zero-initialised,
    so the network outputs zeros at initialisation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        condition_dim: size of the condition vector ``z`` (0: unconditional, the projection is omitted).
        hidden_channels: hidden width.
        act: activation name or ``(name, kwargs)`` for :func:`monai.networks.layers.utils.get_act_layer`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        condition_dim: int,
        hidden_channels: int,
        act: str | tuple = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.condition_dim = condition_dim
        self.hidden_channels = hidden_channels
        self.conv_in = conv(in_channels, hidden_channels, kernel_size=3, padding=1)
        self.act_in = get_act_layer(act)
        self.conv_hidden = conv(hidden_channels, hidden_channels, kernel_size=1)
        self.cond_proj = nn.Linear(condition_dim, hidden_channels) if condition_dim > 0 else None
        self.act_hidden = get_act_layer(act)
        self.conv_out = conv(hidden_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """Args:
            x: ``[B, in_channels, *spatial]``.
            condition: ``[B, condition_dim]`` (required when ``condition_dim > 0``).

        Returns:
            ``[B, out_channels, *spatial]``.
        """
        h = self.conv_hidden(self.act_in(self.conv_in(x)))
        if self.cond_proj is not None:
            _check_condition(condition, x.shape[0], self.condition_dim, type(self).__name__)
            # in place on the fresh conv output: autograd-safe (neither the conv nor the add saves it for backward)
            # and one [B, hidden, *S] pass and allocation less than ``h = h + ...``
            h.add_(self.cond_proj(condition).view(x.shape[0], self.hidden_channels, *([1] * self.spatial_dims)))
        return self.conv_out(self.act_hidden(h))


class ConditionalAffineCoupling(FlowLayer):
    """Conditional affine coupling with a bounded log-scale.

    The first ``in_channels // 2`` channels ``x_a`` pass unchanged and parameterise the transform of the rest:

    .. math::
        (r, u) = \\mathrm{NN}(x_a, z), \\quad \\log s = a \\tanh(r / a), \\quad t = b \\tanh(u / b), \\quad
        y_b = x_b \\odot e^{\\log s} + t, \\quad \\log|\\det J| = \\sum \\log s.

    Both the log-scale and the shift are soft-bounded (``|log s| < a``, ``|t| < b``), so neither the forward nor the
    inverse ``x_b = (y_b - t) e^{-\\log s}`` can amplify by more than ``e^a`` per coupling, and the shift cannot feed
    back the magnitude of ``x_a`` (an unbounded shift compounds like a product of random matrices over a deep stack
    and overflows at sampling time, as does a sigmoid scale inverted there). The inputs are ActNorm-normalised, so
    ``b = 5`` does not restrict the model in practice. The network's last conv is zero-initialised, so the coupling
    starts as the identity.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels ``C >= 2``.
        condition_dim: size of ``z`` (0: unconditional).
        hidden_channels: width of the coupling network.
        act: activation of the coupling network.
        scale_bound: ``a``, the bound on ``|log s|``.
        shift_bound: ``b``, the bound on ``|t|``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        condition_dim: int,
        hidden_channels: int,
        act: str | tuple = DEFAULT_ACT,
        scale_bound: float = 2.0,
        shift_bound: float = 5.0,
    ) -> None:
        super().__init__()
        if in_channels < 2:
            raise ValueError(f"ConditionalAffineCoupling needs in_channels >= 2 (squeeze first), got {in_channels}.")
        if scale_bound <= 0 or shift_bound <= 0:
            raise ValueError(f"scale_bound and shift_bound must be > 0, got {scale_bound} and {shift_bound}.")
        self.shift_bound = float(shift_bound)
        self.in_channels = in_channels
        self.num_pass = in_channels // 2
        self.num_transformed = in_channels - self.num_pass
        self.scale_bound = float(scale_bound)
        self.net = ConditionalCouplingNet(
            spatial_dims, self.num_pass, 2 * self.num_transformed, condition_dim, hidden_channels, act
        )
        # per output channel of the network: a for the log-scale half, b for the shift half
        bound = _bound_scale(self.num_transformed, self.scale_bound, self.num_transformed, self.shift_bound,
                             spatial_dims)  # fmt: skip
        self.register_buffer("_bound", bound, persistent=False)
        # (-a, b): bounds to (-log s, t) in one pass (the inverse without autograd)
        neg_bound = _bound_scale(self.num_transformed, -self.scale_bound, self.num_transformed, self.shift_bound,
                                 spatial_dims)  # fmt: skip
        self.register_buffer("_neg_bound", neg_bound, persistent=False)
        self.compute_dtype: torch.dtype | None = None  # autocast dtype of ``net`` (``precision="bf16"``)

    def _net(self, h: Tensor, condition: Tensor | None) -> Tensor:
        """The coupling network's output, computed under autocast to :attr:`compute_dtype` when it is set and
        returned in ``h``'s dtype (so the affine transform and the log-determinant stay in full precision)."""
        if self.compute_dtype is None:
            return self.net(h, condition)
        with torch.autocast(device_type=h.device.type, dtype=self.compute_dtype, cache_enabled=False):
            out = self.net(h, condition)
        return out.to(h.dtype)

    def _scale_shift(self, x_a: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(a tanh(r / a), b tanh(u / b))`` with ``(r, u)`` the two halves of the network output."""
        return guided_parameters(lambda h, c: _soft_bound(self._net(h, c), self._bound).chunk(2, dim=1), x_a, condition)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[B, C, *spatial]``.
            condition: ``[B, condition_dim]``.

        Returns:
            ``(y [B, C, *spatial], logdet [B])``.
        """
        # split (not two slices): its backward concatenates the gradients in their own (channels-last) layout
        x_a, x_b = x.split([self.num_pass, self.num_transformed], dim=1)
        log_s, shift = self._scale_shift(x_a, condition)
        y_b = torch.addcmul(shift, x_b, _exp(log_s))
        record_logdet_map(lambda: log_s.sum(1))
        return torch.cat([x_a, y_b], dim=1), log_s.flatten(1).sum(1)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x_b = (y_b - t) e^{-log s}``; returns ``(x, -logdet)``."""
        y_a, y_b = y.split([self.num_pass, self.num_transformed], dim=1)
        if torch.is_grad_enabled() or isinstance(condition, GuidedCondition):
            log_s, shift = self._scale_shift(y_a, condition)
            x_b = (y_b - shift) * torch.exp(-log_s)
            return torch.cat([y_a, x_b], dim=1), -log_s.flatten(1).sum(1)
        # sampling / evaluation: the same values with fewer passes: ``-log s`` straight from the bounding pass (an
        # exact negation), ``exp`` by ``_exp`` (on a dense copy on the CPU), the product in place
        neg_log_s, shift = _soft_bound(self._net(y_a, condition), self._bound, self._neg_bound).chunk(2, dim=1)
        x_b = (y_b - shift).mul_(_exp(neg_log_s))
        return torch.cat([y_a, x_b], dim=1), neg_log_s.flatten(1).sum(1)


class ConditionalFlowStep(FlowSequential):
    """One flow step: ``ActNorm -> InvertibleConv1x1 -> ConditionalAffineCoupling`` (condition in the coupling).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels ``C >= 2``.
        condition_dim: size of ``z``.
        hidden_channels: coupling network width.
        act: coupling activation.
        scale_bound: bound on the coupling's ``|log s|``.
        shift_bound: bound on the coupling's ``|t|``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        condition_dim: int,
        hidden_channels: int,
        act: str | tuple = DEFAULT_ACT,
        scale_bound: float = 2.0,
        shift_bound: float = 5.0,
    ) -> None:
        super().__init__(
            ActNorm(spatial_dims, in_channels),
            InvertibleConv1x1(spatial_dims, in_channels),
            ConditionalAffineCoupling(
                spatial_dims, in_channels, condition_dim, hidden_channels, act, scale_bound, shift_bound
            ),
        )

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, logdet [B])`` of the three layers; a training call of a flow whose steps are compiled
        (:meth:`ConditionalGlow.compile_steps`) runs the compiled code (same values up to fp32 rounding)."""
        return run_step(self, FlowSequential.forward, x, condition)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, logdet [B])``, the exact inverse; a call without autograd of a flow whose decoder is compiled
        (``compile_steps(sampling=True)``) runs the compiled code (same values up to fp32 rounding)."""
        return run_step(self, FlowSequential.inverse, y, condition, inverse=True)


def set_coupling_dtype(module: nn.Module, dtype: torch.dtype | None) -> int:
    """Run every affine coupling network inside ``module`` under autocast to ``dtype`` (``None``: full precision);
    see :mod:`monai_condflow.utils.precision` (``precision="bf16"``).

    Returns:
        the number of coupling layers changed (0 for a module without any, e.g. a non-Glow flow).
    """
    count = 0
    for m in module.modules():
        if isinstance(m, ConditionalAffineCoupling):
            m.compute_dtype = dtype
            count += 1
    return count
