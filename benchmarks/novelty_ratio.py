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
New-disease scoring with a background-model likelihood ratio (issue 19), over several flow-training seeds.

The "new disease" test of ``docs/results.md``: flows see only the phantom's normal and pneumonia training slices;
COVID-19 slices (validation + test) must score as more unusual than the normal and pneumonia test slices. Unlike the
earlier one-seed measurement, the flows here are **unconditional** (no classifier embedding, so nothing trained on
COVID-19 leaks into the scores).

Per seed two flows are trained on the same slices with the same loop (AdamW, linear warm-up, uniform
dequantisation, the preset's training noise): the ``main`` flow (``small`` preset) and a lower-capacity
``background`` flow (``--bg-steps`` steps per level, ``--bg-hidden`` channels). Scores (larger = more unusual):

- ``bpd``: the main flow's bits/dim; ``level_typicality``: the library's default statistic (per-level z-scores
  against the normal + pneumonia validation slices, :class:`~monai_condflow.metrics.novelty.NoveltyScorer`);
- ``ratio``: ``bpd_main - bpd_background`` (Schirrmeister et al. 2020's likelihood ratio: the background model
  explains the local pixel statistics that dominate both likelihoods, the ratio keeps what only the larger model
  learned);
- ``ratio_typicality``: ``|ratio - mean| / std`` against the validation slices (a two-sided version);
- ``level_ratio``: per-level z-scores of ``level_bpd_main - level_bpd_background`` (RMS over levels).

Usage::

    python benchmarks/novelty_ratio.py runs/main --seeds 0 1 2          # ~5 min per seed on 2 cores
    # keep the trained flows (and the main flow after 5, 10, 20, 30, 45 epochs) and swap the background:
    python benchmarks/novelty_ratio.py runs/main --epochs 90 --cache runs/novelty --bg-steps 2 --bg-hidden 16
    python benchmarks/novelty_ratio.py runs/main --epochs 90 --cache runs/novelty --bg-early 10

With ``--heat`` the per-pixel map of the ratio (:func:`~monai_condflow.metrics.novelty.novelty_map`) is checked for
*where* it puts a new finding: 40 COVID-19 phantom slices rendered with and without their findings
(``counterfactual_paired.paired_slices``; finding pixels = where the two differ by more than 0.02). ``paired_share``:
share of the positive extra bits (map with findings - map without) that falls on the finding pixels;
``top200_share``: share of each slice's 200 highest pixels of its map minus the reference slices' mean map (no paired
slice needed, as ``novelty.json --heat_maps`` computes it) that are finding pixels; each next to the finding pixels'
share of the image (their ratio = enrichment over a map that knows nothing). ``--heat-figure PNG`` saves 8 slices,
their maps and the true finding masks.

The last line is ``json=<every figure>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.engines.flow import FlowBitsPerDim  # noqa: E402
from monai_condflow.metrics.auc import binary_auc  # noqa: E402
from monai_condflow.metrics.novelty import (  # noqa: E402
    NoveltyScorer,
    flow_statistics,
    novelty_map,
)
from monai_condflow.metrics.novelty import max_softmax_score as max_softmax_of_logits  # noqa: E402
from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402

STATISTICS = ("bpd", "level_typicality", "ratio", "ratio_typicality", "level_ratio")
BASELINE = "max_softmax"
"""``1 - max softmax`` of a classifier trained on the known classes only (``--classifier-epochs``)."""


def load_three_class_splits(run: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "val" | "test": (images [N, 1, S, S], labels [N] in {0 normal, 1 pneumonia, 2 COVID-19})}`` of a
    run's phantom, read through the bundle's ``common.json`` records with ``class_map="three"``."""
    from monai_condflow.utils.bundle import COMMON_CONFIG, read_bundle_config

    config = read_bundle_config([COMMON_CONFIG])
    config.update({"dataset_dir": str(run / "data"), "output_dir": str(run), "class_map": "three",
                   "num_classes": 3})  # fmt: skip
    out = {}
    for split in ("train", "val", "test"):
        records = config.get_parsed_content(f"records#{split}")
        images = torch.stack([torch.as_tensor(r["image"]).float().reshape(1, *r["image"].shape[-2:]) for r in records])
        out[split] = (images, torch.tensor([int(r["label"]) for r in records]))
    return out


def load_npz_splits(
    path: Path, novel_class: int, fold: int, reference_every: int = 4
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Patient-disjoint splits of an ``.npz`` slice set (``images``, ``labels``, ``patient_ids``) for the new-disease
    test, in the layout of :func:`load_three_class_splits` (labels 0, 1 known, 2 novel).

    The known classes are every class but ``novel_class`` (relabelled 0, 1, ... in order). Of each known class's
    patients (sorted by id) the ``fold``-th (modulo their count) is held out: its slices are the known test images;
    the other patients' slices train the flows, except every ``reference_every``-th slice, kept as the reference
    (``val``). Every slice of the novel class is a test image (label 2)."""
    import numpy as np

    data = np.load(path)
    images = torch.as_tensor(data["images"]).float().div(255).unsqueeze(1)
    labels, patients = data["labels"], data["patient_ids"].astype(str)
    known_classes = [c for c in sorted(set(labels.tolist())) if c != novel_class]
    if len(known_classes) != 2:
        raise ValueError(f"{path}: the new-disease test needs exactly two known classes, found {known_classes}")
    train, val, test_known = [], [], []
    for new, c in enumerate(known_classes):
        ids = sorted(set(patients[labels == c].tolist()))
        held = ids[fold % len(ids)]
        for i in np.flatnonzero(labels == c):
            if patients[i] == held:
                test_known.append((i, new))
            else:
                train.append((i, new))
    val = train[::reference_every]
    train = [t for k, t in enumerate(train) if k % reference_every]
    novel = [(i, 2) for i in np.flatnonzero(labels == novel_class)]

    def pick(rows):
        return images[[i for i, _ in rows]], torch.tensor([c for _, c in rows])

    return {"train": pick(train), "val": pick(val), "test": pick(test_known + novel)}


def train_flow(
    flow: ConditionalGlow, images: torch.Tensor, epochs: int, seed: int, batch: int = 32,
    snapshots: dict[int, Path] | None = None, perturb: float = 0.0,
) -> float:  # fmt: skip
    """Maximum likelihood with the trainer's ingredients (uniform dequantisation, the flow's training noise, AdamW
    5e-4 with 50 warm-up steps, clipping at 50); returns the last epoch's mean training bits/dim. ``snapshots``:
    ``{epoch: file}`` where the weights after that epoch are saved. ``perturb``: the share of pixels of every
    training image replaced by uniformly drawn 8-bit values (Ren et al. 2019's background model: trained on
    perturbed images, it keeps the population's local statistics and loses the semantic content)."""
    g = torch.Generator().manual_seed(seed)
    flow.initialize(images[:64] + torch.rand(images[:64].shape, generator=g) / 256, None)
    net = FlowBitsPerDim(flow).train()
    opt = torch.optim.AdamW(flow.parameters(), lr=5e-4, weight_decay=1e-6, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    last = float("nan")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(images.shape[0], generator=g)
        losses = []
        for start in range(0, images.shape[0] - batch + 1, batch):
            x = images[order[start : start + batch]]
            if perturb > 0:
                swap = torch.rand(x.shape, generator=g) < perturb
                x = torch.where(swap, torch.randint(0, 256, x.shape, generator=g).float() / 255, x)
            x = (x * 255 + torch.rand(x.shape, generator=g)) / 256
            opt.zero_grad(set_to_none=True)
            loss = net(x, None).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        last = sum(losses) / len(losses)
        if snapshots and epoch in snapshots:
            torch.save({"network": flow.state_dict(), "train_bpd": last}, snapshots[epoch])
    return last


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, batch: int = 32
                     ) -> torch.nn.Module:  # fmt: skip
    """The known-class baseline: a ``small`` PEPXNet trained on the known training slices (labels 0, 1) with the
    classifier stage's optimiser (AdamW 2e-3, weight decay 1e-7) and cross-entropy; returned in eval mode."""
    from monai_condflow.networks.nets import PEPXNet

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-7)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=g)
        for start in range(0, images.shape[0], batch):
            idx = order[start : start + batch]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(images[idx]), labels[idx]).backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def max_softmax_score(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``1 - max softmax`` per image (:func:`~monai_condflow.metrics.novelty.max_softmax_score`, in batches of 128)."""
    return torch.cat([max_softmax_of_logits(classifier(images[i : i + 128])) for i in range(0, images.shape[0], 128)])


def scores(main: dict, bg: dict, ref_main: dict, ref_bg: dict) -> dict[str, torch.Tensor]:
    """Every statistic of :data:`STATISTICS` for images with statistics ``main`` / ``bg`` (the two flows'),
    relative to the reference images' ``ref_main`` / ``ref_bg``."""
    ratio, ref_ratio = main["bpd"] - bg["bpd"], ref_main["bpd"] - ref_bg["bpd"]
    level, ref_level = main["level_bpd"] - bg["level_bpd"], ref_main["level_bpd"] - ref_bg["level_bpd"]
    z = (level - ref_level.mean(0)) / ref_level.std(0).clamp_min(1e-12)
    return {
        "bpd": main["bpd"],
        "level_typicality": NoveltyScorer("level_typicality", ref_main)(main),
        "ratio": ratio,
        "ratio_typicality": (ratio - ref_ratio.mean()).abs() / ref_ratio.std().clamp_min(1e-12),
        "level_ratio": z.pow(2).mean(1).sqrt(),
    }


def _cache_file(cache: Path | None, tag: str, seed: int, epochs: int, at: int | None = None) -> Path | None:
    if cache is None:
        return None
    return cache / f"{tag}_s{seed}_e{epochs}" f"{'' if at is None else f'_at{at}'}.pt"


EARLY_EPOCHS = (5, 10, 20, 30, 45)
"""Epochs after which a cached main flow's weights are kept as well (candidates for ``--bg-early``)."""


def _cached_flow(
    flow: ConditionalGlow, images: torch.Tensor, epochs: int, seed: int, cache: Path | None, tag: str,
    keep: Sequence[int] = (), need: int | None = None, perturb: float = 0.0,
) -> float:  # fmt: skip
    """Train ``flow`` (or load it from ``cache``, where it is saved); returns its last training bits/dim. The weights
    after the epochs in ``keep`` and ``need`` are saved as well; ``need`` (needs ``cache``) must be among the cached
    files, or the flow is trained again."""
    if need is not None and cache is None:
        raise ValueError("--bg-early needs --cache (the early weights are saved there)")
    final = _cache_file(cache, tag, seed, epochs)
    needed = [] if need is None else [_cache_file(cache, tag, seed, epochs, need)]
    if final is not None and all(p.is_file() for p in [final, *needed]):
        state = torch.load(final, weights_only=True)
        flow.load_state_dict(state["network"])
        return float(state["train_bpd"])
    snaps: dict[int, Path] = {}
    if final is not None:
        cache.mkdir(parents=True, exist_ok=True)
        epochs_kept = {e for e in keep if e < epochs} | ({need} if need is not None else set())
        snaps = {e: _cache_file(cache, tag, seed, epochs, e) for e in epochs_kept}
        snaps[epochs] = final
    return train_flow(flow, images, epochs, seed, snapshots=snaps, perturb=perturb)


def heat_figures(
    main: ConditionalGlow, bg: ConditionalGlow, reference: torch.Tensor, figure: Path | None = None
) -> dict:
    """Where the ratio map puts the findings of paired phantom COVID-19 slices (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from counterfactual_paired import paired_slices

    pairs = paired_slices(40, 12345, image_size=reference.shape[-1])
    with_f, without = pairs["with"], pairs["without"]
    finding = (with_f - without).abs()[:, 0] > 0.02
    area = float(finding.double().mean())
    heat_with = novelty_map(main, with_f, None, bg)
    extra = (heat_with - novelty_map(main, without, None, bg)).clamp_min(0)
    paired = float((extra * finding).sum() / extra.sum().clamp_min(1e-12))
    centred = heat_with - novelty_map(main, reference, None, bg).mean(0)
    top = centred.flatten(1).topk(200, dim=1).indices
    top_share = float(finding.flatten(1).gather(1, top).double().mean())
    if figure is not None:
        from monai_condflow.evaluation.plots import image_grid

        scale = float(torch.quantile(centred[:8].abs().flatten(), 0.99).clamp_min(1e-12))
        shown = (0.5 + centred[:8] / (2 * scale)).clamp(0, 1)
        image_grid(figure, torch.cat([with_f[:8, 0].double(), shown, finding[:8].double()]), nrow=8)
    return {"finding_area": round(area, 4), "paired_share": round(paired, 4), "top200_share": round(top_share, 4),
            "paired_enrichment": round(paired / area, 2), "top200_enrichment": round(top_share / area, 2)}


def run_seed(splits: dict, seed: int, args: argparse.Namespace) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = splits["train"], splits["val"], splits["test"]
    known_train = xtr[ytr < 2]
    reference = xva[yva < 2]
    novel = torch.cat([xva[yva == 2], xte[yte == 2]])
    known = xte[yte < 2]
    size = xtr.shape[-1]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    main = ConditionalGlow.from_preset("small", image_size=size, condition_dim=0)
    bpd_main = _cached_flow(main, known_train, args.epochs, seed, args.cache, "main", EARLY_EPOCHS, args.bg_early)
    if args.bg_early:  # the background is the main flow itself after --bg-early epochs
        bg = ConditionalGlow.from_preset("small", image_size=size, condition_dim=0)
        state = torch.load(_cache_file(args.cache, "main", seed, args.epochs, args.bg_early), weights_only=True)
        bg.load_state_dict(state["network"])
        bpd_bg = float(state["train_bpd"])
    elif args.bg_perturb:  # the main flow's architecture, trained on perturbed images
        torch.manual_seed(seed + 1000)
        bg = ConditionalGlow.from_preset("small", image_size=size, condition_dim=0)
        tag = f"bgperturb{args.bg_perturb:g}"
        bpd_bg = _cached_flow(bg, known_train, args.bg_epochs, seed + 1000, args.cache, tag, perturb=args.bg_perturb)
    else:
        torch.manual_seed(seed + 1000)
        bg = ConditionalGlow.from_preset("small", image_size=size, condition_dim=0, num_steps=args.bg_steps,
                                         hidden_channels=args.bg_hidden)  # fmt: skip
        tag = f"bg{args.bg_steps}x{args.bg_hidden}"
        bpd_bg = _cached_flow(bg, known_train, args.bg_epochs, seed + 1000, args.cache, tag)
    stats = {name: {"main": flow_statistics(main, x, None), "bg": flow_statistics(bg, x, None)}
             for name, x in (("reference", reference), ("novel", novel), ("known", known))}  # fmt: skip
    ref = stats["reference"]
    s_novel = scores(stats["novel"]["main"], stats["novel"]["bg"], ref["main"], ref["bg"])
    s_known = scores(stats["known"]["main"], stats["known"]["bg"], ref["main"], ref["bg"])
    aucs = {}
    for name in STATISTICS:
        values = torch.cat([s_novel[name], s_known[name]])
        labels = torch.cat([torch.ones(len(s_novel[name])), torch.zeros(len(s_known[name]))])
        aucs[name] = round(binary_auc(values, labels), 4)
    classifier_acc = None
    if args.classifier_epochs:
        clf = train_classifier(known_train, ytr[ytr < 2], args.classifier_epochs, seed)
        with torch.no_grad():
            classifier_acc = round(float((clf(known).argmax(1) == yte[yte < 2]).float().mean()), 4)
        values = torch.cat([max_softmax_score(clf, novel), max_softmax_score(clf, known)])
        labels = torch.cat([torch.ones(novel.shape[0]), torch.zeros(known.shape[0])])
        aucs[BASELINE] = round(binary_auc(values, labels), 4)
    heat = None
    if args.heat:
        figure = None if args.heat_figure is None else args.heat_figure.with_name(
            f"{args.heat_figure.stem}_seed{seed}{args.heat_figure.suffix}")  # fmt: skip
        heat = heat_figures(main.eval(), bg.eval(), reference, figure)
    return {
        "seed": seed,
        "auroc": aucs,
        "heat": heat,
        "classifier_known_accuracy": classifier_acc,
        "train_bpd_main": round(bpd_main, 4),
        "train_bpd_background": round(bpd_bg, 4),
        "n": {"train": int(known_train.shape[0]), "reference": int(reference.shape[0]), "novel": int(novel.shape[0]),
              "known": int(known.shape[0])},  # fmt: skip
        "mean_bpd": {k: round(float(v["main"]["bpd"].mean()), 4) for k, v in stats.items()},
        "mean_bpd_background": {k: round(float(v["bg"]["bpd"].mean()), 4) for k, v in stats.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished main-job run folder (its data/ holds the phantom)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="main flow epochs")
    parser.add_argument("--bg-epochs", type=int, default=30, help="background flow epochs")
    parser.add_argument("--bg-steps", type=int, default=2, help="background flow steps per level")
    parser.add_argument("--bg-hidden", type=int, default=8, help="background flow coupling width")
    parser.add_argument("--bg-early", type=int, default=None,
                        help="background = the main flow after this many epochs (instead of a smaller flow)")
    parser.add_argument("--bg-perturb", type=float, default=0.0,
                        help="background = the main flow's architecture trained on images with this share of "
                        "pixels replaced by noise (Ren et al. 2019), instead of a smaller flow")
    parser.add_argument("--cache", type=Path, default=None, help="folder where trained flows are kept and reused")
    parser.add_argument("--npz", type=Path, default=None,
                        help="score a class of this .npz set as the new disease instead of the run's phantom "
                        "(patient-disjoint; see load_npz_splits); the run argument is then ignored")
    parser.add_argument("--novel-class", type=int, default=1, help="with --npz: the class id scored as new")
    parser.add_argument("--fold", type=int, default=0, help="with --npz: which patient of each known class is held out")
    parser.add_argument("--classifier-epochs", type=int, default=0,
                        help="also train a classifier on the known classes for this many epochs and score its "
                        "1 - max softmax (the baseline column)")
    parser.add_argument("--heat", action="store_true", help="also measure where the ratio map puts a new finding")
    parser.add_argument("--heat-figure", type=Path, default=None, help="PNG of 8 slices, maps, findings (per seed)")
    args = parser.parse_args(argv)
    if not 0 <= args.bg_perturb < 1:
        parser.error(f"--bg-perturb is a share of pixels in [0, 1), got {args.bg_perturb}")
    if args.bg_perturb and args.bg_early:
        parser.error("--bg-perturb and --bg-early choose different backgrounds; give one")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.npz is not None:
        splits = load_npz_splits(args.npz, args.novel_class, args.fold)
    else:
        splits = load_three_class_splits(args.run.resolve())
    rows = []
    for seed in args.seeds:
        row = run_seed(splits, seed, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for name in STATISTICS + ((BASELINE,) if args.classifier_epochs else ()):
        vals = [r["auroc"][name] for r in rows]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
        summary[name] = {"mean": round(mean, 4), "std": round(std, 4), "per_seed": vals}
        print(f"{name:18s} AUROC {mean:.3f} +- {std:.3f}  ({', '.join(f'{v:.3f}' for v in vals)})")
    if args.heat:
        for key in ("paired_share", "top200_share", "paired_enrichment", "top200_enrichment"):
            vals = [r["heat"][key] for r in rows]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
            summary[f"heat_{key}"] = {"mean": round(mean, 4), "std": round(std, 4), "per_seed": vals}
            print(f"heat {key:18s} {mean:.3f} +- {std:.3f}  ({', '.join(f'{v:.3f}' for v in vals)}; finding area "
                  f"{rows[0]['heat']['finding_area']:.3f})")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": rows, "summary": summary}
    print("json=" + json.dumps(report, separators=(",", ":")))
    return report


if __name__ == "__main__":
    main()
