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
"""Flow ablation over training seeds: the bundle's flow stage with overrides on a finished run's data and classifier.

For one setting (``--overrides``: the flow stage's ``flow_overrides``; ``--bundle-args``: other ids of
``train_flow.json`` such as ``--max_epochs 15``) and each ``--seeds`` value, the script trains the flow stage with
``python -m monai.bundle run`` in ``OUT/NAME_sSEED`` (``data/`` and ``classifier/`` linked from the base run, so every
row shares the conditioning classifier and the split), then judges it against a classifier trained on the *true*
labels of the real training slices (trained once, ``OUT/judge.pt``). Per seed and temperature it reports class
agreement (overall and per class) on one synthetic slice per training slice (its own z), images and pixels that
overflowed before clamping, the sharpness ratio, FID / floor on the judge's features, TSTR (``--tstr-temperature``)
and the membership-inference AUC (train vs test bits/dim); then the mean and standard deviation over seeds. A
finished seed (``flow/model.pt`` present) is judged again, not retrained. Results: ``OUT/NAME.json``, a grid per seed
and temperature, and a last line ``ABLATE_FLOW {json}``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/ablate_flow.py runs/main --name noise05 --seeds 0 1 \\
        --overrides '{"noise_std": 0.05}' --out runs/ablations
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_sampling import load_splits  # noqa: E402

LINKED = ("data", "classifier")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a finished run folder of the pipeline (data/, classifier/)")
    parser.add_argument("--name", required=True, help="name of the setting (file and folder names)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="flow-training seeds")
    parser.add_argument("--overrides", default="{}", help="JSON object passed as the flow stage's flow_overrides")
    parser.add_argument("--bundle-args", nargs=argparse.REMAINDER, default=[], help="more ids for the flow stage")
    parser.add_argument("--out", type=Path, default=None, help="default: BASE/ablations")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--tstr-temperature", type=float, default=0.9, help="temperature of the TSTR row")
    parser.add_argument(
        "--priors", nargs="+", default=["auto"], choices=["auto", "fitted", "standard"],
        help="sampling priors to judge (ConditionalGlow.sample's prior; 'standard': N(0, T^2 I) for every latent)",
    )  # fmt: skip
    parser.add_argument(
        "--fit-shrinkage", type=float, default=None,
        help="fit the sampling prior on the training split when the trained flow has none (e.g. an older run)",
    )  # fmt: skip
    parser.add_argument("--tstr-seeds", type=int, nargs="+", default=[0], help="training seeds of the TSTR classifier")
    parser.add_argument("--judge-epochs", type=int, default=15)
    parser.add_argument(
        "--second-judge", action="store_true",
        help="also judge with a plain CNN (another architecture than PEPXNet, OUT/judge_cnn.pt): a loss that steers "
        "samples through a PEPXNet (e.g. the adversarial phase's consistency term) also moves a PEPXNet judge",
    )  # fmt: skip
    parser.add_argument("--tstr-epochs", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")
    if not isinstance(overrides, dict):
        parser.error(f"--overrides must be a JSON object, got {args.overrides!r}")
    if not args.name or any(c in args.name for c in "/\\ ") or args.name.startswith("."):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    if args.tstr_temperature not in args.temperatures:
        parser.error(f"--tstr-temperature {args.tstr_temperature} is not one of --temperatures {args.temperatures}")
    args.overrides = overrides
    args.out = (args.out or args.base / "ablations").resolve()
    args.base = args.base.resolve()
    return args


def prepare_seed_dir(base: Path, seed_dir: Path) -> None:
    """``seed_dir`` with ``data/`` and ``classifier/`` linked from ``base`` (refused when they point elsewhere)."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        src, dst = base / name, seed_dir / name
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: the base run has no {name}/ folder (run the pipeline's stages first).")
        if dst.is_symlink() and dst.resolve() == src.resolve():
            continue
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(f"{dst} exists and is not a link to {src}; choose another --out or --name.")
        dst.symlink_to(src, target_is_directory=True)


def flow_stage_command(seed_dir: Path, seed: int, overrides: Mapping[str, Any], extra: Sequence[str]) -> list[str]:
    """The ``monai.bundle run`` command line of the flow stage for one seed."""
    from monai_condflow.pipeline import BUNDLE_ROOT

    configs = BUNDLE_ROOT / "configs"
    files = json.dumps([str(configs / "common.json"), str(configs / "train_flow.json")])
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE_ROOT),
        "--logging_file", str(configs / "logging.conf"), "--output_dir", str(seed_dir),
        "--dataset_dir", str(seed_dir / "data"), "--seed", str(seed), "--flow_overrides", repr(dict(overrides)),
        "--progress", "False", *extra,
    ]  # fmt: skip


def summarize(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and population standard deviation over seeds of every numeric leaf (nested dicts kept; non-finite and
    missing values left out of a leaf's statistics, ``None`` when no seed has one)."""

    def leaves(row: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        for key, value in row.items():
            if isinstance(value, Mapping):
                out.update(leaves(value, prefix + (key,)))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[prefix + (key,)] = float(value)
        return out

    flat = [leaves(row) for row in per_seed.values()]
    keys = sorted({k for row in flat for k in row}, key=lambda k: [str(p) for p in k])
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key in keys:
        values = [row[key] for row in flat if key in row and math.isfinite(row[key])]
        m = sum(values) / len(values) if values else None
        s = math.sqrt(sum((v - m) ** 2 for v in values) / len(values)) if values else None
        for target, value in ((mean, m), (std, s)):
            node = target
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = value
    return {"mean": mean, "std": std, "seeds": sorted(per_seed)}


def judge_rows(
    synthetic: torch.Tensor, overflow: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor
) -> dict[str, Any]:
    """Class agreement (overall and per class) of the judge's ``predicted`` classes with the conditioning ``labels``
    and the overflow counts (``overflow``: pixels per synthetic image that left the sane range before clamping)."""
    classes = sorted(int(c) for c in labels.unique())
    return {
        "class_agreement": float((predicted == labels).float().mean()),
        "agreement_per_class": {str(c): float((predicted[labels == c] == c).float().mean()) for c in classes},
        "images_with_overflow": int((overflow > 0).sum()),
        "overflow_pixels": int(overflow.sum()),
        "n_images": int(synthetic.shape[0]),
    }


def evaluate_seed(
    seed_dir: Path,
    judge: torch.nn.Module,
    splits: Mapping[str, Any],
    args: argparse.Namespace,
    second_judge: torch.nn.Module | None = None,
) -> dict:
    """Figures of one trained seed (see the module docstring); with ``second_judge`` each temperature's row also has
    ``second_judge``: that judge's class agreement (overall and per class) on the same synthetic slices."""
    from monai_condflow.engines.stages import load_classifier, load_flow
    from monai_condflow.evaluation.plots import image_grid
    from monai_condflow.evaluation.tstr import predict
    from monai_condflow.metrics.auc import mann_whitney_auc
    from monai_condflow.metrics.fid import fid_from_features
    from monai_condflow.metrics.sharpness import sharpness_ratio
    from monai_condflow.privacy.audits import dcr_audit, membership_inference_scores

    train, val, test = splits["train"], splits["val"], splits["test"]
    classifier, flow = load_classifier(seed_dir).eval(), load_flow(seed_dir).eval()
    if args.fit_shrinkage is not None and not flow.sampling_prior.fitted:
        with torch.no_grad():
            pairs = [(x, classifier.embed(x)) for x in train[0].split(64)]
        generator = torch.Generator().manual_seed(0)
        flow.fit_sampling_prior(pairs, shrinkage=args.fit_shrinkage, noise_generator=generator)
    bpd = {k: membership_inference_scores(flow, classifier, splits[k][0]) for k in ("train", "val", "test")}
    row: dict[str, Any] = {f"{k}_bpd": float(v[torch.isfinite(v)].mean()) for k, v in bpd.items()}
    row["mia_auc"] = mann_whitney_auc(-bpd["train"], -bpd["test"])
    with torch.no_grad():
        z = torch.cat([classifier.embed(train[0][i : i + 128]) for i in range(0, len(train[0]), 128)])
        feat_val, feat_test = judge.embed(val[0]), judge.embed(test[0])
    floor = fid_from_features(feat_val, feat_test)
    labels = train[1]
    for temperature, prior in [(t, p) for t in args.temperatures for p in args.priors]:
        generator = torch.Generator().manual_seed(1)
        parts, over = [], []
        for i in range(0, len(z), 140):
            x, stats = flow.sample(
                z[i : i + 140], temperature=temperature, generator=generator, return_stats=True, prior=prior
            )
            parts.append(x)
            over.append(stats["overflow_pixels"])
        x, overflow = torch.cat(parts), torch.cat(over)
        figures = judge_rows(x, overflow, labels, predict(judge, x))
        if second_judge is not None:
            other = judge_rows(x, overflow, labels, predict(second_judge, x))
            figures["second_judge"] = {k: other[k] for k in ("class_agreement", "agreement_per_class")}
        with torch.no_grad():
            fid = fid_from_features(judge.embed(x), feat_test)
        figures.update(
            sharpness_ratio=float(sharpness_ratio(x, train[0])), fid_ratio=fid / floor if floor > 0 else None
        )
        if temperature == args.tstr_temperature and args.tstr_seeds:
            accuracies = tstr_accuracies((x, labels), val, test, args.tstr_seeds, args.tstr_epochs)
            figures["tstr"] = sum(accuracies) / len(accuracies)
            figures["tstr_per_seed"] = {str(k): v for k, v in zip(args.tstr_seeds, accuracies)}
        dcr = dcr_audit(x, train[0], torch.cat([val[0], test[0]]))["pixel"]
        figures["dcr_closer_auc"] = dcr["closer_auc"]
        figures["near_copy_fraction"] = dcr["near_copy_fraction"]
        key = f"T{temperature:g}" if args.priors == ["auto"] else f"T{temperature:g}_{prior}"
        row[key] = figures
        pick = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in labels.unique().tolist()])
        image_grid(seed_dir / f"grid_{key}.png", torch.cat([train[0][pick], x[pick]]), nrow=8, scale=3)
    return row


def tstr_accuracies(
    synthetic: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    seeds: Sequence[int],
    epochs: int = 15,
) -> list[float]:
    """Real test accuracy, one per classifier seed, of the evaluation's classifier (PEPXNet ``small``, lr 0.002,
    batch 32, epoch selection on the real ``val``) trained on the ``synthetic`` ``(images, labels)``."""
    from monai_condflow.evaluation.tstr import predict, train_real_classifier

    kwargs = {"max_epochs": epochs, "lr": 0.002, "batch_size": 32}
    accuracies = []
    for seed in seeds:
        net = train_real_classifier(synthetic, val, network_factory=_factory, train_kwargs=kwargs, seed=seed)
        accuracies.append(float((predict(net, test[0]) == test[1]).float().mean()))
    return accuracies


def plain_cnn(in_channels: int = 1, num_classes: int = 2) -> torch.nn.Module:
    """The second judge: four conv-BatchNorm-ReLU-max-pool blocks (16-32-64-128), global average pooling, dropout 0.3
    and a linear layer (the plain CNN of the fidelity notes' anchor, which reached 0.90-0.97 on the phantom)."""
    layers: list[torch.nn.Module] = []
    channels = in_channels
    for width in (16, 32, 64, 128):
        layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]  # fmt: skip
        channels = width
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.3)]
    return torch.nn.Sequential(*layers, *head, torch.nn.Linear(channels, num_classes))


def _load_or_train(
    judge_file: Path, factory: Any, splits: Mapping[str, Any], epochs: int, name: str
) -> torch.nn.Module:
    """The judge saved in ``judge_file``, or one built by ``factory`` and trained once on the true labels (the
    evaluation's recipe, epoch selection on validation) and saved there; prints its real test accuracy."""
    from monai_condflow.evaluation.tstr import predict, train_real_classifier
    from monai_condflow.utils.io import atomic_torch_save

    judge = factory()
    if judge_file.is_file():
        judge.load_state_dict(torch.load(judge_file, weights_only=True))
    else:
        kwargs = {"max_epochs": epochs, "lr": 0.002, "batch_size": 32}
        judge = train_real_classifier(splits["train"], splits["val"], network_factory=factory, train_kwargs=kwargs)
        atomic_torch_save(judge.state_dict(), judge_file)
    judge.eval()
    test = splits["test"]
    print(f"{name}: real test accuracy {float((predict(judge, test[0]) == test[1]).float().mean()):.3f}", flush=True)
    return judge


def load_or_train_second_judge(out: Path, splits: Mapping[str, Any], epochs: int = 30) -> torch.nn.Module:
    """The plain-CNN judge of ``out/judge_cnn.pt`` (:func:`plain_cnn`, trained once)."""
    return _load_or_train(out / "judge_cnn.pt", plain_cnn, splits, epochs, "second judge")


def _factory() -> torch.nn.Module:
    from monai_condflow.networks.nets import PEPXNet

    return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)


def load_or_train_judge(out: Path, splits: Mapping[str, Any], epochs: int) -> torch.nn.Module:
    """The PEPXNet true-label judge of ``out/judge.pt`` (trained once)."""
    return _load_or_train(out / "judge.pt", _factory, splits, epochs, "judge")


def splits_and_judge(args: argparse.Namespace, judge_dir: Path | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """The set-up every judging script shares: create ``args.out``, read the base run's splits (``args.base``) and load
    (or train, ``args.judge_epochs``) the true-label judge of ``judge_dir`` (default ``args.out``)."""
    args.out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(args.base)
    return splits, load_or_train_judge(judge_dir or args.out, splits, args.judge_epochs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    splits, judge = splits_and_judge(args)
    second = load_or_train_second_judge(args.out, splits) if args.second_judge else None
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        seed_dir = args.out / f"{args.name}_s{seed}"
        prepare_seed_dir(args.base, seed_dir)
        t0 = time.perf_counter()
        if not (seed_dir / "flow" / "model.pt").is_file():
            cmd = flow_stage_command(seed_dir, seed, args.overrides, args.bundle_args)
            with open(seed_dir / "flow_stage.log", "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
            if rc != 0:
                print(f"{args.name} seed {seed}: flow stage failed (rc {rc}), see {seed_dir / 'flow_stage.log'}")
                return rc
        train_s = time.perf_counter() - t0
        per_seed[seed] = evaluate_seed(seed_dir, judge, splits, args, second)
        per_seed[seed]["train_s"] = train_s
        print(f"{args.name} seed {seed}: {json.dumps(per_seed[seed])}", flush=True)
    result = {"name": args.name, "overrides": args.overrides, "bundle_args": args.bundle_args, "per_seed": per_seed}
    result["summary"] = summarize(per_seed)
    from monai_condflow.utils.io import atomic_write_text

    atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    print("ABLATE_FLOW " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
