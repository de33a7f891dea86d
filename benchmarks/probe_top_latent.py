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
"""Where a trained flow's class evidence lives in its top latent: decode the training slices with top latents from
several sources and judge them.

Each training slice is encoded with its own ``z`` (``ConditionalGlow.encode``); its finer latents are replaced by fresh
``N(0, T^2)`` draws and its top latent by one of these sources (``--sources``):

* ``standard``: ``N(0, T^2 I)`` (the paper's prior);
* ``own``: the slice's own top latent (an upper bound that copies the slice);
* ``own+noise:S``: the own top latent plus ``N(0, S^2 I)``;
* ``owncoef:K:R``: the own top latent projected onto the ``K`` leading principal directions of the training top
  latents, plus ``R`` times the residual's per-entry spread in fresh noise (how much of the class sits in the
  leading directions);
* ``gmm:K:M``: a per-class Gaussian mixture (``M`` components, diagonal covariances, EM) over the ``K`` leading
  principal coefficients, drawn at temperature ``T``, plus the residual's per-entry spread at ``T`` (a prior that
  generalises: nothing of a particular slice is kept).

Per source it reports the judge's class agreement with the conditioning class (overall and per class), images and
pixels that overflowed before clamping, FID / floor on the judge's features, and the distance-to-closest-record
audit in pixels (``dcr_closer_auc``: P(a synthetic slice is nearer its closest training slice than a held-out slice
is); ``near_copy_fraction``). The judge is ``benchmarks/ablate_flow.py``'s (``OUT/judge.pt``, trained on the true
labels when absent). Last line ``PROBE_TOP_LATENT {json}``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/probe_top_latent.py runs/main --flows runs/main runs/abl/base_s1 \\
        --out runs/ablations --sources standard own owncoef:64:0 gmm:64:8
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_flow import judge_rows, splits_and_judge  # noqa: E402

DEFAULT_SOURCES = ("standard", "own", "own+noise:0.3", "owncoef:64:0", "owncoef:256:0", "gmm:16:8", "gmm:64:8")


def parse_source(text: str) -> tuple[str, tuple[float, ...]]:
    """``"gmm:64:8"`` -> ``("gmm", (64.0, 8.0))``; raises ``ValueError`` naming the source when malformed."""
    kind, *values = text.split(":")
    arity = {"standard": 0, "own": 0, "own+noise": 1, "owncoef": 2, "gmm": 2}
    if kind not in arity or len(values) != arity[kind]:
        raise ValueError(f"--sources: {text!r} is not one of standard, own, own+noise:S, owncoef:K:R, gmm:K:M.")
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError as err:
        raise ValueError(f"--sources: {text!r} has a non-numeric value.") from err
    if any(v < 0 for v in numbers) or (kind in ("owncoef", "gmm") and numbers[0] < 1):
        raise ValueError(f"--sources: {text!r} needs K >= 1 and non-negative values.")
    if kind == "gmm" and numbers[1] < 1:
        raise ValueError(f"--sources: {text!r} needs M >= 1 components.")
    return kind, numbers


def principal_basis(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and principal directions ``[min(N, D), D]`` (rows, by decreasing variance) of ``top`` ``[N, D]``."""
    mean = top.mean(0)
    _, _, vh = torch.linalg.svd(top - mean, full_matrices=False)
    return mean, vh


def fit_diag_gmm(
    x: torch.Tensor, components: int, generator: torch.Generator, iters: int = 100, var_floor: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a Gaussian mixture with diagonal covariances on ``x`` ``[N, K]``; ``(weights [M], means [M, K],
    variances [M, K])``, ``M = min(components, N)``, means started on distinct random rows, ``var_floor`` added to
    every variance."""
    n = x.shape[0]
    m = min(int(components), n)
    means = x[torch.randperm(n, generator=generator)[:m]].clone()
    variances = x.var(0, unbiased=False).expand(m, -1).clone() + var_floor
    weights = torch.full((m,), 1.0 / m, dtype=x.dtype)
    for _ in range(iters):
        log_like = -0.5 * (((x[:, None] - means[None]) ** 2) / variances[None] + variances[None].log()).sum(-1)
        resp = torch.softmax(log_like + weights.log()[None], dim=1)
        mass = resp.sum(0) + 1e-12
        means = resp.T @ x / mass[:, None]
        variances = resp.T @ x**2 / mass[:, None] - means**2
        variances = variances.clamp_min(0) + var_floor
        weights = mass / n
    return weights, means, variances


def top_sampler(
    kind: str, values: tuple[float, ...], top: torch.Tensor, classes: torch.Tensor, temperature: float, seed: int = 0
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """A function ``(indices [B], generator) -> top latents [B, D]`` (float64) for one ``--sources`` entry; ``top``
    ``[N, D]``: the encoded training top latents, ``classes`` ``[N]``: the class each slice is conditioned on."""
    top = top.double()
    n, d = top.shape
    if kind == "standard":
        return lambda idx, g: temperature * torch.randn(len(idx), d, generator=g, dtype=torch.double)
    if kind == "own":
        return lambda idx, g: top[idx]
    if kind == "own+noise":
        return lambda idx, g: top[idx] + values[0] * torch.randn(len(idx), d, generator=g, dtype=torch.double)
    mean, vh = principal_basis(top)
    basis = vh[: int(values[0])].T  # [D, K]
    coef = (top - mean) @ basis
    spread = (top - mean - coef @ basis.T).std(0)
    if kind == "owncoef":
        return lambda idx, g: (
            mean + coef[idx] @ basis.T + values[1] * spread * torch.randn(len(idx), d, generator=g, dtype=torch.double)
        )
    fit_gen = torch.Generator().manual_seed(seed)
    models = {int(c): fit_diag_gmm(coef[classes == c], int(values[1]), fit_gen) for c in classes.unique()}

    def draw(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        rows = []
        for i in idx.tolist():
            weights, means, variances = models[int(classes[i])]
            j = int(torch.multinomial(weights.float(), 1, generator=g))
            c = means[j] + temperature * variances[j].sqrt() * torch.randn(
                basis.shape[1], generator=g, dtype=torch.double
            )
            rows.append(mean + c @ basis.T + temperature * spread * torch.randn(d, generator=g, dtype=torch.double))
        return torch.stack(rows)

    return draw


def probe_flow(
    flow_dir: Path, judge: torch.nn.Module, splits: Mapping[str, Any], sources: Sequence[str], temperature: float
) -> dict[str, Any]:
    """Figures of every source for one trained flow run (its ``classifier/`` gives ``z`` and the classes)."""
    from monai_condflow.engines.stages import load_classifier, load_flow
    from monai_condflow.evaluation.plots import image_grid
    from monai_condflow.evaluation.tstr import predict
    from monai_condflow.metrics.fid import fid_from_features
    from monai_condflow.networks.nets.conditional_glow import clamp_decoded
    from monai_condflow.privacy.audits import dcr_audit

    train, val, test = splits["train"], splits["val"], splits["test"]
    classifier, flow = load_classifier(flow_dir).eval(), load_flow(flow_dir).eval()
    x0, labels = train
    with torch.no_grad():
        z = torch.cat([classifier.embed(b) for b in x0.split(128)])
        latents = [flow.encode(b, c) for b, c in zip(x0.split(140), z.split(140))]
        feat_val, feat_test = judge.embed(val[0]), judge.embed(test[0])
    latents = [torch.cat([part[k] for part in latents]) for k in range(len(latents[0]))]
    classes = predict(classifier, x0)  # the class the pipeline conditions each slice on
    floor = fid_from_features(feat_val, feat_test)
    top = latents[-1].flatten(1)
    rows: dict[str, Any] = {}
    for source in sources:
        kind, values = parse_source(source)
        sampler = top_sampler(kind, values, top, classes, temperature)
        generator = torch.Generator().manual_seed(1)
        images, overflow = [], []
        for idx in torch.arange(len(x0)).split(140):
            finer = [temperature * torch.randn(part[idx].shape, generator=generator) for part in latents[:-1]]
            new_top = sampler(idx, generator).reshape(latents[-1][idx].shape).float()
            with torch.no_grad():
                x = flow.decode([*finer, new_top], z[idx])
            x, over, _ = clamp_decoded(x)
            overflow.append(over)
            images.append(x)
        x, overflow = torch.cat(images), torch.cat(overflow)
        row = judge_rows(x, overflow, labels, predict(judge, x))
        with torch.no_grad():
            row["fid_ratio"] = fid_from_features(judge.embed(x), feat_test) / floor if floor > 0 else None
        dcr = dcr_audit(x, x0, torch.cat([val[0], test[0]]))["pixel"]
        row.update(dcr_closer_auc=dcr["closer_auc"], near_copy_fraction=dcr["near_copy_fraction"])
        rows[source] = row
        print(f"{flow_dir.name} {source}: {json.dumps(row)}", flush=True)
        pick = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in labels.unique().tolist()])
        name = source.replace(":", "_").replace("+", "_")
        image_grid(flow_dir / f"probe_top_{name}.png", torch.cat([x0[pick], x[pick]]), nrow=8, scale=3)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a finished run folder (data/, classifier/): the slices and splits")
    parser.add_argument("--flows", type=Path, nargs="+", required=True, help="trained run folders (flow/, classifier/)")
    parser.add_argument("--out", type=Path, default=None, help="judge.pt and probe_top_latent.json (default: BASE)")
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES))
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--judge-epochs", type=int, default=15)
    args = parser.parse_args(argv)
    for source in args.sources:
        try:
            parse_source(source)
        except ValueError as err:
            parser.error(str(err))
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    args.out = (args.out or args.base).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from monai_condflow.utils.io import atomic_write_text

    args = parse_args(argv)
    splits, judge = splits_and_judge(args)
    result = {str(f): probe_flow(f, judge, splits, args.sources, args.temperature) for f in args.flows}
    atomic_write_text(args.out / "probe_top_latent.json", json.dumps(result, indent=1) + "\n")
    print("PROBE_TOP_LATENT " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
