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
"""Prototype of a next generator design: a conditional TarFlow-style transformer autoregressive flow on pixels.

Not part of the pipeline. It measures, on a finished run's phantom split at a CPU budget comparable with the main
job's flow stage, whether a different flow family (Zhai et al. 2024, "Normalizing Flows are Capable Generative
Models") makes synthetic slices that keep their class and look like CT. The 1 x 64 x 64 slice (in ``[-1, 1]``) is cut
into ``patch x patch`` tokens; ``--blocks`` affine autoregressive blocks, each a causal transformer over the token
sequence (the order flipped from one block to the next), map it to ``N(0, I)``: for token ``t``,
``(mu_t, log_s_t) = f(x_<t, z)`` and ``y_t = (x_t - mu_t) exp(-log_s_t)``. The condition ``z`` (the run's conditioning
classifier's 32-d embedding of the slice) is projected and added at every position; it is replaced by a learned null
vector for 10 % of the training slices (classifier-free guidance: at sampling ``mu`` and ``log_s`` are
``uncond + w (cond - uncond)``, an exact, invertible flow for every ``w``). Training adds Gaussian noise
(``--noise``); a sample drawn at temperature ``T`` is denoised by one step ``x + sigma^2 grad_x log p(x | z)`` with the
flow's exact likelihood.

Per flow seed it reports the train / val bits per dimension per epoch, the training time, the likelihood
membership-inference AUC (train vs test slices) and per (temperature, guidance weight), on one synthetic slice per
training slice (its own ``z``): class agreement of the independent judge of ``benchmarks/ablate_flow.py`` (overall,
per class), FID / floor on the judge's features, images and pixels that left ``[-0.25, 1.25]`` or were non-finite
before clamping, the sharpness ratio and the pixel distance-to-closest-record audit. Results:
``OUT/proto_tarflow.json``, the grids ``OUT/seed_<s>/grid_T<T>_w<w>.png`` (8 real slices per class, then the synthetic
slices of the same ``z``) and a last line ``PROTO_TARFLOW {json}`` with the mean and standard deviation over seeds.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proto_tarflow.py runs/main --judge-dir runs/ablations \\
        --out runs/proto_tarflow --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_flow import judge_rows, splits_and_judge, summarize  # noqa: E402

LOG_SCALE_BOUND = 4.0  # log_s = B tanh(raw / B): a soft bound that keeps a short CPU run stable


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H / p) (W / p), C p p]`` tokens in raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, g = tokens.shape[0], size // patch
    x = tokens.reshape(b, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, size, size)


class CausalLayer(nn.Module):
    """Pre-norm transformer layer with causal self-attention; :meth:`step` runs one position with a KV cache."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(h)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.norm2(h))

    def step(self, h: torch.Tensor, cache: dict, t: int, length: int) -> torch.Tensor:
        """``h`` ``[B, 1, W]``: position ``t``; ``cache`` (filled in place) holds the keys / values of positions < t."""
        q, k, v = self._split(h)
        if not cache:
            cache["k"], cache["v"] = (
                k.new_empty(*k.shape[:2], length, k.shape[3]),
                v.new_empty(*v.shape[:2], length, v.shape[3]),
            )
        cache["k"][:, :, t : t + 1], cache["v"][:, :, t : t + 1] = k, v
        a = F.scaled_dot_product_attention(q, cache["k"][:, :, : t + 1], cache["v"][:, :, : t + 1])
        h = h + self.proj(a.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.norm2(h))


class ARBlock(nn.Module):
    """One affine autoregressive block: ``(mu_t, log_s_t) = f(x_<t, c)``, ``y_t = (x_t - mu_t) exp(-log_s_t)``.

    Position ``t`` of the causal transformer reads the embedding of token ``t - 1`` (a learned start vector at
    ``t = 0``), so its output depends on ``x_<t`` and the condition only. The output layer starts at zero (identity).
    """

    def __init__(self, tokens: int, dim: int, width: int, layers: int, heads: int, cond_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.start = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, width))
        self.cond = nn.Linear(cond_dim, width)
        self.layers = nn.ModuleList([CausalLayer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.out(self.norm(h)).chunk(2, -1)
        return mu, LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)

    def params(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu, log_s`` ``[B, N, D]`` for tokens ``x`` ``[B, N, D]`` and conditions ``c`` ``[B, cond_dim]``."""
        start = self.start.expand(x.shape[0], 1, -1)
        h = torch.cat([start, self.inp(x[:, :-1])], 1) + self.pos[:, : x.shape[1]] + self.cond(c)[:, None]
        for layer in self.layers:
            h = layer(h)
        return self._head(h)

    def forward(self, x: torch.Tensor, c: torch.Tensor, c_null: torch.Tensor | None, w: float):
        """``(y, log_det)``; with ``c_null``, the guided parameters ``uncond + w (cond - uncond)``."""
        if c_null is None:
            mu, ls = self.params(x, c)
        else:
            mu, ls = self.params(torch.cat([x, x]), torch.cat([c, c_null]))
            (mu_c, mu_u), (ls_c, ls_u) = mu.chunk(2), ls.chunk(2)
            mu, ls = mu_u + w * (mu_c - mu_u), ls_u + w * (ls_c - ls_u)
        return (x - mu) * torch.exp(-ls), -ls.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, c: torch.Tensor, c_null: torch.Tensor | None, w: float) -> torch.Tensor:
        """Sequential inverse over the tokens with a KV cache (one transformer step per token)."""
        guided = c_null is not None
        cond = self.cond(torch.cat([c, c_null]) if guided else c)[:, None]
        caches: list[dict] = [{} for _ in self.layers]
        xs: list[torch.Tensor] = []
        prev = self.start.expand(cond.shape[0], 1, -1)
        for t in range(y.shape[1]):
            h = prev + self.pos[:, t : t + 1] + cond
            for layer, cache in zip(self.layers, caches):
                h = layer.step(h, cache, t, y.shape[1])
            mu, ls = self._head(h)
            if guided:
                (mu_c, mu_u), (ls_c, ls_u) = mu.chunk(2), ls.chunk(2)
                mu, ls = mu_u + w * (mu_c - mu_u), ls_u + w * (ls_c - ls_u)
            x_t = y[:, t : t + 1] * torch.exp(ls) + mu
            xs.append(x_t)
            prev = self.inp(torch.cat([x_t, x_t]) if guided else x_t)
        return torch.cat(xs, 1)


class ConditionalTarFlow(nn.Module):
    """``blocks`` :class:`ARBlock` over the patch tokens of a ``channels x size x size`` image, alternate blocks on
    the reversed token order, an ``N(0, I)`` prior, a learned null condition for classifier-free guidance."""

    def __init__(
        self, size: int = 64, channels: int = 1, patch: int = 4, blocks: int = 4, layers: int = 2, width: int = 128,
        heads: int = 4, cond_dim: int = 32, cond_dropout: float = 0.1,
    ) -> None:  # fmt: skip
        super().__init__()
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch}.")
        self.size, self.channels, self.patch, self.cond_dropout = size, channels, patch, cond_dropout
        tokens, dim = (size // patch) ** 2, channels * patch * patch
        self.blocks = nn.ModuleList([ARBlock(tokens, dim, width, layers, heads, cond_dim) for _ in range(blocks)])
        self.null = nn.Parameter(torch.zeros(cond_dim))

    def dims(self) -> int:
        return self.channels * self.size * self.size

    def drop_condition(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z`` with a ``cond_dropout`` fraction of its rows replaced by the learned null vector."""
        drop = torch.rand(z.shape[0], 1, generator=generator) < self.cond_dropout
        return torch.where(drop, self.null.expand_as(z), z)

    def _null(self, z: torch.Tensor, w: float) -> torch.Tensor | None:
        return None if w == 1.0 else self.null.expand_as(z)

    def forward(self, x: torch.Tensor, z: torch.Tensor, w: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``x`` ``[B, C, S, S]`` (model space) -> ``(y tokens [B, N, D], log_det [B])``."""
        y, log_det = patchify(x, self.patch), x.new_zeros(x.shape[0])
        c_null = self._null(z, w)
        for k, block in enumerate(self.blocks):
            if k % 2:
                y = y.flip(1)
            y, ld = block(y, z, c_null, w)
            log_det = log_det + ld
            if k % 2:
                y = y.flip(1)
        return y, log_det

    def inverse(self, y: torch.Tensor, z: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        """Tokens ``y`` ``[B, N, D]`` -> image ``[B, C, S, S]`` (the exact inverse of :meth:`forward` at ``w``)."""
        c_null = self._null(z, w)
        for k in reversed(range(len(self.blocks))):
            if k % 2:
                y = y.flip(1)
            y = self.blocks[k].inverse(y, z, c_null, w)
            if k % 2:
                y = y.flip(1)
        return unpatchify(y, self.patch, self.channels, self.size)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        y, log_det = self(x, z, w)
        return -0.5 * (y**2).flatten(1).sum(1) - 0.5 * math.log(2 * math.pi) * self.dims() + log_det


def to_model(x01: torch.Tensor) -> torch.Tensor:
    return 2.0 * x01 - 1.0


def bits_per_dim(flow: ConditionalTarFlow, x_model: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Bits per dimension of ``[0, 1]`` slices on 256 levels (``x_model`` in ``[-1, 1]``: ``+ D log 2`` nats)."""
    d = flow.dims()
    return -flow.log_prob(x_model, z) / (d * math.log(2)) - 1.0 + 8.0


def batched_bpd(flow, x01, z, noise: float, seed: int, batch: int = 64) -> torch.Tensor:
    """Bits per dimension of ``x01`` with the training noise (fixed draws), without gradients."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for xb, zb in zip(x01.split(batch), z.split(batch)):
            xm = to_model(xb) + noise * torch.randn(xb.shape, generator=g)
            out.append(bits_per_dim(flow, xm, zb))
    return torch.cat(out)


def sample(flow, z, temperature: float, w: float, noise: float, generator, batch: int = 140):
    """One slice per row of ``z``: a draw at ``temperature`` and guidance ``w``, one denoising step with the flow's
    own conditional score, mapped to ``[0, 1]``; ``(images, overflow pixels per image)`` (before clamping)."""
    images, overflow = [], []
    n_tok, dim = (flow.size // flow.patch) ** 2, flow.channels * flow.patch**2
    for zb in z.split(batch):
        y = temperature * torch.randn(zb.shape[0], n_tok, dim, generator=generator)
        with torch.no_grad():
            x = flow.inverse(y, zb, w)
        if noise > 0:
            x = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(flow.log_prob(x, zb).sum(), x)
            x = (x + noise**2 * score).detach()
        x = (x + 1.0) / 2.0
        flat = x.flatten(1)
        overflow.append((~torch.isfinite(flat) | (flat < -0.25) | (flat > 1.25)).sum(1))
        images.append(torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1))
    return torch.cat(images), torch.cat(overflow)


def train_flow(flow, xt, zt, xv, zv, args, seed: int, log=print) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay, gradient clipping, EMA; the per-epoch train / val bits per dim."""
    from monai_condflow.engines.ema import ModelEMA

    g = torch.Generator().manual_seed(seed)
    ema = ModelEMA(flow, args.ema)
    opt = torch.optim.AdamW(flow.parameters(), args.lr, weight_decay=1e-4)
    spe = len(xt) // args.batch_size
    total = max(1, args.epochs * spe)
    warm = max(1, args.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    curve, warnings = [], []
    t0 = time.time()
    for ep in range(args.epochs):
        flow.train()
        perm = torch.randperm(len(xt), generator=g)
        losses = []
        for i in range(0, spe * args.batch_size, args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = xt[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g) < 0.5, xb.flip(-1), xb) if args.flip else xb
            xm = to_model(xb + torch.rand(xb.shape, generator=g) / 256.0)
            xm = xm + args.noise * torch.randn(xm.shape, generator=g)
            loss = bits_per_dim(flow, xm, flow.drop_condition(zt[idx], g)).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), args.clip)
            opt.step()
            sched.step()
            ema.update()
            losses.append(loss.item())
        train_bpd = sum(losses) / len(losses)
        val_bpd = float(batched_bpd(ema.module, xv, zv, args.noise, seed=7).mean())
        curve.append({"epoch": ep + 1, "train_bpd": train_bpd, "val_bpd": val_bpd, "seconds": time.time() - t0})
        log(f"[seed {seed}] epoch {ep + 1}: train {train_bpd:.4f} val {val_bpd:.4f} bpd ({time.time() - t0:.0f} s)")
        if ep > 0:
            for key in ("train_bpd", "val_bpd"):
                rise = curve[-1][key] - curve[-2][key]
                if not math.isfinite(curve[-1][key]) or rise > 1.0:
                    warnings.append(f"epoch {ep + 1}: {key} rose by {rise:.3f} bits/dim")
                    log(f"[seed {seed}] WARNING {warnings[-1]}")
    return {"ema": ema.module.eval(), "curve": curve, "warnings": warnings, "train_s": time.time() - t0}


def run_seed(splits, judge, z_all, seed: int, args, out: Path, log=print) -> dict[str, Any]:
    from monai_condflow.evaluation.plots import image_grid
    from monai_condflow.evaluation.tstr import predict
    from monai_condflow.metrics.auc import mann_whitney_auc
    from monai_condflow.metrics.fid import fid_from_features
    from monai_condflow.metrics.sharpness import sharpness_ratio
    from monai_condflow.privacy.audits import dcr_audit

    (xt, yt), (xv, _), (xs, _) = splits["train"], splits["val"], splits["test"]
    zt, zv, zs = z_all["train"], z_all["val"], z_all["test"]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    flow = build(args)
    trained = train_flow(flow, xt, zt, xv, zv, args, seed, log)
    m = trained["ema"]
    bpd_train = batched_bpd(m, xt, zt, args.noise, seed=11)
    bpd_test = batched_bpd(m, xs, zs, args.noise, seed=12)
    row: dict[str, Any] = {
        "train_s": trained["train_s"], "epochs": args.epochs, "curve": trained["curve"],
        "warnings": trained["warnings"], "train_bpd": float(bpd_train.mean()), "test_bpd": float(bpd_test.mean()),
        "val_bpd": trained["curve"][-1]["val_bpd"], "mia_auc": mann_whitney_auc(-bpd_train, -bpd_test),
    }  # fmt: skip
    with torch.no_grad():
        feat_val, feat_test = judge.embed(xv), judge.embed(xs)
    floor = fid_from_features(feat_val, feat_test)
    pick = torch.cat([torch.nonzero(yt == c).flatten()[:8] for c in yt.unique().tolist()])
    for temp in args.temperatures:
        for w in args.guidance:
            t0 = time.time()
            x, overflow = sample(m, zt, temp, w, args.noise, torch.Generator().manual_seed(1000 + seed))
            figures = judge_rows(x, overflow, yt, predict(judge, x))
            per_class = figures["agreement_per_class"].values()
            figures["balanced_agreement"] = sum(per_class) / len(per_class)  # the majority class is 3/4 of the slices
            with torch.no_grad():
                fid = fid_from_features(judge.embed(x), feat_test)
            dcr = dcr_audit(x, xt, torch.cat([xv, xs]))["pixel"]
            figures.update(
                fid_ratio=fid / floor if floor > 0 else None, sharpness_ratio=float(sharpness_ratio(x, xt)),
                dcr_closer_auc=dcr["closer_auc"], near_copy_fraction=dcr["near_copy_fraction"],
                sample_s=time.time() - t0,
            )  # fmt: skip
            key = f"T{temp:g}_w{w:g}"
            row[key] = figures
            log(f"[seed {seed}] {key}: {json.dumps(figures)}")
            image_grid(out / f"grid_{key}.png", torch.cat([xt[pick], x[pick]]), nrow=8, scale=3)
    return row


def build(args) -> ConditionalTarFlow:
    return ConditionalTarFlow(
        size=64, channels=1, patch=args.patch, blocks=args.blocks, layers=args.layers, width=args.width,
        heads=args.heads, cond_dim=32, cond_dropout=args.cond_dropout,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("base", type=Path, help="a finished run folder (data/, classifier/): the slices, split and z")
    p.add_argument("--judge-dir", type=Path, default=None, help="folder of judge.pt (trained there when absent)")
    p.add_argument("--out", type=Path, default=Path("runs/proto_tarflow"), help="grids and JSON go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="flow training seeds")
    p.add_argument("--epochs", type=int, default=24, help="training epochs (about 30 s each at 1 thread)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights used for sampling")
    p.add_argument("--patch", type=int, default=4, help="patch size (tokens are patch x patch pixels)")
    p.add_argument("--blocks", type=int, default=4, help="autoregressive flow blocks")
    p.add_argument("--layers", type=int, default=2, help="transformer layers per block")
    p.add_argument("--width", type=int, default=128, help="transformer width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of training slices with the null z")
    p.add_argument("--noise", type=float, default=0.05, help="training noise std in [-1, 1] units (and denoising)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips in training")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.9, 1.0], help="sampling temperatures")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0], help="guidance weights")
    p.add_argument("--judge-epochs", type=int, default=15)
    args = p.parse_args(argv)
    if args.width % args.heads:
        p.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if 64 % args.patch:
        p.error(f"--patch {args.patch} does not divide 64")
    args.base = args.base.resolve()
    args.out = args.out.resolve()
    args.judge_dir = (args.judge_dir or args.out).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from monai_condflow.engines.stages import load_classifier
    from monai_condflow.utils.io import atomic_write_text

    args = parse_args(argv)
    splits, judge = splits_and_judge(args, args.judge_dir)
    conditioner = load_classifier(args.base).eval()
    with torch.no_grad():
        z_all = {k: torch.cat([conditioner.embed(b) for b in v[0].split(128)]) for k, v in splits.items()}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    n_params = sum(p.numel() for p in build(args).parameters())
    print(f"config {json.dumps(config)}; {n_params} parameters", flush=True)
    per_seed = {}
    log = lambda m: print(m, flush=True)  # noqa: E731
    for s in args.seeds:
        per_seed[s] = run_seed(splits, judge, z_all, s, args, args.out / f"seed_{s}", log=log)
        compact = {s: {k: v for k, v in r.items() if k not in ("curve", "warnings")} for s, r in per_seed.items()}
        result = {"config": config, "parameters": n_params, "per_seed": per_seed, "summary": summarize(compact)}
        atomic_write_text(args.out / "proto_tarflow.json", json.dumps(result, indent=1) + "\n")  # after every seed
    print("PROTO_TARFLOW " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
