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
"""Base class of the invertible flow layers and the sequential container that composes them.

Every flow layer maps ``x -> y`` bijectively and reports the per-sample log-determinant of its Jacobian:

* ``forward(x, condition=None) -> (y, logdet)`` with ``logdet[b] = log |det dy_b / dx_b|``;
* ``inverse(y, condition=None) -> (x, logdet)`` with ``logdet[b] = log |det dx_b / dy_b|`` (minus the forward one);
* ``initialize(x, condition=None) -> (y, logdet)``: data-dependent initialisation (ActNorm) followed by the forward
  pass; layers without data-dependent parameters just run ``forward``.

``logdet`` always has shape ``[B]`` and the dtype / device of the input.

Inside :func:`recording_logdet_maps`, the forward pass of every layer with a non-zero log-determinant also records it
*per position*, ``[B, *spatial]`` at the layer's own resolution (summed over channels; a layer whose log-determinant
does not depend on the data spreads it evenly over the positions it acts on). ``ConditionalGlow.log_prob_map`` uses
this to split ``log p(x | z)`` over the pixels.

Inside :func:`deferring_constant_logdets` (a pass of ``ConditionalGlow`` on a GPU), a layer whose log-determinant
does not depend on the data (ActNorm, the 1x1 convolution) may leave ``(parameter, positions)`` in the block's list
and return ``None`` as its log-determinant; :class:`FlowSequential` skips it and the caller adds
:func:`sum_deferred_logdets` of the list once. Outside such a block every layer returns its ``[B]`` log-determinant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

__all__ = [
    "FlowLayer",
    "FlowSequential",
    "defer_constant_logdet",
    "deferred_logdets",
    "deferring_constant_logdets",
    "logdet_maps_recording",
    "record_logdet_map",
    "recording_logdet_maps",
    "sum_deferred_logdets",
]

_LOGDET_MAPS: ContextVar[list[Tensor] | None] = ContextVar("monai_condflow_logdet_maps", default=None)
_DEFERRED: ContextVar[list[tuple[Tensor, int]] | None] = ContextVar("monai_condflow_deferred_logdets", default=None)


@contextmanager
def recording_logdet_maps() -> Iterator[list[Tensor]]:
    """Collect the per-position log-determinants ``[B, *spatial_l]`` of the forward passes run inside the block, in
    the order the layers run (nested blocks record into the innermost list only)."""
    maps: list[Tensor] = []
    token = _LOGDET_MAPS.set(maps)
    try:
        yield maps
    finally:
        _LOGDET_MAPS.reset(token)


def logdet_maps_recording() -> bool:
    """Whether a :func:`recording_logdet_maps` block is active (compiled flow steps then run eagerly)."""
    return _LOGDET_MAPS.get() is not None


def record_logdet_map(values: Callable[[], Tensor]) -> None:
    """Append ``values()`` (a layer's forward log-determinant per position, ``[B, *spatial]``) when recording; the
    callable is not evaluated otherwise, so layers pay nothing outside :func:`recording_logdet_maps`. Under
    ``torch.compile`` tracing nothing is recorded (a compiled training step stays one graph)."""
    if torch.compiler.is_compiling():
        return
    maps = _LOGDET_MAPS.get()
    if maps is not None:
        maps.append(values())


@contextmanager
def deferring_constant_logdets(enabled: bool = True) -> Iterator[list[tuple[Tensor, int]]]:
    """Inside the block, the forward pass of a layer whose log-determinant is ``positions * sum(parameter)`` (the
    same for every sample) leaves ``(parameter, positions)`` in the yielded list and returns ``None`` as its
    log-determinant (:func:`defer_constant_logdet`), so that the caller sums all of them at once
    (:func:`sum_deferred_logdets`): on a GPU a few kernels per pass instead of ~5 per layer, forward and backward
    (~620 of the ``paper`` preset's ~4,240 operations per training pass). For a caller that adds the sum to the
    pass's log-determinant and calls the layers only through :class:`FlowSequential`.

    Args:
        enabled: ``False``: every layer inside returns its own log-determinant, even inside an enclosing block (a
            pass that does not add the sum shields its layers from a caller's block).
    """
    deferred: list[tuple[Tensor, int]] = []
    token = _DEFERRED.set(deferred if enabled else None)
    try:
        yield deferred
    finally:
        _DEFERRED.reset(token)


def deferred_logdets() -> list[tuple[Tensor, int]] | None:
    """The list of the enclosing :func:`deferring_constant_logdets` block, or ``None`` (no block, or a disabled
    one)."""
    return _DEFERRED.get()


def defer_constant_logdet(parameter: Tensor, positions: int) -> bool:
    """Leave a data-independent log-determinant ``positions * parameter.sum()`` to the enclosing
    :func:`deferring_constant_logdets` block; ``False`` (the layer returns its own) outside one, while recording the
    per-position maps, or under ``torch.compile`` tracing (a compiled step stays one graph with its own sums)."""
    if torch.compiler.is_compiling():
        return False
    deferred = _DEFERRED.get()
    if deferred is None or _LOGDET_MAPS.get() is not None:
        return False
    deferred.append((parameter, positions))
    return True


def sum_deferred_logdets(deferred: list[tuple[Tensor, int]]) -> Tensor | None:
    """``sum_k positions_k * sum(parameter_k)`` of a :func:`deferring_constant_logdets` list as a 0-d tensor in the
    parameters' dtype (one concatenation, sum and product per number of positions, i.e. per level; the same value
    as the layers' own sums up to summation order), or ``None`` for an empty list."""
    groups: dict[int, list[Tensor]] = {}
    for parameter, positions in deferred:
        groups.setdefault(positions, []).append(parameter.reshape(-1))
    total = None
    for positions, parameters in groups.items():
        part = torch.cat(parameters).sum() * positions
        total = part if total is None else total + part
    return total


class FlowLayer(nn.Module):
    """Abstract invertible layer with an optional condition (see the module docstring for the contract)."""

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Map ``x`` to ``y``; returns ``(y, log|det dy/dx|)`` with the log-det of shape ``[B]``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Map ``y`` back to ``x``; returns ``(x, log|det dx/dy|)`` with the log-det of shape ``[B]``."""
        raise NotImplementedError

    def initialize(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Initialise data-dependent parameters from ``x`` (none here), then run :meth:`forward`."""
        return self.forward(x, condition)


class FlowSequential(FlowLayer):
    """A chain of flow layers that threads the condition through every layer and sums the log-determinants.

    .. math::
        f = f_K \\circ \\dots \\circ f_1, \\qquad \\log|\\det J_f(x)| = \\sum_k \\log|\\det J_{f_k}(x_{k-1})|.

    Args:
        layers: the flow layers, applied in the given order by :meth:`forward` and in reverse by :meth:`inverse`.

    Example::

        flow = FlowSequential(ActNorm(2, 4), InvertibleConv1x1(2, 4))
        y, logdet = flow(x)          # x: [B, 4, H, W]; logdet: [B]
        x_rec, _ = flow.inverse(y)
    """

    def __init__(self, *layers: FlowLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> FlowLayer:
        return self.layers[index]

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply every layer in order.

        Args:
            x: input ``[B, C, *spatial]``.
            condition: optional condition ``[B, condition_dim]`` passed to every layer.

        Returns:
            ``(y, logdet)``: the output and the summed log-determinants ``[B]``.
        """
        logdet = None  # the first layer's log-det starts the sum (no zeros tensor and one addition fewer per chain)
        for layer in self.layers:
            x, ld = layer(x, condition)
            if ld is not None:  # None: left to an enclosing deferring_constant_logdets block
                logdet = ld if logdet is None else logdet + ld
        return x, x.new_zeros(x.shape[0]) if logdet is None else logdet

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply every layer's inverse in reverse order; returns ``(x, log|det dx/dy|)``."""
        logdet = None
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y, condition)
            logdet = ld if logdet is None else logdet + ld
        return y, y.new_zeros(y.shape[0]) if logdet is None else logdet

    def initialize(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Initialise every layer in order on the activations it actually receives, returning the forward output."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer.initialize(x, condition) if isinstance(layer, FlowLayer) else layer(x, condition)
            logdet = logdet + ld
        return x, logdet
