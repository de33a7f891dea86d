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
"""Prototype of the next generator design: a conditional Glow in the latent space of a small autoencoder.

Not part of the pipeline. It measures, on the embedded phantom at a CPU budget comparable with the main job's flow
stage, whether moving the conditional flow from pixels (1 x 64 x 64) to the 4 x 16 x 16 latent of a convolutional
autoencoder trained on the same images makes synthetic slices that keep their class and look like CT.

Per flow seed it prints: autoencoder reconstruction error and the judge's accuracy on reconstructions of the test
split, the flow's training time, the likelihood membership-inference AUC (training vs test latents), and per
(temperature, guidance weight): class agreement of an independent real-trained judge (per class), FID / floor on
the judge's l2-normalised embeddings (``fid_over_floor``, the features the evaluation's FID uses; ``_raw``: on the
unnormalised features, which the first prototype's table reports), the Laplacian sharpness ratio, the synthetic
images whose decoded pixels left ``[-0.25, 1.25]`` or were non-finite, and the distance-to-closest-record audit in
pixels (``dcr_closer_auc``: P(a synthetic slice is nearer its closest training slice than a held-out slice is);
``near_copy_fraction``). The last line is ``PROTO_LATENT {json}``;
sample grids (real training slices of the same conditions above their synthetic slices) go to
``OUTPUT_DIR/seed_<s>/``.

Two autoencoders:

- ``tiny`` (the first prototype): BatchNorm convolutions, MSE + L1, deterministic.
- ``sharp``: GroupNorm / SiLU residual convolutions, L1 plus an L1 on the image gradients, a decoder that takes one
  channel of fresh Gaussian noise at full resolution (so it can draw pixel-scale texture instead of averaging it),
  and latent noise in training (``--kl-weight 0``: ``+0.1 N(0, 1)``; ``> 0``: a VAE with that weight on the mean
  KL per latent entry), so that the decoder is not only defined on the training slices' own latents.

``--latent-probe`` asks whether the autoencoder's latent space can be sampled at all before any flow is fitted: it
decodes, per class, the midpoints of random pairs of training latents and draws of a 32-component PCA Gaussian fitted
to them (T = 0.7), and reports the judge's class agreement on those.

``--base-run RUN`` uses a finished main-job run (its splits and its 50-label conditioning classifier) instead of
training a conditioner on all labels; ``--judge FILE`` loads a judge (a ``PEPXNet`` ``small`` state dict) instead of
training one.

``--refine-flow RUN`` makes it a two-stage generator: every decoded slice goes through RUN's pixel ``ConditionalGlow``
(:class:`FineRefiner`), which keeps the slice's ``K`` coarsest latents and redraws the finer ones at temperature
``T`` with guidance weight ``w`` (``--refine-keep``, ``--refine-temperature``, ``--refine-guidance``: every
combination); every figure is then also reported for the refined slices (``refined_k<K>_T<T>[_w<w>]_*``) and the
grids show the real, the decoded and then the refined slices.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/proto_latent_flow.py --output-dir runs/proto_latent --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proto_latent_flow.py --output-dir runs/sharp --autoencoder sharp \
        --base-run runs/main --judge runs/ablate/judge.pt --flow-epochs 30 --latent-probe --tstr --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_condflow.data import datalists
from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.engines.ema import ModelEMA
from monai_condflow.evaluation.plots import image_grid
from monai_condflow.evaluation.tstr import predict
from monai_condflow.metrics.auc import mann_whitney_auc
from monai_condflow.metrics.fid import fid_from_features
from monai_condflow.metrics.sharpness import sharpness_ratio
from monai_condflow.networks.nets import ConditionalGlow, PEPXNet
from monai_condflow.networks.nets.conditional_glow import clamp_decoded
from monai_condflow.privacy.audits import dcr_audit
from monai_condflow.transforms import get_array_transforms, get_preprocess_transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_flow import _factory, judge_rows, tstr_accuracies  # noqa: E402


def load_phantom(data_dir: Path, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The main job's phantom (600 slices, seed 0) at 64 px, binary labels: ``{split: (images, labels)}``."""
    if not (data_dir / "dataset.json").is_file():
        generate_phantom_dataset(data_dir, num_images=600, seed=seed, overwrite=True, num_workers=2)
    pre, arr = get_preprocess_transforms(image_size=64), get_array_transforms()
    out = {}
    for split in ("train", "val", "test"):
        recs = datalists.load_covidx_split(data_dir, f"{split}.txt", None, "binary", "raise")
        recs = datalists.preprocess_cached(recs, pre, str(data_dir / "cache"), {"image_size": 64}, "raise")
        x = torch.stack([torch.as_tensor(np.asarray(arr(r)["image"])) for r in recs]).float()
        out[split] = (x, torch.tensor([int(r["label"]) for r in recs]))
    return out


def train_classifier(x, y, xv, yv, seed: int, epochs: int = 30) -> nn.Module:
    """PEPXNet ``small`` (3x3 stride-1 stem) with AdamW one-cycle, the epoch of best balanced val accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    w = len(y) / (2 * y.bincount(minlength=2).float())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * math.ceil(len(x) / 32))
    best = (-1.0, None)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            b = perm[i : i + 32]
            loss = F.cross_entropy(net(x[b]), y[b], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            p = net(xv).argmax(1)
        bacc = sum(float(((p == c) & (yv == c)).sum() / (yv == c).sum()) for c in range(2)) / 2
        if bacc >= best[0]:
            best = (bacc, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[1])
    return net.eval()


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyAutoencoder(nn.Module):
    """1 x 64 x 64 <-> ``latent_channels`` x 16 x 16 (deterministic; MSE + L1)."""

    def __init__(self, latent_channels: int = 4) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            _block(1, 16, 1), _block(16, 32, 2), _block(32, 64, 2), nn.Conv2d(64, latent_channels, 1)
        )
        self.dec = nn.Sequential(
            nn.Conv2d(latent_channels, 64, 3, 1, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def decode(self, latent: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.dec(latent)


def _gn_block(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_gn_block(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SharpAutoencoder(nn.Module):
    """1 x 64 x 64 <-> ``latent_channels`` x 16 x 16 with a noise-fed decoder.

    The decoder's last two convolutions see one channel of fresh ``N(0, 1)`` noise at full resolution besides the
    upsampled features. With ``vae=True`` the encoder also gives a log-variance (its second half of channels).
    """

    def __init__(self, latent_channels: int = 4, vae: bool = False) -> None:
        super().__init__()
        self.latent_channels, self.vae = latent_channels, vae
        self.enc = nn.Sequential(
            _gn_block(1, 16), _gn_block(16, 32, 2), _gn_block(32, 64, 2), _Residual(64),
            nn.Conv2d(64, 2 * latent_channels if vae else latent_channels, 1),
        )  # fmt: skip
        self.up = nn.Sequential(
            nn.Conv2d(latent_channels, 64, 3, 1, 1), _Residual(64), nn.Upsample(scale_factor=2), _gn_block(64, 32),
            nn.Upsample(scale_factor=2), _gn_block(32, 16),
        )  # fmt: skip
        self.out = nn.Sequential(_gn_block(17, 16), nn.Conv2d(16, 1, 3, 1, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent mean ``[B, C, H/4, W/4]``."""
        return self.enc(x)[:, : self.latent_channels]

    def encode_noisy(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training latent and its regulariser: a VAE draw and its mean KL per entry, or the mean plus
        ``0.1 N(0, 1)`` and the mean squared latent."""
        h = self.enc(x)
        if not self.vae:
            noise = torch.randn(h.shape, generator=generator, dtype=h.dtype)
            return h + 0.1 * noise, h.pow(2).mean()
        mean, log_var = h[:, : self.latent_channels], h[:, self.latent_channels :].clamp(-10.0, 5.0)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).mean()
        noise = torch.randn(mean.shape, generator=generator, dtype=h.dtype)
        return mean + (0.5 * log_var).exp() * noise, kl

    def decode(self, latent: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self.up(latent)
        noise = torch.randn((h.shape[0], 1, *h.shape[2:]), generator=generator, dtype=h.dtype)
        return self.out(torch.cat([h, noise], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the vertical and horizontal finite differences of ``a`` and ``b`` (``[B, C, H,
    W]``), summed over the two directions."""
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    return dy.abs().mean() + dx.abs().mean()


def train_sharp_autoencoder(x: torch.Tensor, args, g: torch.Generator) -> SharpAutoencoder:
    """``args.ae_steps`` Adam steps (lr 1e-3, batch 32, random left-right flips) of L1 + 0.5 gradient L1 + the
    latent regulariser (``args.kl_weight`` for a VAE, 1e-4 on the squared latent otherwise)."""
    ae = SharpAutoencoder(args.latent_channels, vae=args.kl_weight > 0)
    opt = torch.optim.Adam(ae.parameters(), 1e-3)
    step = 0
    while step < args.ae_steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 31, 32):
            b = x[perm[i : i + 32]]
            b = torch.where(torch.rand(len(b), 1, 1, 1, generator=g) < 0.5, b.flip(-1), b)
            latent, reg = ae.encode_noisy(b, g)
            r = ae.decode(latent, g)
            loss = F.l1_loss(r, b) + 0.5 * gradient_l1(r, b) + (args.kl_weight if ae.vae else 1e-4) * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"autoencoder step {step}: L1 {float(F.l1_loss(r, b)):.4f}", flush=True)
            if step == args.ae_steps:
                break
    return ae.eval()


def train_tiny_autoencoder(x: torch.Tensor, args, g: torch.Generator) -> TinyAutoencoder:
    """The first prototype's recipe: ``args.ae_epochs`` of AdamW one-cycle on MSE + 0.5 L1."""
    ae = TinyAutoencoder(args.latent_channels)
    opt = torch.optim.AdamW(ae.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.ae_epochs * (len(x) // 32))
    for _ in range(args.ae_epochs):
        ae.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 31, 32):
            b = x[perm[i : i + 32]]
            b = torch.where(torch.rand(len(b), 1, 1, 1, generator=g) < 0.5, b.flip(-1), b)
            r = ae(b)
            loss = F.mse_loss(r, b) + 0.5 * F.l1_loss(r, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return ae.eval()


def probe_latents(latents: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per class, as many probe latents as it has training latents: ``midpoint`` of two random training latents of
    the class, and ``pca32`` draws (T = 0.7) of a Gaussian on the class mean and its top 32 principal components."""
    flat = latents.flatten(1)
    out = {"midpoint": torch.empty_like(flat), "pca32": torch.empty_like(flat)}
    for c in labels.unique().tolist():
        member = labels == c
        cls = flat[member]
        n = len(cls)
        i, j = torch.randint(n, (n,), generator=g), torch.randint(n, (n,), generator=g)
        out["midpoint"][member] = 0.5 * (cls[i] + cls[j])
        mean = cls.mean(0)
        q = min(32, n - 1, cls.shape[1])
        _, s, v = torch.pca_lowrank(cls - mean, q=q, center=False)
        draws = torch.randn(n, q, generator=g) * s / max(n - 1, 1) ** 0.5
        out["pca32"][member] = mean + 0.7 * draws @ v.T
    return {k: v.view_as(latents) for k, v in out.items()}


class LatentGaussian:
    """A conditional linear-Gaussian model of flattened latents ``u [N, D]`` given conditions ``z [N, K]``: ``u = W^T
    [z, 1] + V diag(s) e + sigma n`` (ridge regression on ``z``, then probabilistic PCA of the residual: its top
    ``rank`` principal directions ``V [D, rank]`` with standard deviations ``s``, and ``sigma^2`` the mean variance of
    the ``D - rank`` directions they leave). It is a one-layer conditional affine flow, so its likelihood is exact.

    Sampling at temperature ``T`` draws only the principal part, ``W^T [z, 1] + T V diag(s) e``: the isotropic rest
    decodes to texture that breaks the anatomy (measured in docs/results.md).
    """

    def __init__(self, weight: torch.Tensor, basis: torch.Tensor, scales: torch.Tensor, sigma: torch.Tensor) -> None:
        self.weight, self.basis, self.scales, self.sigma = weight, basis, scales, sigma

    @staticmethod
    def _design(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)

    @classmethod
    def fit(cls, u: torch.Tensor, z: torch.Tensor, rank: int = 16, ridge: float = 1.0) -> LatentGaussian:
        """Fit to ``u [N, D]`` and ``z [N, K]`` (``rank < min(N, D)``)."""
        if not 0 < rank < min(u.shape):
            raise ValueError(f"rank must be in [1, {min(u.shape) - 1}], got {rank}.")
        design = cls._design(z)
        eye = torch.eye(design.shape[1], dtype=u.dtype)
        weight = torch.linalg.solve(design.T @ design + ridge * eye, design.T @ u)
        residual = u - design @ weight
        _, s, v = torch.linalg.svd(residual, full_matrices=False)
        basis, scales = v[:rank].T, s[:rank] / (len(u) - 1) ** 0.5
        rest = residual - (residual @ basis) @ basis.T
        sigma = (rest.pow(2).sum() / ((len(u) - 1) * (u.shape[1] - rank))).sqrt()  # mean discarded variance
        return cls(weight, basis, scales, sigma)

    def covariance(self) -> torch.Tensor:
        """``V diag(s^2) V^T + sigma^2 I`` ``[D, D]``."""
        return self.basis @ torch.diag(self.scales**2) @ self.basis.T + self.sigma**2 * torch.eye(
            len(self.basis), dtype=self.basis.dtype
        )

    def nll(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Exact negative log-likelihood per dimension ``[N]`` (Woodbury form of :meth:`covariance`)."""
        residual = u - self._design(z) @ self.weight
        d, var = u.shape[1], self.scales**2 + self.sigma**2
        proj = residual @ self.basis
        quad = (proj**2 / var).sum(1) + (residual.pow(2).sum(1) - proj.pow(2).sum(1)) / self.sigma**2
        log_det = torch.log(var).sum() + (d - len(var)) * torch.log(self.sigma**2)
        return 0.5 * (quad + log_det + d * math.log(2 * math.pi)) / d

    def sample(self, z: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, D]`` draws of the principal part at ``temperature``, one per condition of ``z``."""
        e = torch.randn(len(z), len(self.scales), generator=generator, dtype=z.dtype)
        return self._design(z) @ self.weight + temperature * (e * self.scales) @ self.basis.T


def fit_latent_gaussian(lt, zt, ls, zs, args) -> dict:
    """:class:`LatentGaussian` on the training latents: its sampler ``(temperature, w, generator) -> latents``, the
    likelihood membership-inference AUC (training vs test latents) and the fitting time."""
    t0 = time.time()
    prior = LatentGaussian.fit(lt.flatten(1), zt, rank=args.gaussian_rank, ridge=args.ridge)
    mia = mann_whitney_auc(-prior.nll(lt.flatten(1), zt), -prior.nll(ls.flatten(1), zs))

    def sample_latents(temp: float, w: float, gen: torch.Generator) -> torch.Tensor:
        return prior.sample(zt, temp, gen).view_as(lt)

    return {"sample": sample_latents, "mia_auc": mia, "flow_time_s": time.time() - t0, "curve": [], "epoch": None}


def fit_latent_glow(lt, zt, lv, zv, ls, zs, args, g: torch.Generator, seed: int) -> dict:
    """A conditional Glow (2 levels x 8 steps, EMA, condition dropout) on the standardised latents, with the same
    fields as :func:`fit_latent_gaussian` plus the validation curve and the selected epoch (``--select val``)."""
    mu, sd = lt.mean((0, 2, 3), keepdim=True), lt.std((0, 2, 3), keepdim=True)

    def to_flow(lat):  # standardised latents, scaled into about [0, 1] (the flow subtracts 0.5)
        return 0.5 + 0.15 * (lat - mu) / sd

    ut, uv, us = to_flow(lt), to_flow(lv), to_flow(ls)
    flow = ConditionalGlow(
        in_channels=args.latent_channels, condition_dim=32, num_levels=2, image_size=16, num_steps=(8, 8),
        num_blocks=(1, 1), hidden_channels=(96, 96), cond_dropout=0.1,
    )  # fmt: skip
    flow.initialize(ut[:128], zt[:128])
    ema = ModelEMA(flow, 0.995)
    opt = torch.optim.AdamW(flow.parameters(), 1e-3, weight_decay=1e-6)
    spe = len(ut) // 32
    total = args.flow_epochs * spe
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / (2 * spe)) * 0.5 * (1 + math.cos(math.pi * i / total))
    )
    t1 = time.time()
    curve, best = [], (math.inf, None, 0)
    for ep in range(args.flow_epochs):
        flow.train()
        perm = torch.randperm(len(ut), generator=g)
        for i in range(0, len(ut) - 31, 32):
            idx = perm[i : i + 32]
            u = ut[idx] + args.noise * 0.15 * torch.randn_like(ut[idx])
            loss = -flow.log_prob(u, flow.drop_condition(zt[idx])).mean() / u[0].numel()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
            opt.step()
            sched.step()
            ema.update()
        if args.select == "val" or (ep + 1) % 25 == 0 or ep + 1 == args.flow_epochs:
            with torch.no_grad():
                val = float(-ema.module.log_prob(uv, zv).mean() / uv[0].numel())
            curve.append([ep + 1, val])
            print(f"[seed {seed}] flow epoch {ep + 1}: val NLL/dim {val:.4f} ({time.time() - t1:.0f} s)", flush=True)
            if args.select == "val" and val < best[0]:
                best = (val, {k: v.clone() for k, v in ema.module.state_dict().items()}, ep + 1)
    flow_time = time.time() - t1
    m = ema.module.eval()
    if args.select == "val":
        m.load_state_dict(best[1])
    with torch.no_grad():
        mia = mann_whitney_auc(m.log_prob(ut, zt), m.log_prob(us, zs))

    def sample_latents(temp: float, w: float, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            nu = torch.randn(len(zt), m.latent_dim(), generator=gen) * temp
            return (m.inverse(nu, m.guided(zt, w))[0] - 0.5) / 0.15 * sd + mu

    epoch = best[2] or None
    return {"sample": sample_latents, "mia_auc": mia, "flow_time_s": flow_time, "curve": curve, "epoch": epoch}


class FineRefiner:
    """The second stage of a two-stage generator: a trained pixel ``ConditionalGlow`` (a main-job run's ``flow/``)
    encodes a coarse slice with the slice's ``z``, keeps its ``keep`` coarsest latents (the top one first), redraws
    the finer ones from ``N(0, T^2 I)`` and decodes. The coarse slice brings the anatomy; the flow's fine levels, which
    kept the class given a real top latent (docs/results.md, fifth session), bring the pixel-scale texture.

    Args:
        flow: the pixel flow (eval mode).
        keep: how many of the coarsest latents to keep (1: only the top; ``len(encode(x))`` gives back ``x``).
        temperature: of the redrawn finer latents.
        guidance: guidance weight ``w`` of the flow's conditional layers for both the encoding and the decoding
            (``ConditionalGlow.guided``; the flow needs condition dropout for ``w != 1``).
    """

    def __init__(self, flow: ConditionalGlow, keep: int = 1, temperature: float = 0.9, guidance: float = 1.0) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        self.flow, self.keep, self.temperature, self.guidance = flow, keep, temperature, guidance

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``x [B, 1, H, W]`` in ``[0, 1]``, ``z [B, K]`` -> (refined images in ``[0, 1]``, overflowed pixels ``[B]``
        counted before clamping)."""
        cond = self.flow.guided(z, self.guidance)
        latents = self.flow.encode(x, cond)
        if self.keep > len(latents):
            raise ValueError(f"keep {self.keep} > the flow's {len(latents)} latents.")
        cut = len(latents) - self.keep
        fresh = [self.temperature * torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in latents[:cut]]
        out, overflow, _ = clamp_decoded(self.flow.decode(fresh + latents[cut:], cond))
        return out, overflow


def run_seed(data, judge, conditioner, seed: int, args, out: Path, refiners: tuple | None = None) -> dict:
    """One autoencoder / latent-model training seed; ``refiners``: ``({name: FineRefiner}, z of the training slices)``,
    whose figures get the prefix ``<name>_``."""
    (xt, yt), (xv, _), (xs, ys) = data["train"], data["val"], data["test"]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    ae = (train_sharp_autoencoder if args.autoencoder == "sharp" else train_tiny_autoencoder)(xt, args, g)
    dec_g = torch.Generator().manual_seed(7 + seed)  # the sharp decoder's texture noise
    with torch.no_grad():
        rec = ae.decode(ae.encode(xs), dec_g)
        lt, lv, ls = ae.encode(xt), ae.encode(xv), ae.encode(xs)
        zt, zv, zs = conditioner.embed(xt), conditioner.embed(xv), conditioner.embed(xs)
        rec_acc = float((judge(rec.clamp(0, 1)).argmax(1) == ys).float().mean())
    probe_rows = {}
    if args.latent_probe:
        with torch.no_grad():
            for name, lat in probe_latents(lt, yt, torch.Generator().manual_seed(seed)).items():
                x = ae.decode(lat, dec_g).clamp(0, 1)
                probe_rows[name] = judge_rows(x, torch.zeros(len(x)), yt, predict(judge, x))
                print(f"[seed {seed}] latent probe {name}: {json.dumps(probe_rows[name])}", flush=True)
                idx = torch.cat([torch.nonzero(yt == c).reshape(-1)[:8] for c in (0, 1)])
                image_grid(out / f"probe_{name}.png", x[idx], nrow=8, scale=2)
    ae_time = time.time() - t0
    if args.prior == "gaussian":
        model = fit_latent_gaussian(lt, zt, ls, zs, args)
    else:
        model = fit_latent_glow(lt, zt, lv, zv, ls, zs, args, g, seed)

    extractors = {"fid_over_floor": judge.embed, "fid_over_floor_raw": judge.features}
    with torch.no_grad():  # the real features and floors, once for every synthetic set
        real = {key: (fn(xs), fid_from_features(fn(xv), fn(xs))) for key, fn in extractors.items()}
    holdout = torch.cat([xv, xs])

    def fid_ratios(x: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            return {key: fid_from_features(fn(x), real[key][0]) / real[key][1] for key, fn in extractors.items()}

    rows = []
    for temp in args.temperatures:
        for w in args.guidance if args.prior == "glow" else [1.0]:
            gg = torch.Generator().manual_seed(1000 + seed)
            with torch.no_grad():
                x, overflow, _ = clamp_decoded(ae.decode(model["sample"](temp, w, gg), dec_g))
            stages = [("", x, overflow)]
            for name, refiner in (refiners[0] if refiners else {}).items():
                fine, overflow_fine = refiner(x, refiners[1], gg)
                stages.append((f"{name}_", fine, overflow + overflow_fine))
            row = {"T": temp, "w": w}
            for prefix, xx, over in stages:
                figures = {**judge_rows(xx, over, yt, predict(judge, xx)), **fid_ratios(xx)}
                figures["sharpness_ratio"] = float(sharpness_ratio(xx, xt))
                dcr = dcr_audit(xx, xt, holdout)["pixel"]
                figures.update(dcr_closer_auc=dcr["closer_auc"], near_copy_fraction=dcr["near_copy_fraction"])
                if args.tstr and temp == args.tstr_temperature and w == 1.0:
                    figures["tstr_per_seed"] = tstr_accuracies((xx, yt), data["val"], data["test"], args.tstr_seeds)
                    figures["tstr"] = sum(figures["tstr_per_seed"]) / len(args.tstr_seeds)
                row.update({prefix + k: v for k, v in figures.items()})
            rows.append(row)
            print(f"[seed {seed}] {json.dumps(row)}", flush=True)
            idx = torch.cat([torch.nonzero(yt == 0).reshape(-1)[:8], torch.nonzero(yt == 1).reshape(-1)[:8]])
            image_grid(out / f"grid_T{temp}_w{w}.png", torch.cat([xt[idx]] + [st[1][idx] for st in stages]), nrow=8,
                       scale=2)  # fmt: skip
    return {"seed": seed, "ae_time_s": ae_time, "flow_time_s": model["flow_time_s"],
            "ae_recon_mse": float(F.mse_loss(rec, xs)), "judge_acc_on_reconstructions": rec_acc,
            "latent_probe": probe_rows, "selected_epoch": model["epoch"], "mia_auc": model["mia_auc"],
            "val_curve": model["curve"], "rows": rows}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/proto_latent"), help="grids and JSON go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="flow (and autoencoder) training seeds")
    p.add_argument("--autoencoder", choices=["tiny", "sharp"], default="tiny", help="autoencoder (module docstring)")
    p.add_argument("--ae-epochs", type=int, default=30, help="epochs of the tiny autoencoder")
    p.add_argument("--ae-steps", type=int, default=900, help="optimiser steps of the sharp autoencoder")
    p.add_argument("--kl-weight", type=float, default=0.0, help="sharp autoencoder: > 0 makes it a VAE")
    p.add_argument(
        "--select",
        choices=["last", "val"],
        default="last",
        help="flow weights sampled: the last EMA, or the EMA of best validation NLL (checked every epoch)",
    )
    p.add_argument(
        "--prior",
        choices=["glow", "gaussian"],
        default="glow",
        help="the conditional model of the latents: a Glow, or LatentGaussian (one affine layer)",
    )
    p.add_argument("--gaussian-rank", type=int, default=16, help="LatentGaussian: principal directions")
    p.add_argument("--ridge", type=float, default=1.0, help="LatentGaussian: ridge of the regression on z")
    p.add_argument("--latent-probe", action="store_true", help="judge decoded midpoints and PCA draws of latents")
    p.add_argument("--tstr", action="store_true", help="TSTR at --tstr-temperature, w 1")
    p.add_argument("--tstr-temperature", type=float, default=0.9, help="the temperature of the TSTR set")
    p.add_argument("--tstr-seeds", type=int, nargs="+", default=[0, 1, 2], help="TSTR classifier seeds")
    p.add_argument("--base-run", type=Path, default=None, help="a finished main-job run: its splits and conditioner")
    p.add_argument("--judge", type=Path, default=None, help="a judge state dict (PEPXNet small) instead of training")
    p.add_argument("--flow-epochs", type=int, default=150, help="latent flow epochs")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the 16 x 16 latent")
    p.add_argument("--noise", type=float, default=0.05, help="training noise, in standardised latent units")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.9, 1.0], help="sampling temperatures")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0], help="guidance weights")
    p.add_argument(
        "--refine-flow", type=Path, default=None,
        help="a finished main-job run: its pixel flow redraws the finer latents of every decoded slice (FineRefiner)",
    )  # fmt: skip
    p.add_argument(
        "--refine-keep", type=int, nargs="+", default=[1], help="FineRefiner: coarsest latents kept (1: the top one)"
    )
    p.add_argument(
        "--refine-temperature", type=float, nargs="+", default=[0.9], help="FineRefiner: of the redrawn latents"
    )
    p.add_argument("--refine-guidance", type=float, nargs="+", default=[1.0], help="FineRefiner: guidance weights")
    args = p.parse_args(argv)
    if args.base_run is not None:
        from sweep_sampling import load_splits

        from monai_condflow.engines.stages import load_classifier

        data = load_splits(args.base_run.resolve())
        conditioner = load_classifier(args.base_run).eval()
    else:
        data = load_phantom(args.output_dir / "data")
    (xt, yt), (xv, yv), (xs, ys) = data["train"], data["val"], data["test"]
    if args.base_run is None:
        conditioner = train_classifier(xt, yt, xv, yv, seed=0)
    if args.judge is not None:
        judge = _factory()
        judge.load_state_dict(torch.load(args.judge, weights_only=True))
        judge.eval()
    else:
        judge = train_classifier(xt, yt, xv, yv, seed=1)
    with torch.no_grad():
        judge_acc = float((judge(xs).argmax(1) == ys).float().mean())
        cond_acc = float((conditioner(xs).argmax(1) == ys).float().mean())
    print(f"conditioning classifier test accuracy {cond_acc:.3f}, judge test accuracy {judge_acc:.3f}", flush=True)
    refiner = None
    if args.refine_flow is not None:
        from monai_condflow.engines.stages import load_classifier, load_flow

        pixel_flow = load_flow(args.refine_flow).eval()
        with torch.no_grad():
            z_pixel = load_classifier(args.refine_flow).eval().embed(xt)
        refiner = (
            {
                f"refined_k{k}_T{t:g}" + (f"_w{w:g}" if w != 1 else ""): FineRefiner(pixel_flow, k, t, w)
                for k in args.refine_keep
                for t in args.refine_temperature
                for w in args.refine_guidance
            },
            z_pixel,
        )
    results = [run_seed(data, judge, conditioner, s, args, args.output_dir / f"seed_{s}", refiner) for s in args.seeds]
    summary = {"judge_test_acc": judge_acc, "conditioner_test_acc": cond_acc, "seeds": results}
    (args.output_dir / "proto_latent.json").write_text(json.dumps(summary, indent=2))
    print("PROTO_LATENT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
