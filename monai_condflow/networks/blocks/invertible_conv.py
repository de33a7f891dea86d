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
"""LU-parameterised invertible 1x1 convolution (Glow) with a cached inverse weight."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_condflow.networks.blocks.flow_sequential import FlowLayer, defer_constant_logdet, record_logdet_map

__all__ = ["InvertibleConv1x1", "compose_weights", "composed_together"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# the weights composed together for a pass (:func:`composed_together`), by convolution
_GIVEN: ContextVar[dict[nn.Module, Tensor] | None] = ContextVar("monai_condflow_composed_weights", default=None)


class InvertibleConv1x1(FlowLayer):
    """Invertible 1x1 convolution ``y = W x`` (channel mixing at every voxel) with ``W = P L (U + diag(s))``.

    ``P`` is a fixed permutation (buffer), ``L`` unit lower-triangular, ``U`` strictly upper-triangular and
    ``s = sign * exp(log_abs_s)`` with a fixed ``sign`` buffer, so ``W`` is never singular and

    .. math::
        \\log|\\det \\partial y / \\partial x| = N_{\\mathrm{spatial}} \\sum_c \\mathrm{log\\_abs\\_s}_c.

    ``W`` is composed once per call, or, inside :func:`composed_together` (a training pass of ``ConditionalGlow`` on a
    GPU), taken from one batched composition with the other convolutions of its size. When autograd is off
    (sampling, evaluation) ``W`` and ``W^{-1}`` (computed in
    float64) are cached; the cache key holds the version counter and storage of every parameter and buffer, so it is
    invalidated by optimiser steps, ``load_state_dict``, in-place edits and device / dtype moves. With autograd on,
    both are recomputed so gradients flow.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        num_channels: number of channels ``C``.
    """

    def __init__(self, spatial_dims: int, num_channels: int) -> None:
        super().__init__()
        if spatial_dims not in _CONV_FN:
            raise ValueError(f"InvertibleConv1x1 supports spatial_dims 1, 2 or 3, got {spatial_dims}.")
        if num_channels < 1:
            raise ValueError(f"InvertibleConv1x1 needs num_channels >= 1, got {num_channels}.")
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        q = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("eye", torch.eye(num_channels), persistent=False)
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)).float())
        self._conv = _CONV_FN[spatial_dims]
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, num_channels={self.num_channels}"

    def _factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, tril(L, -1) + I, triu(U, 1) + diag(sign * exp(log_abs_s)))`` in the parameters' dtype or ``dtype``."""
        lower, upper, log_abs_s = self.lower, self.upper, self.log_abs_s
        perm, sign, eye = self.permutation, self.sign_s, self.eye
        if dtype is not None:
            lower, upper, log_abs_s = lower.to(dtype), upper.to(dtype), log_abs_s.to(dtype)
            perm, sign, eye = perm.to(dtype), sign.to(dtype), eye.to(dtype)
        return perm, torch.tril(lower, -1) + eye, torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_abs_s))

    def _compose(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W = P (tril(L, -1) + I) (triu(U, 1) + diag(sign * exp(log_abs_s)))`` as a ``[C, C]`` matrix.

        Composed in the parameters' dtype (or ``dtype``) even under ``torch.autocast``: a bf16 / fp16 product of the
        factors would no longer be the inverse of the float64 ``W^{-1}`` (and, cached, would leak low precision into
        later full-precision calls). Autocast still casts the composed matrix for the convolution that applies it.
        """
        with torch.autocast(self.lower.device.type, enabled=False):
            perm, lower, upper = self._factors(dtype)
            return perm @ (lower @ upper)

    def _key(self) -> tuple:
        return tuple(
            (id(t), t._version, t.data_ptr(), t.dtype, t.device)
            for t in (self.lower, self.upper, self.log_abs_s, self.permutation, self.sign_s)
        )

    def _inverse64(self) -> Tensor:
        """``W^{-1} = (U + diag(s))^{-1} (L + I)^{-1} P^T`` in float64, from two triangular solves.

        Cheaper than inverting the composed ``W`` (no re-factorisation of a matrix whose LU factors are the
        parameters) and at least as accurate.
        """
        perm, lower, upper = self._factors(torch.float64)
        return torch.linalg.solve_triangular(
            upper, torch.linalg.solve_triangular(lower, perm.t(), upper=False, unitriangular=True), upper=True
        )

    def weights(self) -> tuple[Tensor, Tensor]:
        """Return ``(W, W^{-1})`` as ``[C, C]`` matrices; cached when autograd is disabled.

        Under ``torch.compile`` (tracing) nothing is cached: both are computed inside the graph, so the compiled
        code has no data-dependent cache check (no graph break, no guard on the parameters' identities) and always
        sees the current parameters.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            weight = self._compose()
            return weight, self._inverse64().to(weight.dtype)
        key = self._key()
        if self._cache is None or self._cache_key != key:
            weight = self._compose()
            self._cache, self._cache_key = (weight, self._inverse64().to(weight.dtype)), key
        return self._cache

    def _apply_matrix(self, x: Tensor, matrix: Tensor) -> Tensor:
        return self._conv(x, matrix.view(*matrix.shape, *([1] * self.spatial_dims)))

    def _logdet(self, x: Tensor) -> Tensor:
        return (self.log_abs_s.sum() * math.prod(x.shape[2:])).to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``y = W x`` channel-wise.

        Args:
            x: ``[B, C, *spatial]``.
            condition: ignored.

        Returns:
            ``(y [B, C, *spatial], logdet [B])`` (``logdet`` ``None`` when left to an enclosing
            :func:`~monai_condflow.networks.blocks.flow_sequential.deferring_constant_logdets` block).
        """
        if torch.is_grad_enabled():  # no need for the inverse in training
            given = None if torch.compiler.is_compiling() else _GIVEN.get()
            weight = given.get(self) if given else None
            if weight is None:
                weight = self._compose()
        else:
            weight = self.weights()[0]
        record_logdet_map(lambda: self.log_abs_s.sum().to(x.dtype).expand(x.shape[0], *x.shape[2:]))
        y = self._apply_matrix(x, weight)
        if defer_constant_logdet(self.log_abs_s, math.prod(x.shape[2:])):  # summed by the enclosing pass
            return y, None
        return y, self._logdet(x)

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x = W^{-1} y`` channel-wise (cached ``W^{-1}`` without autograd); returns ``(x, -logdet)``."""
        return self._apply_matrix(y, self.weights()[1]), -self._logdet(y)


def compose_weights(convs: Sequence[InvertibleConv1x1]) -> list[Tensor]:
    """``W`` of each of ``convs`` (same number of channels, dtype and device), composed as one batch.

    The same products as each convolution's own composition, stacked: about a dozen operations in all instead of a
    dozen per convolution, forward and backward (on a GPU, kernels: the ``paper`` preset composes 64 matrices per
    training step). Equal to the one-by-one composition up to the rounding of the batched products.

    Args:
        convs: the convolutions.

    Returns:
        their ``[C, C]`` weights, in order (views of one ``[len(convs), C, C]`` tensor; differentiable).
    """
    first = convs[0]
    with torch.autocast(first.lower.device.type, enabled=False):  # as ``_compose``: in the parameters' precision
        lower = torch.stack([c.lower for c in convs])
        upper = torch.stack([c.upper for c in convs])
        log_abs_s = torch.stack([c.log_abs_s for c in convs])
        perm = torch.stack([c.permutation for c in convs])
        sign = torch.stack([c.sign_s for c in convs])
        lower = torch.tril(lower, -1) + first.eye
        upper = torch.triu(upper, 1) + torch.diag_embed(sign * torch.exp(log_abs_s))
        return list((perm @ (lower @ upper)).unbind(0))


@contextmanager
def composed_together(groups: Sequence[Sequence[InvertibleConv1x1]]) -> Iterator[None]:
    """Inside the block, the training forward (autograd on) of each convolution in ``groups`` uses the weight
    composed with the rest of its group (:func:`compose_weights`, computed on entering) instead of composing its own.

    For one pass through a flow whose parameters do not change inside it (``ConditionalGlow`` wraps its training
    forward in it). Calls without autograd keep their cached weights; compiled code composes its own.

    Args:
        groups: lists of convolutions of one size, dtype and device (a group of one is composed alone, as usual).
    """
    given: dict[nn.Module, Tensor] = {}
    for group in groups:
        if len(group) > 1:
            given.update(zip(group, compose_weights(group)))
    token = _GIVEN.set(given)
    try:
        yield
    finally:
        _GIVEN.reset(token)
