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
"""
Counterfactuals against the phantom's true paired slices (issue 19), over several flow runs (training seeds).

``--patients`` COVID-19 phantom patients are rendered once each with and without their findings
(:func:`~monai_condflow.data.phantom.render_paired_slices`: same anatomy, noise and placement), stored as the
phantom stores slices (16-bit HU + 1024) and pre-processed by the bundle's chain (lung-box crop, 64 px). The lung mask
goes through the same crop and resize. For each run folder (a binary run: ``classifier/``, ``flow/``, ``data/``) and
guidance weight, ``ConditionalGlow.counterfactual`` moves each slice to the other class's centroid (the classifier's
embeddings of the run's training slices, grouped by their true labels):

- ``covid->non-covid``: source = the slice with findings, truth = the same slice without;
- ``non-covid->covid``: source = the slice without findings, truth = the slice with them.

Figures per direction (fractions of the slices unless said): ``flip`` (the run's classifier predicts the target
class), ``closer_pixel`` / ``closer_embedding`` (the counterfactual is nearer the true paired slice than the source
is, in pixel l2 / in the classifier's embedding), ``in_lungs`` (mean share of ``sum (x' - x)^2`` inside the lung
mask; the true change has about 1.0 there), ``anatomy_kept`` (``|x' - x|`` smaller than ``|x'`` - the nearest real
training slice of the target class``|``). Mean +- std over the runs; last line ``json=...``.

``--regions``: ``image`` keeps the flow's counterfactual whole; ``lungs`` keeps its change only inside the source's
*estimated* lung mask (:func:`~monai_condflow.transforms.lung_mask.estimate_lung_mask`, eroded by
``--region-margin`` pixels, as ``counterfactual.json --counterfactual_region lungs`` does). ``in_lungs`` is always
measured against the phantom's *true* mask, so it shows how well the estimate keeps the edit in the lungs.
``--flow-file``: another checkpoint of the runs' ``flow/`` folder
(e.g. ``model_likelihood.pt``, the flow before its adversarial phase).

Usage::

    python benchmarks/counterfactual_paired.py runs/seed0 runs/seed1 runs/seed2 --guidance 1 2 --regions image lungs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep_sampling

COVID = 2  # the phantom's three-class id of COVID-19 (binary runs: 1)
DIRECTIONS = ("covid->non-covid", "non-covid->covid")
FIGURES = ("flip", "closer_pixel", "closer_embedding", "in_lungs", "anatomy_kept")
REGIONS = ("image", "lungs")


def paired_slices(patients: int, seed: int, image_size: int = 64) -> dict[str, torch.Tensor]:
    """``{"with", "without": [N, 1, S, S], "mask": [N, 1, S, S] bool}``: COVID-19 phantom slices with and without
    their findings, pre-processed as the bundle pre-processes the phantom's files, and their lung masks."""
    from monai_condflow.data.phantom import hu_to_png, render_paired_slices
    from monai_condflow.transforms import get_preprocess_transforms

    chain = get_preprocess_transforms(image_size=image_size, keep_keys=None)
    rng = np.random.default_rng(seed)
    out: dict[str, list[torch.Tensor]] = {"with": [], "without": [], "mask": []}
    for _ in range(patients):
        z = float(rng.uniform(0.3, 0.85))
        hu_with, hu_without, box, mask = render_paired_slices(rng, COVID, 512, None, z)
        for key, hu in (("with", hu_with), ("without", hu_without)):
            out[key].append(chain({"image": hu_to_png(hu), "box": list(box)})["image"])
        out["mask"].append(chain({"image": mask.astype(np.float32), "box": list(box)})["image"] > 0.5)
    return {k: torch.stack(v) for k, v in out.items()}


def counterfactual_figures(
    source: torch.Tensor, cf: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, target: int,
    classifier: torch.nn.Module, bank: torch.Tensor, bank_labels: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """The figures of one direction (see the module docstring) for sources ``[N, 1, S, S]``, their counterfactuals
    and true paired slices, lung masks, the target class, the run's classifier and its training slices ``bank``."""
    with torch.no_grad():
        logits = classifier(cf.clamp(0, 1))
        e_cf, e_src, e_true = (classifier.embed(x.clamp(0, 1)) for x in (cf, source, truth))
    flat = lambda t: t.flatten(1)  # noqa: E731
    d_cf_true = (flat(cf) - flat(truth)).norm(dim=1)
    d_src_true = (flat(source) - flat(truth)).norm(dim=1)
    change = (flat(cf) - flat(source)).pow(2)
    in_lungs = (change * flat(mask).float()).sum(1) / change.sum(1).clamp_min(1e-12)
    targets = bank[bank_labels == target]
    nearest = torch.cdist(flat(cf), flat(targets)).min(dim=1).values
    return {
        "flip": float((logits.argmax(1) == target).float().mean()),
        "closer_pixel": float((d_cf_true < d_src_true).float().mean()),
        "closer_embedding": float(((e_cf - e_true).norm(dim=1) < (e_src - e_true).norm(dim=1)).float().mean()),
        "in_lungs": float(in_lungs.mean()),
        "anatomy_kept": float((change.sum(1).sqrt() < nearest).float().mean()),
    }


def run_figures(
    run: Path, pairs: dict[str, torch.Tensor], guidance: float, regions: Sequence[str] = ("image",),
    flow_file: str | None = None, margin: int = 1,
) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """``{region: {direction: figures}}`` for one run folder at one guidance weight (``flow_file``: a checkpoint
    of the run's ``flow/`` folder to load instead of its ``model.pt``)."""
    from sweep_sampling import load_splits

    from monai_condflow.engines.stages import load_classifier, load_flow
    from monai_condflow.networks.nets import restrict_change, target_conditions
    from monai_condflow.transforms.lung_mask import estimate_lung_masks

    classifier = load_classifier(run).eval()
    flow = load_flow(run).eval()
    if flow_file is not None:
        from monai_condflow.handlers.checkpoint import load_checkpoint

        state = load_checkpoint(run / "flow" / flow_file)
        if "network" not in state:
            raise KeyError(f"{run / 'flow' / flow_file} holds no 'network' weights (keys: {sorted(state)[:5]})")
        flow.load_state_dict(state["network"])
    bank, bank_labels = load_splits(run)["train"]
    with torch.no_grad():
        bank_z = torch.cat([classifier.embed(bank[i : i + 128]) for i in range(0, len(bank), 128)])
    out: dict[str, dict[str, dict[str, float]]] = {region: {} for region in regions}
    for name, source, truth, target in (
        ("covid->non-covid", pairs["with"], pairs["without"], 0),
        ("non-covid->covid", pairs["without"], pairs["with"], 1),
    ):
        with torch.no_grad():
            z = classifier.embed(source)
            goal = torch.full((len(source),), target, dtype=torch.long)
            z_target = target_conditions(z, goal, bank_z, bank_labels, 2, mode="centroid")
            cf = flow.counterfactual(source, z, z_target, guidance=guidance)
        for region in regions:
            x = restrict_change(source, cf, estimate_lung_masks(source, erosion=margin)) if region == "lungs" else cf
            out[region][name] = counterfactual_figures(source, x, truth, pairs["mask"], target, classifier, bank,
                                                       bank_labels)  # fmt: skip
    return out


def summarize(per_run: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and (sample) std over runs of every figure: ``{direction: {figure: {"mean", "std", "per_run"}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for direction in DIRECTIONS:
        out[direction] = {}
        for fig in FIGURES:
            vals = [r[direction][fig] for r in per_run]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
            out[direction][fig] = {"mean": round(mean, 4), "std": round(std, 4), "per_run": [round(v, 4) for v in vals]}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="binary run folders (classifier/, flow/, data/)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--regions", nargs="+", choices=REGIONS, default=list(REGIONS))
    parser.add_argument("--region-margin", type=int, default=1, help="lungs region: mask erosion in pixels")
    parser.add_argument("--flow-file", default=None, help="checkpoint in each run's flow/ (default: model.pt)")
    args = parser.parse_args(argv)
    pairs = paired_slices(args.patients, args.seed)
    true_share = (pairs["with"] - pairs["without"]).pow(2)
    inside = (true_share * pairs["mask"]).flatten(1).sum(1)
    share = float((inside / true_share.flatten(1).sum(1).clamp_min(1e-12)).mean())
    print(f"{args.patients} paired slices; the true change's share inside the lung mask: {share:.3f}")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "true_change_in_lungs": round(share, 4)}
    for w in args.guidance:
        per_run = [run_figures(run.resolve(), pairs, w, args.regions, args.flow_file, args.region_margin)
                   for run in args.runs]  # fmt: skip
        report[f"w{w:g}"] = {}
        for region in args.regions:
            summary = summarize([r[region] for r in per_run])
            report[f"w{w:g}"][region] = summary
            for direction, figs in summary.items():
                line = " | ".join(f"{k} {v['mean']:.2f} +- {v['std']:.2f}" for k, v in figs.items())
                print(f"w={w:g} {region:5s} {direction:18s} {line}", flush=True)
    print("json=" + json.dumps(report, separators=(",", ":")))
    return report


if __name__ == "__main__":
    main()
