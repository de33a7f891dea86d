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
"""A learnable monotone rational-quadratic spline per channel and pixel (an element-wise flow layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_condflow.networks.blocks.coupling import GuidedCondition, guided_parameters
from monai_condflow.networks.blocks.flow_sequential import FlowLayer, record_logdet_map

__all__ = ["PixelSpline"]


class PixelSpline(FlowLayer):
    """Element-wise monotone rational-quadratic spline (Durkan et al., 2019) with its own knots at every position.

    An affine coupling gives each pixel a Gaussian conditional, so a pixel whose value is either "dark lung" or
    "bright vessel" is drawn as grey haze. This layer, placed next to the data (after :class:`PixelNorm`), lets each
    position learn a non-Gaussian, e.g. bimodal, marginal: on ``[-tail_bound, tail_bound]`` the map is a spline of
    ``num_bins`` rational-quadratic pieces through learned knots, outside it the identity (derivative 1 at both
    ends, so the map is continuous and differentiable everywhere). A fresh layer is the identity.

    The Jacobian is diagonal: ``log|det dy/dx| = sum log y'(x_i)`` over channels and pixels; the inverse solves one
    quadratic per element (exact up to rounding).

    Args:
        spatial_dims: 2 or 3.
        num_channels: channels ``C``.
        spatial_size: the fixed input size.
        num_bins: spline pieces per element (``>= 2``).
        tail_bound: half-width of the spline's interval (identity outside).
        min_bin: smallest bin width / height as a fraction of the interval; ``min_derivative`` the smallest slope.
        condition_dim: ``> 0`` makes the spline conditional: a linear map of ``z`` (zero-initialised) adds to every
            knot parameter, on a grid ``condition_factor`` times coarser than the image, bilinearly upsampled, so
            the marginal of each pixel can differ between classes; guided like the other conditional layers (the
            raw parameters are mixed, so every guided spline is still monotone). 0: unconditional.
        condition_factor: downsampling of the conditional parameter grid.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int,
        spatial_size: tuple[int, ...],
        num_bins: int = 8,
        tail_bound: float = 4.0,
        min_bin: float = 1e-3,
        min_derivative: float = 1e-3,
        condition_dim: int = 0,
        condition_factor: int = 4,
    ) -> None:
        super().__init__()
        if len(spatial_size) != spatial_dims:
            raise ValueError(f"spatial_size {spatial_size} does not have {spatial_dims} dimensions.")
        if num_bins < 2 or not tail_bound > 0 or not 0 < min_bin * num_bins < 1 or not min_derivative > 0:
            raise ValueError(
                f"PixelSpline needs num_bins >= 2, tail_bound > 0, 0 < min_bin * num_bins < 1 and min_derivative > 0, "
                f"got {num_bins}, {tail_bound}, {min_bin}, {min_derivative}."
            )
        self.spatial_dims, self.num_bins, self.tail_bound = spatial_dims, num_bins, float(tail_bound)
        self.min_bin, self.min_derivative = min_bin, min_derivative
        shape = (num_channels, *spatial_size)
        self.widths = nn.Parameter(torch.zeros(*shape, num_bins))
        self.heights = nn.Parameter(torch.zeros(*shape, num_bins))
        # softplus(d) + min_derivative = 1 at every interior knot: the identity
        self.derivatives = nn.Parameter(torch.full((*shape, num_bins - 1), _inv_softplus(1.0 - min_derivative)))
        self.condition_dim = int(condition_dim)
        self.cond_proj: nn.Linear | None = None
        if self.condition_dim > 0:
            if any(s % condition_factor for s in spatial_size):
                raise ValueError(f"PixelSpline: spatial_size {spatial_size} is not divisible by {condition_factor}.")
            self.coarse = tuple(s // condition_factor for s in spatial_size)
            numel = num_channels * (3 * num_bins - 1)
            for s in self.coarse:
                numel *= s
            self.cond_proj = nn.Linear(self.condition_dim, numel)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def extra_repr(self) -> str:
        return f"size={tuple(self.widths.shape[:-1])}, num_bins={self.num_bins}, tail_bound={self.tail_bound}"

    def _offsets(self, x: Tensor, condition: Tensor) -> Tensor:
        """Per-image additions to the raw knot parameters, ``[B, C, *spatial, 3 * num_bins - 1]``."""
        c, k = self.widths.shape[0], 3 * self.num_bins - 1
        grid = self.cond_proj(condition.to(x.dtype)).view(x.shape[0], c * k, *self.coarse)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        grid = F.interpolate(grid, size=tuple(self.widths.shape[1:-1]), mode=mode, align_corners=False)
        return grid.view(x.shape[0], c, k, *grid.shape[2:]).movedim(2, -1)

    def _knots(self, offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        k = self.num_bins
        widths, heights, derivatives = self.widths, self.heights, self.derivatives
        if offsets is not None:
            dw, dh, dd = offsets.split([k, k, k - 1], dim=-1)
            widths, heights, derivatives = widths + dw, heights + dh, derivatives + dd
        inner = F.softplus(derivatives) + self.min_derivative
        ones = torch.ones_like(inner[..., :1])
        return self._bin_edges(widths), self._bin_edges(heights), torch.cat([ones, inner, ones], dim=-1)

    def _bin_edges(self, raw: Tensor) -> Tensor:
        """Knot positions ``[..., num_bins + 1]`` from raw bin sizes ``[..., num_bins]``: softmax (each bin at least
        ``min_bin``), cumulative sum, scaled to ``[-tail_bound, tail_bound]``. Computed with the bins moved in front of
        the positions: PyTorch's CPU softmax over a short last dimension goes row by row (8 bins at 64 x 64: 3x
        slower forward and backward; ``benchmarks/bench_pixel_spline.py``, docs/performance.md)."""
        k, span = self.num_bins, 2 * self.tail_bound
        size = self.min_bin + (1 - self.min_bin * k) * torch.softmax(raw.movedim(-1, 0), dim=0)
        inner = torch.cumsum(size[:-1], dim=0) * span - self.tail_bound
        ends = torch.full_like(inner[:1], self.tail_bound)
        return torch.cat([-ends, inner, ends], dim=0).movedim(0, -1).contiguous()

    def _check(self, x: Tensor) -> None:
        if x.shape[1:] != self.widths.shape[:-1]:
            raise ValueError(
                f"PixelSpline expects inputs of shape [B, {', '.join(map(str, self.widths.shape[:-1]))}], "
                f"got {list(x.shape)}."
            )

    def _transform(self, v: Tensor, inverse: bool, condition: Tensor | GuidedCondition | None) -> tuple[Tensor, Tensor]:
        self._check(v)
        offsets = None
        if self.cond_proj is not None:
            rows = condition.condition if isinstance(condition, GuidedCondition) else condition
            if rows is None or rows.shape[0] != v.shape[0]:
                raise ValueError("a conditional PixelSpline needs one condition row per image.")
            offsets = guided_parameters(self._offsets, v, condition)
        knots = self._knots(offsets)
        xk, yk, dk = (t.to(v.dtype) if offsets is not None else t.unsqueeze(0).to(v.dtype) for t in knots)
        inside = (v > -self.tail_bound) & (v < self.tail_bound)
        vc = v.clamp(-self.tail_bound, self.tail_bound).unsqueeze(-1)
        edges = yk if inverse else xk
        idx = (vc >= edges[..., 1:-1]).sum(-1, keepdim=True)
        shape = (*v.shape, 1)

        def pick(t: Tensor, offset: int = 0) -> Tensor:
            return torch.gather(t.expand(*v.shape, t.shape[-1]), -1, (idx + offset).expand(shape)).squeeze(-1)

        x0, x1, y0, y1 = pick(xk), pick(xk, 1), pick(yk), pick(yk, 1)
        d0, d1 = pick(dk), pick(dk, 1)
        w, h = x1 - x0, y1 - y0
        s = h / w
        vv = vc.squeeze(-1)
        if inverse:
            dy = vv - y0
            a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
            b = h * d0 - dy * (d1 + d0 - 2 * s)
            c = -s * dy
            xi = (2 * c) / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0))).clamp(max=-1e-12)
            xi = xi.clamp(0, 1)
            out = x0 + xi * w
        else:
            xi = ((vv - x0) / w).clamp(0, 1)
            out = y0 + h * (s * xi * xi + d0 * xi * (1 - xi)) / (s + (d1 + d0 - 2 * s) * xi * (1 - xi))
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        deriv = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2) / (den * den)
        log_deriv = torch.where(inside, torch.log(deriv), torch.zeros_like(deriv))
        if not inverse:
            record_logdet_map(lambda: log_deriv.sum(1))
        out = torch.where(inside, out, v)
        logdet = log_deriv.flatten(1).sum(1)
        return out, (-logdet if inverse else logdet)

    def forward(self, x: Tensor, condition: Tensor | GuidedCondition | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(x, False, condition)

    def inverse(self, y: Tensor, condition: Tensor | GuidedCondition | None = None) -> tuple[Tensor, Tensor]:
        return self._transform(y, True, condition)


def _inv_softplus(value: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(value))))
