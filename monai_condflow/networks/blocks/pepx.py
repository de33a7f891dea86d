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
"""PEPX module (projection - expansion - depth-wise - projection - extension) of COVID-Net / COVIDNet-CT."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, split_args
from monai.networks.layers.utils import get_act_layer, get_norm_layer

__all__ = ["PEPXBlock", "make_norm_layer"]

_DEFAULT_MAX_GROUPS = 8


def make_norm_layer(norm: str | tuple | None, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer from a MONAI norm spec, with ``None`` and a group-count rule added.

    ``None`` (or ``""``) gives :class:`torch.nn.Identity`. For ``"group"`` the ``num_groups`` argument
    (default 8) is read as a maximum: the layer uses the largest divisor of ``channels`` that does not
    exceed it, so one spec serves every width of a network (e.g. 8 groups for 56 channels, 7 for 42).
    Any other spec goes to :func:`monai.networks.layers.utils.get_norm_layer` unchanged.

    Args:
        norm: ``None``, a norm name (``"batch"``, ``"instance"``, ``"group"``, ...) or ``(name, kwargs)``.
        spatial_dims: number of spatial dimensions.
        channels: number of channels to normalise.

    Returns:
        The normalisation module.
    """
    if norm is None or norm == "":
        return nn.Identity()
    name, kwargs = split_args(norm)
    if str(name).lower() == "group":
        kwargs = dict(kwargs)
        limit = int(kwargs.pop("num_groups", _DEFAULT_MAX_GROUPS))
        if limit < 1:
            raise ValueError(f"num_groups must be >= 1, got {limit}.")
        groups = max(g for g in range(1, min(limit, channels) + 1) if channels % g == 0)
        return get_norm_layer(
            name=("group", {**kwargs, "num_groups": groups}), spatial_dims=spatial_dims, channels=channels
        )
    return get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=channels)


class PEPXBlock(nn.Module):
    """PEPX module: projection 1x1 -> expansion 1x1 -> depth-wise 3x3 -> projection 1x1 -> extension 1x1.

    The building block of COVID-Net and COVIDNet-CT (Wang et al.; Gunraj et al.). Each convolution is followed
    by a normalisation layer (``norm``, optional); the expansion, depth-wise and extension convolutions are also
    followed by the activation ``act``, while the two projections are linear bottlenecks (as in MobileNetV2), so
    no information is cut by a non-linearity at the narrowest width. Convolutions carry a bias only when
    ``norm`` is ``None``.

    Without BatchNorm (``norm=None`` or ``"group"``) the block has no cross-sample statistics, which per-sample
    gradient methods such as DP-SGD require.

    Args:
        spatial_dims: number of spatial dimensions of the input (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels (width of the extension convolution).
        projection_channels: width of both projections; defaults to ``max(in_channels // 2, 1)``.
        expansion_channels: width of the expansion and depth-wise convolutions; defaults to
            ``max(3 * in_channels // 4, 1)``.
        stride: stride of the depth-wise convolution (1 keeps the spatial size, 2 halves it).
        act: activation type and arguments. Defaults to ReLU.
        norm: feature normalisation type and arguments, or ``None``. ``"group"`` picks a group count per width,
            see :func:`make_norm_layer`. Defaults to batch norm.

    Shapes:
        input ``[B, in_channels, *S]``; output ``[B, out_channels, *S']`` with ``S' = ceil(S / stride)``.

    Raises:
        ValueError: when a width or the stride is not a positive integer.

    Example::

        block = PEPXBlock(spatial_dims=2, in_channels=16, out_channels=32, norm=("group", {"num_groups": 4}))
        y = block(torch.randn(2, 16, 8, 8))  # [2, 32, 8, 8]
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        projection_channels: int | None = None,
        expansion_channels: int | None = None,
        stride: int = 1,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple | None = "batch",
    ) -> None:
        super().__init__()
        if projection_channels is None:
            projection_channels = max(in_channels // 2, 1)
        if expansion_channels is None:
            expansion_channels = max(3 * in_channels // 4, 1)
        for key, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("projection_channels", projection_channels),
            ("expansion_channels", expansion_channels),
            ("stride", stride),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PEPXBlock: {key} must be a positive integer, got {value!r}.")
        conv_type: Callable = Conv[Conv.CONV, spatial_dims]
        bias = norm is None or norm == ""

        def unit(c_in: int, c_out: int, with_act: bool, **conv_kwargs) -> nn.Sequential:
            layers = [
                conv_type(c_in, c_out, bias=bias, **conv_kwargs),
                make_norm_layer(norm, spatial_dims, c_out),
            ]
            if with_act:
                layers.append(get_act_layer(name=act))
            return nn.Sequential(*layers)

        self.projection1 = unit(in_channels, projection_channels, False, kernel_size=1)
        self.expansion = unit(projection_channels, expansion_channels, True, kernel_size=1)
        self.depthwise = unit(
            expansion_channels,
            expansion_channels,
            True,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=expansion_channels,
        )
        self.projection2 = unit(expansion_channels, projection_channels, False, kernel_size=1)
        self.extension = unit(projection_channels, out_channels, True, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the five convolutions.

        Args:
            x: ``[B, in_channels, *S]``.

        Returns:
            ``[B, out_channels, *S']``.
        """
        x = self.projection1(x)
        x = self.expansion(x)
        x = self.depthwise(x)
        x = self.projection2(x)
        return self.extension(x)
