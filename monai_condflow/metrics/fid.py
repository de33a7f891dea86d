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
"""Frechet distance on the embeddings of an *evaluation classifier* (the paper's "FID on classifier embeddings").

Inception features are not trained on chest CT, so the paper measures FID on the features of a classifier trained on
real data only. That evaluation classifier must be separate from the conditioning classifier (whose embedding ``z``
is copied into every synthetic image and would make the score trivially small).

Two entry points:

- :func:`embedding_fid` / :func:`fid_floor`: standalone functions on two image sets; features are extracted in
  batches and the distance is computed by :func:`frechet_distance` (Ignite's ``fid_score``).
- :class:`EmbeddingFID`: an Ignite metric (usable as a MONAI evaluator key metric / handler). It keeps float64 running
  sums (count, sum, sum of outer products) of each feature set, all-reduced across ranks with ``sync_all_reduce``, so
  memory is ``O(D^2)`` whatever the number of images and the distributed result equals the single-process one. The
  distance itself is :func:`frechet_distance`. Lower is better: use
  ``metric_cmp_fn=lambda current, prev: current < prev`` when it is a key metric.

A full-rank covariance needs more samples than feature dimensions (``N > D``); fewer samples raise ``ValueError``.
The FID *floor* (two real sets, e.g. val vs test) is the sampling noise level; report ``fid / floor`` beside ``fid``.

The matrix square root is Ignite's :func:`ignite.metrics.gan.fid.fid_score` (``scipy.linalg.sqrtm`` without the
``disp`` argument that SciPy 1.18 removed and MONAI 1.6's ``FIDMetric`` still passes), so any SciPy >= 1.10 works;
the values equal those of ``FIDMetric`` to round-off (``tests/metrics/test_fid.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.utils import IgniteInfo, min_version, optional_import

fid_score, _ = optional_import("ignite.metrics.gan.fid", IgniteInfo.OPT_IMPORT_VERSION, min_version, "fid_score")
Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")
reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)
sync_all_reduce, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "sync_all_reduce", as_type="decorator"
)
NotComputableError, _ = optional_import(
    "ignite.exceptions", IgniteInfo.OPT_IMPORT_VERSION, min_version, "NotComputableError"
)

__all__ = [
    "EmbeddingFID",
    "check_fid_sample_size",
    "embedding_feature_fn",
    "embedding_fid",
    "extract_features",
    "fid_floor",
    "fid_from_features",
    "fid_to_floor_ratio",
    "frechet_distance",
]

logger = logging.getLogger(__name__)


def check_fid_sample_size(n: int, dim: int, name: str = "features") -> None:
    """Raise ``ValueError`` unless ``n > dim`` (a ``D x D`` covariance of ``N`` samples has rank at most ``N - 1``).

    Args:
        n: number of samples ``N``.
        dim: feature dimension ``D``.
        name: which set, for the message.
    """
    if n <= dim:
        raise ValueError(
            f"FID needs more samples than feature dimensions for a full-rank covariance: {name} has N={n} samples "
            f"of dimension D={dim} (need N > D, i.e. at least {dim + 1})."
        )


def embedding_feature_fn(network: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The feature function of an evaluation classifier: its ``embed`` method when it has one, else the callable.

    Args:
        network: a classifier with ``embed(x) -> [B, D]`` (e.g. ``PEPXNet``) or any callable ``[B, ...] -> [B, D]``.
    """
    embed = getattr(network, "embed", None)
    return embed if callable(embed) else network


def extract_features(
    feature_extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Run a frozen feature extractor over images in batches, without gradients and in eval mode.

    Args:
        feature_extractor: see :func:`embedding_feature_fn` (a module's ``embed`` is used when present).
        images: ``[N, C, *S]`` tensor (or a sequence of ``[C, *S]`` tensors).
        batch_size: images per forward pass.
        device: where to run; defaults to the extractor's parameter device (CPU when it has none).

    Returns:
        ``[N, D]`` float32 features on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not isinstance(images, torch.Tensor):
        images = torch.stack([torch.as_tensor(i) for i in images])
    module = feature_extractor if isinstance(feature_extractor, nn.Module) else None
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    fn = embedding_feature_fn(feature_extractor)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
                out = fn(batch)
                feats.append(out.reshape(out.shape[0], -1).float().cpu())
    finally:
        if module is not None:
            module.train(was_training)
    if not feats:
        raise ValueError("extract_features got an empty image set.")
    return torch.cat(feats)


def frechet_distance(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor) -> float:
    """Frechet distance between two Gaussians ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)`` (float64 arithmetic).

    ``|mu_a - mu_b|^2 + Tr(sigma_a) + Tr(sigma_b) - 2 Tr(sqrt(sigma_a sigma_b))``, computed by Ignite's
    :func:`~ignite.metrics.gan.fid.fid_score`; the 1-D case in closed form ``(m_a - m_b)^2 + (s_a - s_b)^2``.

    Args:
        mu_a: mean ``[D]``.
        sigma_a: covariance ``[D, D]``.
        mu_b: mean ``[D]``.
        sigma_b: covariance ``[D, D]``.

    Returns:
        The distance; tiny negative round-off is clipped to 0.
    """
    mu_a, mu_b = mu_a.detach().double().cpu(), mu_b.detach().double().cpu()
    sigma_a, sigma_b = sigma_a.detach().double().cpu(), sigma_b.detach().double().cpu()
    if mu_a.numel() == 1:
        value = float((mu_a - mu_b).square().sum() + (sigma_a.sqrt() - sigma_b.sqrt()).square().sum())
    else:
        value = float(fid_score(mu_a, mu_b, sigma_a, sigma_b))
    return max(value, 0.0)


def fid_from_features(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets: sample means and (unbiased) covariances into :func:`frechet_distance`.

    Args:
        features_a: ``[N_a, D]`` (e.g. synthetic).
        features_b: ``[N_b, D]`` (e.g. real).

    Returns:
        The Frechet distance (float64 arithmetic); tiny negative round-off is clipped to 0.

    Raises:
        ValueError: on non-2-D inputs, different ``D``, ``N <= D``, or non-finite features.
    """
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if f.ndim != 2:
            raise ValueError(f"{name} must be [N, D], got shape {tuple(f.shape)}.")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} holds {int((~torch.isfinite(f)).sum())} non-finite values.")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}.")
    check_fid_sample_size(features_a.shape[0], features_a.shape[1], "features_a")
    check_fid_sample_size(features_b.shape[0], features_b.shape[1], "features_b")
    fa, fb = features_a.double(), features_b.double()
    return frechet_distance(
        fa.mean(0), torch.atleast_2d(torch.cov(fa.T)), fb.mean(0), torch.atleast_2d(torch.cov(fb.T))
    )


def embedding_fid(
    feature_extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """FID between two image sets on the features of an evaluation classifier.

    Args:
        feature_extractor: evaluation classifier trained on real data only (its ``embed`` is used when present).
        images_a: ``[N_a, 1, S, S]`` (e.g. synthetic images).
        images_b: ``[N_b, 1, S, S]`` (e.g. real test images).
        batch_size: images per forward pass.
        device: see :func:`extract_features`.

    Returns:
        FID (lower is better).

    Raises:
        ValueError: when a set has no more samples than the feature dimension.

    Example::

        fid = embedding_fid(eval_classifier, synthetic_images, real_test_images, batch_size=128)
    """
    fa = extract_features(feature_extractor, images_a, batch_size, device)
    fb = extract_features(feature_extractor, images_b, batch_size, device)
    return fid_from_features(fa, fb)


def fid_floor(
    feature_extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """FID between two *real* sets (e.g. val vs test): the level a perfect generator could reach at this N.

    Args: see :func:`embedding_fid`.
    """
    return embedding_fid(feature_extractor, real_a, real_b, batch_size, device)


def fid_to_floor_ratio(fid: float, floor: float) -> float:
    """``fid / floor`` (``inf`` when the floor is 0 and fid is not, 1 when both are 0)."""
    if floor > 0:
        return float(fid) / float(floor)
    return 1.0 if fid == 0 else math.inf


class EmbeddingFID(Metric):
    """Embedding FID as an Ignite metric (attach to an engine, or pass as a MONAI evaluator's key metric).

    ``update`` takes ``(y_pred, y)`` = ``(synthetic, real)``: either images ``[B, C, *S]`` (a ``feature_extractor``
    is then required) or features ``[B, D]``. Lists of per-sample tensors (MONAI ``decollate=True`` output) are
    stacked. Running float64 sums are kept per set and all-reduced across ranks before :meth:`compute`.

    Args:
        feature_extractor: frozen evaluation classifier (its ``embed`` is used when present), or ``None`` when
            ``update`` receives features.
        output_transform: maps ``engine.state.output`` to ``(synthetic, real)``, e.g.
            ``from_engine(["pred", "image"], first=False)``.
        device: device of the running sums (and of the feature extraction).
        batch_size: images per forward pass of the extractor inside ``update``.

    Example::

        fid = EmbeddingFID(eval_classifier, output_transform=lambda out: (out["fake"], out["real"]))
        fid.attach(evaluator, "fid")
    """

    _state_dict_all_req_keys = ("_n_a", "_sum_a", "_outer_a", "_n_b", "_sum_b", "_outer_b")

    def __init__(
        self,
        feature_extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.batch_size = batch_size
        self._dim: int | None = None
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._dim = None
        self._n_a = torch.zeros((), dtype=torch.float64, device=self._device)
        self._n_b = torch.zeros((), dtype=torch.float64, device=self._device)
        self._sum_a = torch.zeros(0, dtype=torch.float64, device=self._device)
        self._sum_b = torch.zeros(0, dtype=torch.float64, device=self._device)
        self._outer_a = torch.zeros(0, 0, dtype=torch.float64, device=self._device)
        self._outer_b = torch.zeros(0, 0, dtype=torch.float64, device=self._device)

    def _features(self, values: Any) -> torch.Tensor:
        if isinstance(values, (list, tuple)):
            values = torch.stack([torch.as_tensor(v) for v in values])
        values = torch.as_tensor(values).detach()
        if values.ndim > 2:
            if self.feature_extractor is None:
                raise ValueError(
                    f"EmbeddingFID got images of shape {tuple(values.shape)} but no feature_extractor; pass one or "
                    "update with [B, D] features."
                )
            values = extract_features(self.feature_extractor, values, self.batch_size, self._device)
        if values.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {tuple(values.shape)}.")
        if not torch.isfinite(values).all():
            raise ValueError(f"EmbeddingFID got {int((~torch.isfinite(values)).sum())} non-finite feature values.")
        return values.to(device=self._device, dtype=torch.float64)

    def _init_dim(self, dim: int) -> None:
        if self._dim is None:
            self._dim = dim
            if self._sum_a.numel() == 0:
                for name in ("_sum_a", "_sum_b"):
                    setattr(self, name, torch.zeros(dim, dtype=torch.float64, device=self._device))
                for name in ("_outer_a", "_outer_b"):
                    setattr(self, name, torch.zeros(dim, dim, dtype=torch.float64, device=self._device))
        elif dim != self._dim:
            raise ValueError(f"feature dimension changed between updates: {self._dim} then {dim}.")

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        fa, fb = self._features(output[0]), self._features(output[1])
        if fa.shape[1] != fb.shape[1]:
            raise ValueError(f"feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}.")
        self._init_dim(fa.shape[1])
        self._n_a += fa.shape[0]
        self._sum_a += fa.sum(0)
        self._outer_a += fa.T @ fa
        self._n_b += fb.shape[0]
        self._sum_b += fb.sum(0)
        self._outer_b += fb.T @ fb

    @staticmethod
    def _moments(n: torch.Tensor, s: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = s / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma

    @sync_all_reduce("_n_a", "_sum_a", "_outer_a", "_n_b", "_sum_b", "_outer_b")
    def compute(self) -> float:
        if self._sum_a.numel() == 0 or int(self._n_a) == 0 or int(self._n_b) == 0:
            raise NotComputableError(
                "EmbeddingFID must have at least one example of each set before it can be computed."
            )
        dim = self._sum_a.numel()
        check_fid_sample_size(int(self._n_a), dim, "synthetic set")
        check_fid_sample_size(int(self._n_b), dim, "real set")
        mu_a, sigma_a = self._moments(self._n_a, self._sum_a, self._outer_a)
        mu_b, sigma_b = self._moments(self._n_b, self._sum_b, self._outer_b)
        return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
