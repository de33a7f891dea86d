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
"""PEPXNet: a COVIDNet-CT-style classifier ``C = h(g(x))`` whose l2-normalised features ``g(x)`` condition the flow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer

from monai_condflow.networks.blocks.pepx import PEPXBlock, make_norm_layer

__all__ = ["PEPXNet", "PEPXStage"]

_PRESETS: dict[str, dict[str, Any]] = {
    # COVIDNet-CT-like widths and depths (public description: 3, 4, 6, 3 PEPX modules, 56 -> 424 channels).
    "paper": {"channels": (56, 112, 216, 424), "blocks": (3, 4, 6, 3), "stem_channels": 56},
    # CPU-friendly. A 3x3 stride-1 stem keeps the full 64 px in the first stage: with COVIDNet's 7x7 stride-2 stem
    # the small network missed the faint peripheral ground-glass of the phantom (test accuracy 0.48 / 0.80 with all
    # labels over two seeds, vs 0.989 / 0.989 with this stem; docs/results.md, "Fidelity").
    "small": {
        "channels": (16, 32, 48, 64),
        "blocks": (1, 1, 2, 1),
        "stem_channels": 16,
        "stem_kernel_size": 3,
        "stem_stride": 1,
    },
}


class PEPXStage(nn.Module):
    """One stage of PEPX blocks with densely summed skips (COVID-Net style).

    The stage input is projected by a 1x1 convolution to ``out_channels``; every block then reads the sum of
    that projection and the outputs of all previous blocks of the stage, and the stage returns the sum of the
    projection and all block outputs. A running sum implements this with one addition per block.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the stage input.
        out_channels: width of the stage (every block maps ``out_channels -> out_channels``).
        num_blocks: number of PEPX blocks (>= 1).
        act: activation type and arguments.
        norm: normalisation type and arguments, or ``None``.

    Shapes:
        input ``[B, in_channels, *S]``; output ``[B, out_channels, *S]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = "batch",
    ) -> None:
        super().__init__()
        conv_type: Callable = Conv[Conv.CONV, spatial_dims]
        self.projection = nn.Sequential(
            conv_type(in_channels, out_channels, kernel_size=1, bias=norm is None or norm == ""),
            make_norm_layer(norm, spatial_dims, out_channels),
        )
        self.blocks = nn.ModuleList(
            [PEPXBlock(spatial_dims, out_channels, out_channels, act=act, norm=norm) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage.

        Args:
            x: ``[B, in_channels, *S]``.

        Returns:
            ``[B, out_channels, *S]``.
        """
        total = self.projection(x)
        for block in self.blocks:
            total = total + block(total)
        return total


class PEPXNet(nn.Module):
    """COVIDNet-CT-style PEPX classifier with an explicit embedding: ``logits = h(g(x))``, ``z = g(x) / |g(x)|``.

    Layout: a 7x7 stride-2 stem convolution (+ norm + act), four (``len(channels)``) stages of PEPX blocks with
    densely summed skips inside each stage (:class:`PEPXStage`), 2x2 max pooling between stages, global
    average pooling, optional dropout, the embedding ``g`` (a linear map to ``embedding_dim``) and the head ``h``
    (a linear map to ``out_channels``). :meth:`forward` returns the logits ``h(g(x))``; :meth:`embed` returns
    the l2-normalised embedding, the condition of the flow.

    With ``spatial_dims=2`` the input side must be at least ``2 ** len(channels)`` (16 for four stages);
    64x64 slices end at 4x4 before the global pooling.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of classes (logits).
        embedding_dim: dimension of ``g(x)`` (32 in the paper).
        channels: width of each stage.
        blocks: number of PEPX blocks of each stage (same length as ``channels``).
        stem_channels: output width of the stem; defaults to ``channels[0]``.
        act: activation type and arguments. Defaults to ReLU.
        norm: normalisation type and arguments, or ``None``. Use ``None`` or ``"group"`` (see
            :func:`~monai_condflow.networks.blocks.pepx.make_norm_layer`) for DP-SGD. Defaults to batch norm.
        dropout: dropout probability before the embedding layer.
        stem_kernel_size: kernel size of the stem convolution (COVIDNet: 7).
        stem_stride: stride of the stem convolution (COVIDNet: 2; the `small` preset uses 1 at 64 px).
        channels_last: with ``spatial_dims=2``, keep the convolution weights in channels-last layout, so that every
            convolution (and the activations between them) runs in oneDNN's NHWC kernels, whatever the input's
            layout. Same values; measured 1.07-1.4x faster training steps of the `small` preset on 2 CPU threads,
            whose depth-wise convolutions are slow in the contiguous layout, and gradients at float32 rounding where
            the contiguous layout's CPU backward is about 1 % off in the first layers
            (``benchmarks/bench_channels_last.py``). ``False`` keeps PyTorch's default layout.

    Shapes:
        input ``[B, in_channels, *S]``; :meth:`forward` -> ``[B, out_channels]``; :meth:`embed` and
        :meth:`features` -> ``[B, embedding_dim]``.

    Raises:
        ValueError: on an unsupported ``spatial_dims``, non-positive widths, mismatched ``channels`` / ``blocks``
            or a dropout outside ``[0, 1)``.

    Example::

        net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
        logits = net(torch.rand(4, 1, 64, 64))  # [4, 2]
        z = net.embed(torch.rand(4, 1, 64, 64))  # [4, 32], unit norm
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        embedding_dim: int = 32,
        channels: Sequence[int] = (56, 112, 216, 424),
        blocks: Sequence[int] = (3, 4, 6, 3),
        stem_channels: int | None = None,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = "batch",
        dropout: float = 0.0,
        stem_kernel_size: int = 7,
        stem_stride: int = 2,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"PEPXNet: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        channels, blocks = tuple(channels), tuple(blocks)
        if len(channels) == 0 or len(channels) != len(blocks):
            raise ValueError(
                f"PEPXNet: channels and blocks must be non-empty and of equal length, got {channels} and {blocks}."
            )
        stem_channels = channels[0] if stem_channels is None else stem_channels
        named = [("in_channels", in_channels), ("out_channels", out_channels), ("embedding_dim", embedding_dim)]
        named += [("stem_channels", stem_channels)] + [("channels", c) for c in channels]
        named += [("blocks", b) for b in blocks]
        named += [("stem_kernel_size", stem_kernel_size), ("stem_stride", stem_stride)]
        for key, value in named:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PEPXNet: {key} must hold positive integers, got {value!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PEPXNet: dropout must be in [0, 1), got {dropout!r}.")

        self.spatial_dims = spatial_dims
        self.embedding_dim = embedding_dim
        conv_type: Callable = Conv[Conv.CONV, spatial_dims]
        pool_type: Callable = Pool[Pool.MAX, spatial_dims]
        global_pool_type: Callable = Pool[Pool.ADAPTIVEAVG, spatial_dims]
        bias = norm is None or norm == ""

        self.stem = nn.Sequential(
            conv_type(
                in_channels,
                stem_channels,
                kernel_size=stem_kernel_size,
                stride=stem_stride,
                padding=stem_kernel_size // 2,
                bias=bias,
            ),  # fmt: skip
            make_norm_layer(norm, spatial_dims, stem_channels),
            get_act_layer(name=act),
        )
        stages: list[nn.Module] = []
        previous = stem_channels
        for index, (width, depth) in enumerate(zip(channels, blocks)):
            if index > 0:
                stages.append(pool_type(kernel_size=2, stride=2))
            stages.append(PEPXStage(spatial_dims, previous, width, depth, act=act, norm=norm))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(global_pool_type(1), nn.Flatten(1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding = nn.Linear(previous, embedding_dim)
        self.head = nn.Linear(embedding_dim, out_channels)
        if channels_last and spatial_dims == 2:
            self.to(memory_format=torch.channels_last)  # 4-D weights only; values unchanged

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        """Names accepted by :meth:`from_preset`."""
        return tuple(_PRESETS)

    @classmethod
    def from_preset(
        cls, name: str, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **overrides: Any
    ) -> PEPXNet:
        """Build a network from a named configuration.

        Args:
            name: ``"paper"`` (COVIDNet-CT-like: widths 56, 112, 216, 424; blocks 3, 4, 6, 3) or ``"small"``
                (CPU-friendly: widths 16, 32, 48, 64; blocks 1, 1, 2, 1).
            spatial_dims: number of spatial dimensions.
            in_channels: number of input channels.
            out_channels: number of classes.
            overrides: any other constructor argument (``embedding_dim``, ``norm``, ``channels``, ...).

        Returns:
            The network.

        Raises:
            ValueError: on an unknown preset name (the message lists the valid ones).
        """
        if name not in _PRESETS:
            raise ValueError(f"PEPXNet: unknown preset {name!r}; valid presets: {', '.join(sorted(_PRESETS))}.")
        kwargs = {**_PRESETS[name], **overrides}
        return cls(spatial_dims, in_channels, out_channels, **kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature extractor ``g``.

        Args:
            x: ``[B, in_channels, *S]``.

        Returns:
            ``g(x)``, ``[B, embedding_dim]`` (not normalised).
        """
        x = self.stages(self.stem(x))
        return self.embedding(self.dropout(self.pool(x)))

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flow's condition ``z = g(x) / ||g(x)||_2``.

        Args:
            x: ``[B, in_channels, *S]``.

        Returns:
            ``[B, embedding_dim]``, unit l2 norm per row.
        """
        return F.normalize(self.features(x), p=2.0, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``h(g(x))``.

        Args:
            x: ``[B, in_channels, *S]``.

        Returns:
            ``[B, out_channels]``.
        """
        return self.head(self.features(x))
