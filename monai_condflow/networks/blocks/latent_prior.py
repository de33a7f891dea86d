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
"""A correlated Gaussian for *drawing* a flow's top latent, fitted after training to the encoded training set.

A flow trained for a few hundred steps maps real slices to top latents whose dimensions are strongly correlated
(the anatomy: where the mediastinum, heart and vessels are moves many latent entries together), while its prior draws
every entry independently; decoded, such independent draws blur the anatomy into haze. Fitting a Gaussian with the
encoded training set's covariance to the top latent after training and drawing from it at sampling time (ex-post
density estimation, as for deterministic autoencoders, Ghosh et al. 2020) keeps the correlations. It changes only
which latents :meth:`~monai_condflow.networks.nets.ConditionalGlow.sample` draws; the bijection and the model's
density (hence bits/dim and the membership-inference audit) are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from monai_condflow.networks.blocks.coupling import GuidedCondition

__all__ = ["FittedLatentPrior", "LatentMoments"]


class LatentMoments:
    """Streaming sums (float64) for :meth:`FittedLatentPrior.fit`: ``A^T A``, ``A^T T``, ``T^T T`` and the count, with
    ``A = [z, 1]`` the conditions and an intercept and ``T`` the top latents, so a training set of any size is fitted
    in ``O(D^2)`` memory.

    Args:
        latent_dim: ``D``, entries of the top latent.
        condition_dim: ``C`` (0: unconditional, intercept only).
    """

    def __init__(self, latent_dim: int, condition_dim: int) -> None:
        if latent_dim < 1 or condition_dim < 0:
            raise ValueError(
                f"LatentMoments needs latent_dim >= 1, condition_dim >= 0; got {latent_dim}, {condition_dim}."
            )
        self.latent_dim, self.condition_dim = int(latent_dim), int(condition_dim)
        k = self.condition_dim + 1
        self.ata = torch.zeros(k, k, dtype=torch.float64)
        self.att = torch.zeros(k, self.latent_dim, dtype=torch.float64)
        self.ttt = torch.zeros(self.latent_dim, self.latent_dim, dtype=torch.float64)
        self.count = 0

    def update(self, latents: Tensor, conditions: Tensor | None) -> None:
        """Add a batch: ``latents`` ``[B, D]``, ``conditions`` ``[B, C]`` (``None`` when ``C = 0``).

        Raises:
            ValueError: wrong shapes or non-finite values (a latent that overflowed would poison every moment).
        """
        t = latents.detach().to("cpu", torch.float64).reshape(latents.shape[0], -1)
        if t.shape[1] != self.latent_dim:
            raise ValueError(f"LatentMoments: expected latents [B, {self.latent_dim}], got {list(latents.shape)}.")
        a = self._design(conditions, t.shape[0])
        if not (torch.isfinite(t).all() and torch.isfinite(a).all()):
            raise ValueError("LatentMoments: non-finite latents or conditions in the batch; refusing to fit on them.")
        self.ata += a.T @ a
        self.att += a.T @ t
        self.ttt += t.T @ t
        self.count += t.shape[0]

    def _design(self, conditions: Tensor | None, batch: int) -> Tensor:
        ones = torch.ones(batch, 1, dtype=torch.float64)
        if self.condition_dim == 0:
            return ones
        if conditions is None or tuple(conditions.shape) != (batch, self.condition_dim):
            got = None if conditions is None else list(conditions.shape)
            raise ValueError(f"LatentMoments: expected conditions [{batch}, {self.condition_dim}], got {got}.")
        return torch.cat([conditions.detach().to("cpu", torch.float64), ones], dim=1)


class FittedLatentPrior(nn.Module):
    """``t = [z, 1] W + eps L^T``: a Gaussian over the top latent with a mean linear in the condition and a full
    covariance, fitted by :meth:`fit`; identity-free until then (:attr:`fitted` is ``False`` and its buffers are
    empty, so an unfitted prior adds nothing to a checkpoint).

    The covariance is the residual covariance ``S`` of the training latents around the linear mean, shrunk towards its
    diagonal: ``(1 - s) S + s diag(S)`` (``s = 1``: independent entries with the fitted variances; small ``s``: the
    training set's correlations, which with fewer slices than latent entries span only their directions).

    Args:
        latent_dim: ``D``, entries of the top latent.
        condition_dim: ``C``, entries of the condition ``z`` (0: unconditional).
    """

    def __init__(self, latent_dim: int, condition_dim: int) -> None:
        super().__init__()
        if latent_dim < 1 or condition_dim < 0:
            raise ValueError(
                f"FittedLatentPrior needs latent_dim >= 1, condition_dim >= 0; got {latent_dim}, {condition_dim}."
            )
        self.latent_dim, self.condition_dim = int(latent_dim), int(condition_dim)
        self.register_buffer("loc_weight", torch.zeros(0))  # [C + 1, D] once fitted
        self.register_buffer("scale_tril", torch.zeros(0))  # [D, D] lower triangular once fitted
        self.register_buffer("shrinkage", torch.tensor(-1.0))  # the fitted shrinkage (-1: not fitted)

    @property
    def fitted(self) -> bool:
        return self.scale_tril.numel() > 0

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the fit (e.g. when fine-tuning a pretrained flow on other data: its prior no longer applies)."""
        device = self.scale_tril.device
        self.loc_weight = torch.zeros(0, device=device)
        self.scale_tril = torch.zeros(0, device=device)
        self.shrinkage.fill_(-1.0)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint from before this prior existed loads as an unfitted prior
        state_dict.setdefault(prefix + "loc_weight", torch.zeros(0))
        state_dict.setdefault(prefix + "scale_tril", torch.zeros(0))
        state_dict.setdefault(prefix + "shrinkage", torch.tensor(-1.0))
        # the buffers are empty until fitted: take the checkpoint's shapes (fitted or not) before copying
        for name in ("loc_weight", "scale_tril"):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.shape != getattr(self, name).shape:
                expected = {
                    "loc_weight": (self.condition_dim + 1, self.latent_dim),
                    "scale_tril": (self.latent_dim, self.latent_dim),
                }
                if value.numel() and tuple(value.shape) != expected[name]:
                    raise ValueError(
                        f"FittedLatentPrior: checkpoint entry {prefix + name} has shape {list(value.shape)}, expected "
                        f"{list(expected[name])} (or empty) for latent_dim={self.latent_dim}, "
                        f"condition_dim={self.condition_dim}."
                    )
                setattr(self, name, torch.empty(value.shape, dtype=value.dtype, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, moments: LatentMoments, shrinkage: float = 0.1, ridge: float = 1e-3) -> dict[str, float]:
        """Fit the mean (ridge regression of the latents on ``[z, 1]``) and the shrunk residual covariance.

        Args:
            moments: the training latents' sums (:class:`LatentMoments`, same ``D`` and ``C``).
            shrinkage: ``s`` in ``(0, 1]`` (see the class docstring).
            ridge: ridge penalty of the regression on the condition (not applied to the intercept).

        Returns:
            ``{"count", "shrinkage", "explained_by_condition", "top_10_variance_fraction", "mean_variance"}``:
            the fraction of the latents' variance the linear mean explains and the share of the residual variance in
            its 10 leading directions (how correlated the latent is).

        Raises:
            ValueError: bad ``shrinkage`` / ``ridge``, mismatched or too few (< 2) latents.
        """
        if not 0.0 < float(shrinkage) <= 1.0:
            raise ValueError(f"FittedLatentPrior.fit: shrinkage must be in (0, 1], got {shrinkage}.")
        if not float(ridge) >= 0.0:
            raise ValueError(f"FittedLatentPrior.fit: ridge must be >= 0, got {ridge}.")
        if (moments.latent_dim, moments.condition_dim) != (self.latent_dim, self.condition_dim):
            raise ValueError(
                f"FittedLatentPrior.fit: moments of D={moments.latent_dim}, C={moments.condition_dim} for a prior of "
                f"D={self.latent_dim}, C={self.condition_dim}."
            )
        n = moments.count
        if n < 2:
            raise ValueError(f"FittedLatentPrior.fit needs at least 2 latents, got {n}.")
        penalty = torch.eye(self.condition_dim + 1, dtype=torch.float64) * float(ridge)
        penalty[-1, -1] = 0.0
        weight = torch.linalg.solve(moments.ata + penalty, moments.att)  # [C + 1, D]
        cross = moments.att.T @ weight
        resid = (moments.ttt - cross - cross.T + weight.T @ moments.ata @ weight) / n
        resid = 0.5 * (resid + resid.T)
        diag = torch.diagonal(resid).clamp_min(1e-12)
        cov = (1.0 - float(shrinkage)) * resid
        cov.diagonal().copy_(diag)
        scale, jitter = None, 1e-6 * float(diag.mean())
        for _ in range(6):  # rounding can leave a shrunk covariance of a few slices barely indefinite
            scale, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(self.latent_dim, dtype=cov.dtype))
            if int(info) == 0:
                break
            jitter *= 10.0
        else:
            raise ValueError(
                "FittedLatentPrior.fit: the shrunk covariance is not positive definite (non-finite latents?)."
            )
        mean = moments.att[-1] / n
        total = float(torch.diagonal(moments.ttt).sum() / n - mean.pow(2).sum())
        eig = torch.linalg.eigvalsh(resid)
        device = self.scale_tril.device
        self.loc_weight = weight.to(device, torch.float32)
        self.scale_tril = scale.to(device, torch.float32)
        self.shrinkage.fill_(float(shrinkage))
        return {
            "count": float(n),
            "shrinkage": float(shrinkage),
            "explained_by_condition": 1.0 - float(diag.sum()) / total if total > 0 else 0.0,
            "top_10_variance_fraction": float(eig[-10:].sum() / eig.clamp_min(0).sum()),
            "mean_variance": float(diag.mean()),
        }

    def _loc(self, condition: Tensor | GuidedCondition | None, batch: int, like: Tensor) -> Tensor:
        w = self.loc_weight.to(like.dtype)
        if self.condition_dim == 0:
            return w[-1].expand(batch, -1)
        if isinstance(condition, GuidedCondition):  # the mean is linear in z: guide it as the layers guide theirs
            z = condition.null + condition.weight * (condition.condition - condition.null)
        else:
            z = condition
        if z is None or tuple(z.shape) != (batch, self.condition_dim):
            got = None if z is None else list(z.shape)
            raise ValueError(f"FittedLatentPrior: expected a condition [{batch}, {self.condition_dim}], got {got}.")
        return z.to(like.dtype) @ w[:-1] + w[-1]

    def draw(self, eps: Tensor, condition: Tensor | GuidedCondition | None) -> Tensor:
        """Top latents ``[B, D]`` from standard-normal draws ``eps`` ``[B, D]`` (already scaled by the temperature).

        Raises:
            RuntimeError: the prior has not been fitted.
        """
        if not self.fitted:
            raise RuntimeError("FittedLatentPrior.draw: the prior has not been fitted (call fit first).")
        if eps.ndim != 2 or eps.shape[1] != self.latent_dim:
            raise ValueError(f"FittedLatentPrior.draw: expected eps [B, {self.latent_dim}], got {list(eps.shape)}.")
        return self._loc(condition, eps.shape[0], eps) + eps @ self.scale_tril.to(eps.dtype).T

    def whiten(self, latents: Tensor, condition: Tensor | GuidedCondition | None) -> Tensor:
        """Inverse of :meth:`draw`: ``eps = L^{-1} (t - mean(z))`` ``[B, D]``."""
        if not self.fitted:
            raise RuntimeError("FittedLatentPrior.whiten: the prior has not been fitted (call fit first).")
        centred = latents - self._loc(condition, latents.shape[0], latents)
        solved = torch.linalg.solve_triangular(self.scale_tril.to(latents.dtype), centred.T, upper=False)
        return solved.T
