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
"""Squeezes: trade spatial resolution for channels (space-to-depth, or the orthonormal Haar wavelet transform)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_condflow.networks.blocks.flow_sequential import FlowLayer

__all__ = ["HaarSqueeze", "Squeeze", "SQUEEZES", "build_squeeze", "contiguous_layout", "conv_weights_to"]


_LAYOUT = {"channels_last": True}


@contextmanager
def contiguous_layout() -> Iterator[None]:
    """Inside this context :class:`Squeeze` keeps the default contiguous layout instead of channels-last.

    ``torch.func.vmap`` (per-example gradients for DP-SGD) cannot copy a batched tensor to channels-last; the values
    computed are the same in both layouts.
    """
    previous = _LAYOUT["channels_last"]
    _LAYOUT["channels_last"] = False
    try:
        yield
    finally:
        _LAYOUT["channels_last"] = previous


def conv_weights_to(module: nn.Module, memory_format: torch.memory_format) -> int:
    """Put the weights of every 2-D convolution inside ``module`` in ``memory_format`` (values unchanged).

    ``ConditionalGlow`` keeps them channels-last, the layout :class:`Squeeze` gives the activations, so no convolution
    copies a weight (cuDNN) or its gradient (autograd) between layouts.

    Returns:
        the number of those weights with a kernel larger than 1x1 (for a 1x1 kernel both layouts are the same
        strides, so only these change).
    """
    larger = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=memory_format)
            larger += int(m.weight.shape[2:].numel() > 1)
    return larger


def _channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last layout when it is 4-D (a no-op when it already is); values and shape are unchanged.

    oneDNN's convolutions run 1.4-1.7x faster on channels-last activations at the flow's few-channel, large-image
    shapes (see ``docs/performance.md``), and every elementwise op, channel slice and ``torch.cat`` of the flow
    keeps the layout, so converting once per level keeps the whole level channels-last.
    """
    if x.ndim != 4 or not _LAYOUT["channels_last"]:
        return x
    return x.contiguous(memory_format=torch.channels_last)


class Squeeze(FlowLayer):
    """Space-to-depth by ``factor`` in every spatial dimension: ``[B, C, *S] -> [B, C * factor**d, *(S / factor)]``.

    A permutation of the entries, so ``log|det J| = 0``. In 2-D it is :func:`torch.nn.functional.pixel_unshuffle`
    (output channel ``c * factor**2 + i * factor + j`` holds pixel offset ``(i, j)`` of input channel ``c``); 3-D uses
    the same ordering. A 1-channel image becomes 4 channels (2-D) or 8 channels (3-D). The 2-D output is stored
    channels-last (same values and shape; the layout the following convolutions are fastest on).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        factor: the block size.

    Raises:
        ValueError: in :meth:`forward` when a spatial size is not divisible by ``factor``.
    """

    def __init__(self, spatial_dims: int, factor: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"Squeeze supports spatial_dims 2 or 3, got {spatial_dims}.")
        if factor < 2:
            raise ValueError(f"Squeeze factor must be >= 2, got {factor}.")
        self.spatial_dims = spatial_dims
        self.factor = factor

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, factor={self.factor}"

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[B, C, *spatial]`` with every spatial size divisible by ``factor``.
            condition: ignored.

        Returns:
            ``(y [B, C * factor**d, *(spatial / factor)], zeros [B])``.
        """
        spatial = x.shape[2:]
        if len(spatial) != self.spatial_dims or any(s % self.factor for s in spatial):
            raise ValueError(
                f"Squeeze needs a [B, C, *spatial] input with {self.spatial_dims} spatial sizes divisible by "
                f"{self.factor}, got shape {list(x.shape)}."
            )
        f = self.factor
        if self.spatial_dims == 2:
            y = _channels_last(F.pixel_unshuffle(x, f))
        else:
            b, c, d, h, w = x.shape
            y = x.reshape(b, c, d // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
            y = y.reshape(b, c * f**3, d // f, h // f, w // f)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Depth-to-space, the exact inverse of :meth:`forward`; returns ``(x, zeros [B])``."""
        f = self.factor
        if self.spatial_dims == 2:
            x = F.pixel_shuffle(y, f)
        else:
            b, c, d, h, w = y.shape
            x = y.reshape(b, c // f**3, f, f, f, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
            x = x.reshape(b, c // f**3, d * f, h * f, w * f)
        return x, y.new_zeros(y.shape[0])


def _haar_signs(spatial_dims: int) -> Tensor:
    """The ``2**d x 2**d`` Haar sign matrix over a block's offsets in :class:`Squeeze` order (entries +-1, symmetric,
    rows orthogonal): row 0 sums the block, the others take its differences along each axis and axis pair. Times
    ``2**(-d/2)`` it is orthonormal and its own inverse."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h = h2
    for _ in range(spatial_dims - 1):
        h = torch.kron(h, h2)
    return h


class HaarSqueeze(Squeeze):
    """Space-to-depth by 2 followed by the orthonormal Haar transform of every 2 x 2 (x 2) block.

    Each input channel ``c`` becomes the channels ``c * 2**d + k``: ``k = 0`` its block means (times ``2**(d/2)``),
    ``k > 0`` its detail coefficients (horizontal, vertical, diagonal differences in 2-D). The transform is
    orthonormal, so ``log|det J| = 0`` and :meth:`inverse` is exact (up to float rounding, unlike the pure
    permutation of :class:`Squeeze`). Compared with :class:`Squeeze`, whose channels are four interleaved copies
    of the image, the detail channels start near zero with a small spread, and ActNorm's data-dependent start
    scales them separately from the coarse channel (Wavelet Flow, Yu et al. 2020; SRFlow's Haar downsampling).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).

    Raises:
        ValueError: in :meth:`forward` when a spatial size is odd.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__(spatial_dims, factor=2)
        # +-1 entries are exact in every float type; the scale is applied in the activations' precision
        self.register_buffer("signs", _haar_signs(spatial_dims), persistent=False)
        self.scale = 2.0 ** (-spatial_dims / 2)

    def _mix(self, y: Tensor) -> Tensor:
        b, c = y.shape[:2]
        blocks = y.reshape(b, c // 2**self.spatial_dims, 2**self.spatial_dims, *y.shape[2:])
        mixed = torch.einsum("kj,bcj...->bck...", self.signs.to(y.dtype), blocks) * self.scale
        return _channels_last(mixed.reshape(y.shape))

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``[B, C, *spatial]`` with every spatial size even.
            condition: ignored.

        Returns:
            ``(y [B, C * 2**d, *(spatial / 2)], zeros [B])``.
        """
        y, logdet = super().forward(x, condition)
        return self._mix(y), logdet

    def inverse(self, y: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The Haar synthesis then depth-to-space, the inverse of :meth:`forward`; returns ``(x, zeros [B])``."""
        return super().inverse(self._mix(y), condition)


# the squeezes ConditionalGlow can be built with (its ``squeeze`` argument)
SQUEEZES: dict[str, type[Squeeze]] = {"pixel": Squeeze, "haar": HaarSqueeze}


def build_squeeze(name: str, spatial_dims: int) -> Squeeze:
    """The squeeze named ``name`` (a key of :data:`SQUEEZES`) for ``spatial_dims``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in SQUEEZES:
        raise ValueError(f"squeeze must be one of {sorted(SQUEEZES)}, got {name!r}.")
    return SQUEEZES[name](spatial_dims)
