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
"""Novelty (out-of-distribution) scores of images under a trained conditional flow.

A flow's raw likelihood is a poor novelty score: it is dominated by local pixel statistics, so simpler images (less
texture, more flat background) get *higher* likelihood even when they come from another domain (Nalisnick et al.
2019; Kirichenko et al. 2020). The statistics here correct for that:

- ``"bpd"``: bits/dim ``-log2 p(x | z) / D`` (the raw statistic, for comparison);
- ``"typicality"``: ``|bpd - mean_ref|``, distance to the typical set of the reference (in-distribution) images
  (a one-sample version of Nalisnick et al.'s typicality test);
- ``"complexity"``: ``bpd - png_bpd``, a likelihood ratio against a generic lossless compressor (PNG) as the
  background model (the input-complexity correction of Serra et al. 2020);
- ``"level_typicality"``: the per-level bits/dim of the multiscale flow (:meth:`ConditionalGlow.level_log_probs`)
  standardised by the reference's mean and spread of each level, then the root mean square over levels, so a level
  that is unusually likely counts as much as one that is unusually unlikely;
- ``"likelihood_ratio"``: ``bpd - background_bpd``, a likelihood ratio against a *lower-capacity flow trained on the
  same images* (Schirrmeister et al. 2020): both flows explain the local pixel statistics that dominate raw
  likelihoods, and the ratio keeps what only the larger model learned. Needs the background flow's statistics
  (``flow_statistics(..., background=...)``). Measured on the phantom's new-disease test in ``docs/results.md``.

Larger score = more unusual. :class:`NoveltyScorer` holds the reference statistics. :func:`novelty_map` says *where*
an image is unusual: the same quantities per pixel (:meth:`ConditionalGlow.log_prob_map`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "NOVELTY_STATISTICS",
    "png_bits_per_dim",
    "flow_statistics",
    "novelty_map",
    "max_softmax_score",
    "NoveltyScorer",
]

NOVELTY_STATISTICS: tuple[str, ...] = ("bpd", "typicality", "complexity", "level_typicality", "likelihood_ratio")


def png_bits_per_dim(x: Tensor, n_bits: int = 8) -> Tensor:
    """Length of the ``n_bits``-bit PNG (maximum compression) of each image, in bits per pixel value.

    Args:
        x: ``[B, C, H, W]`` in ``[0, 1]``; each channel is compressed as its own gray image.
        n_bits: 8 or 16.

    Returns:
        ``[B]`` float64.
    """
    if n_bits not in (8, 16):
        raise ValueError(f"png_bits_per_dim supports n_bits 8 or 16, got {n_bits}.")
    arr = x.detach().cpu().double().clamp(0, 1).numpy()
    dtype = np.uint8 if n_bits == 8 else np.uint16
    out = []
    for img in arr:
        total = 0
        for ch in img:
            buf = io.BytesIO()
            Image.fromarray(np.rint(ch * (2**n_bits - 1)).astype(dtype)).save(buf, format="PNG", optimize=True)
            total += len(buf.getvalue()) * 8
        out.append(total / img.size)
    return torch.tensor(out, dtype=torch.float64)


def max_softmax_score(logits: Tensor) -> Tensor:
    """The classifier baseline of novelty scoring: ``1 - max softmax`` of ``logits`` ``[B, K]`` -> ``[B]`` float64 on
    the CPU (larger = less sure = more unusual)."""
    return 1.0 - logits.softmax(1).max(1).values.double().cpu()


def _in_eval(net: torch.nn.Module, method: str, x: Tensor, condition: Tensor | None) -> Tensor:
    """``net.<method>(x, condition)`` in eval mode (the mode is restored), as float64 on the CPU."""
    was_training = net.training
    net.eval()
    try:
        return getattr(net, method)(x, condition).double().cpu()
    finally:
        net.train(was_training)


def _level_bpd(flow: torch.nn.Module, x: Tensor, condition: Tensor | None) -> Tensor:
    return -_in_eval(flow, "level_log_probs", x, condition) / (x[0].numel() * math.log(2.0))


@torch.no_grad()
def flow_statistics(
    flow: torch.nn.Module,
    x: Tensor,
    condition: Tensor | None,
    n_bits: int = 8,
    background: torch.nn.Module | None = None,
) -> dict[str, Tensor]:
    """Per-image statistics of ``x`` under ``flow`` (a ``ConditionalGlow``), in eval mode.

    Args:
        flow: module with ``level_log_probs(x, z) -> [B, L + 1]`` (nats).
        x: ``[B, C, H, W]`` in ``[0, 1]``.
        condition: ``[B, condition_dim]`` (e.g. the classifier's embedding of ``x``).
        n_bits: bit depth of the data (the ``+ n_bits`` of dequantised bits/dim, and the PNG depth).
        background: a lower-capacity flow trained on the same data (same condition), for ``"likelihood_ratio"``.

    Returns:
        ``{"bpd": [B], "level_bpd": [B, L + 1], "png_bpd": [B]}`` (float64, CPU), plus ``"background_bpd": [B]``
        with a ``background``; ``level_bpd`` is ``-level_log_probs / (D ln 2)`` and sums to ``bpd - n_bits``.
    """
    level_bpd = _level_bpd(flow, x, condition)
    out = {"bpd": level_bpd.sum(1) + n_bits, "level_bpd": level_bpd, "png_bpd": png_bits_per_dim(x, n_bits)}
    if background is not None:
        out["background_bpd"] = _level_bpd(background, x, condition).sum(1) + n_bits
    return out


@torch.no_grad()
def novelty_map(
    flow: torch.nn.Module,
    x: Tensor,
    condition: Tensor | None,
    background: torch.nn.Module | None = None,
    reference_mean: Tensor | None = None,
) -> Tensor:
    """Per-pixel novelty ``[B, *spatial]`` in bits: ``-log2 p(x | z)`` of ``flow`` split over the pixels
    (:meth:`ConditionalGlow.log_prob_map`), minus the ``background`` flow's when given (the per-pixel share of the
    ``"likelihood_ratio"`` statistic: each map sums to ``D * (bpd - background_bpd)``), minus ``reference_mean``
    (e.g. the mean map of in-distribution images) when given. Both flows run in eval mode.

    Args:
        flow: module with ``log_prob_map(x, z) -> [B, *spatial]`` (nats).
        x: ``[B, C, *spatial]`` in ``[0, 1]``.
        condition: ``[B, condition_dim]`` (``None`` for an unconditional flow).
        background: a lower-capacity flow trained on the same data (same condition), or ``None``.
        reference_mean: ``[*spatial]`` map subtracted from every image's, or ``None``.

    Returns:
        ``[B, *spatial]`` float64 on the CPU; larger = more unusual there.
    """
    out = -_in_eval(flow, "log_prob_map", x, condition) / math.log(2.0)
    if background is not None:
        out = out + _in_eval(background, "log_prob_map", x, condition) / math.log(2.0)
    if reference_mean is not None:
        out = out - reference_mean.double().cpu()
    return out


class NoveltyScorer:
    """Turn :func:`flow_statistics` into novelty scores (larger = more unusual), relative to reference images.

    Args:
        statistic: one of :data:`NOVELTY_STATISTICS`.
        reference: :func:`flow_statistics` of in-distribution images (e.g. the flow's validation set); needed by
            ``"typicality"`` and ``"level_typicality"``.

    Example::

        scorer = NoveltyScorer("level_typicality", flow_statistics(flow, x_val, z_val))
        scores = scorer(flow_statistics(flow, x_new, z_new))   # [B]
    """

    def __init__(self, statistic: str = "level_typicality", reference: Mapping[str, Tensor] | None = None) -> None:
        if statistic not in NOVELTY_STATISTICS:
            raise ValueError(f"unknown novelty statistic {statistic!r}; available: {list(NOVELTY_STATISTICS)}.")
        self.statistic = statistic
        self.bpd_mean = self.level_mean = self.level_std = None
        if reference is not None:
            self.fit(reference)

    def fit(self, reference: Mapping[str, Tensor]) -> NoveltyScorer:
        """Store the reference mean bits/dim and the per-level mean and standard deviation (at least 2 images)."""
        level = reference["level_bpd"].double()
        if level.shape[0] < 2:
            raise ValueError("NoveltyScorer.fit needs the statistics of at least 2 reference images.")
        self.bpd_mean = reference["bpd"].double().mean()
        self.level_mean = level.mean(0)
        self.level_std = level.std(0).clamp_min(1e-12)
        return self

    def __call__(self, stats: Mapping[str, Tensor]) -> Tensor:
        """``[B]`` float64 scores of images with statistics ``stats``."""
        if self.statistic == "bpd":
            return stats["bpd"].double()
        if self.statistic == "complexity":
            return stats["bpd"].double() - stats["png_bpd"].double()
        if self.statistic == "likelihood_ratio":
            if "background_bpd" not in stats:
                raise ValueError(
                    "NoveltyScorer('likelihood_ratio') needs the statistics of a background flow: "
                    "flow_statistics(flow, x, z, background=background_flow) (bundle id 'background_flow_dir')."
                )
            return stats["bpd"].double() - stats["background_bpd"].double()
        if self.bpd_mean is None:
            raise RuntimeError(f"NoveltyScorer({self.statistic!r}) needs reference statistics: call fit() first.")
        if self.statistic == "typicality":
            return (stats["bpd"].double() - self.bpd_mean).abs()
        zscores = (stats["level_bpd"].double() - self.level_mean) / self.level_std
        return zscores.pow(2).mean(1).sqrt()
