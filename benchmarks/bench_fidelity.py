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
"""Fidelity benchmark (issue 14): the bundle stages at the main job's budget, three flow-training seeds per dataset.

Datasets (``--datasets``):

- ``phantom50``: the embedded phantom (600 slices, seed 0, as the main job) with 50 labels (semi-supervised path);
- ``phantom_all``: the same phantom with all labels;
- ``ucsd``: ``../shared/data/ucsd_covid_ct_64.npz`` (official patient-disjoint split, all labels, flow from scratch),
  exported once to a COVIDx-CT-format folder in ``OUTPUT_DIR/data/ucsd`` (as ``python -m
  monai_condflow.data.export`` does); skipped with a message when the file is absent.

Every run goes through :func:`monai_condflow.pipeline.run_pipeline` with :func:`~monai_condflow.pipeline.default_stages`
at :data:`~monai_condflow.pipeline.CPU_BUDGET` into ``OUTPUT_DIR/<dataset>/seed_<s>``. The dataset and the
classifier stage stay fixed; ``--seeds`` only changes the ``seed`` of the flow stage (its initialisation, data order
and noise; ``--seed-scope all`` gives it to every stage instead). A finished run (``bench_run.json``) is reused unless
``--force``.

Per dataset the script prints mean +- std over the seeds and every seed: TRTR, TSTR, their gap, class agreement of
the real-trained evaluation classifier on the synthetic images next to its real test accuracy, FID / floor, samples
overflowed before clamping, membership-inference AUC, presumptive-label accuracy, wall time and the largest
epoch-to-epoch rise of the flow's bits/dim (train epoch means and ``val_bpd`` from its TensorBoard scalars). With
``--baseline`` the ACGAN runs too and its TSTR / FID are printed next to the flow's. The last line is
``BENCH_FIDELITY {json}``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --output-dir runs/bench_fidelity
    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --datasets ucsd --seeds 0 1 2 --baseline
    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --quick   # tiny smoke run (minutes, meaningless figures)
    # the adversarial recipe (docs/networks.md) instead of the main job's likelihood-only flow
    OMP_NUM_THREADS=1 python benchmarks/bench_fidelity.py --datasets ucsd --baseline --output-dir runs/bench_adv \
        --stage-set flow.adversarial_steps=1200 --stage-set flow.adversarial_batch_size=16

``--stage-set STAGE.ID=VALUE`` (as the pipeline's) applies to every run; it is recorded in each run's
``bench_run.json``, and a finished run made with other settings is neither reused nor copied from.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "FIGURES",
    "QUICK_BUDGET",
    "format_summary",
    "main",
    "flow_scalars",
    "max_bpd_rise",
    "parse_args",
    "run_row",
    "summarize",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UCSD = REPO.parent / "shared" / "data" / "ucsd_covid_ct_64.npz"

DATASETS: dict[str, dict[str, Any]] = {
    "phantom50": {"data": "phantom", "num_labels": 50},
    "phantom_all": {"data": "phantom", "num_labels": "all"},
    "ucsd": {"data": "ucsd", "num_labels": "all"},
}

# (key, label, format) of the per-run figures, in print order; fractions are printed in %
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("trtr", "TRTR %", "pct"),
    ("tstr", "TSTR %", "pct"),
    ("gap_points", "gap pts", "num1"),
    ("class_agreement", "agree %", "pct"),
    ("agreement_judge_spread", "agree judges max-min %", "pct"),
    ("real_test_accuracy", "real acc %", "pct"),
    ("blurred_agreement", "blurred real agree %", "pct"),
    ("sharpness_ratio", "detail syn/real", "num3"),
    ("lattice_peak", "lattice", "num3"),
    ("fid_ratio", "FID/floor", "num3"),
    ("overflowed_images", "overflow", "int"),
    ("mia_auc", "MIA AUC", "num3"),
    ("presumptive_accuracy", "presump %", "pct"),
    ("wall_s", "wall s", "int"),
    ("max_bpd_rise", "max bpd rise", "num3"),
    ("baseline_tstr", "ACGAN TSTR %", "pct"),
    ("baseline_fid_ratio", "ACGAN FID/floor", "num3"),
)

# every stage at a token budget: checks that the whole chain runs, says nothing about fidelity
QUICK_BUDGET: dict[str, dict[str, object]] = {
    "classifier": {"max_epochs": 1, "epochs_per_round": 1, "max_rounds": 1},
    "flow": {
        "max_epochs": 2,
        "sample_every": 1,
        "adversarial_steps": 2,
        "flow_overrides": {"num_levels": 2, "num_steps": 2, "num_blocks": 1, "hidden_channels": 8},
    },
    "generation": {},
    "acgan": {"max_epochs": 1},
    "evaluation": {"max_epochs": 1, "n_synthetic_sets": 1, "n_bootstrap": 5, "augmentation": False},
}
QUICK_COMMON: dict[str, object] = {"image_size": 32, "batch_size": 16}


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def max_bpd_rise(scalars: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]]) -> dict[str, Any]:
    """Largest increase of the flow's bits/dim between consecutive epochs.

    ``val_bpd`` is one value per epoch; ``train_bpd`` (one value per iteration) is averaged per epoch first, the
    iterations per epoch being ``last iteration / epochs`` (epochs = the ``val_bpd`` steps). A non-finite value counts
    as an infinite rise.

    Args:
        scalars: ``{run: {tag: (steps, values)}}`` as from
            :func:`~monai_condflow.evaluation.report.read_tensorboard_scalars` of the flow's TensorBoard folder.

    Returns:
        ``{"max_rise": float | None, "train": float | None, "val": float | None, "epochs": int | None}`` (``None``
        where the series is missing or shorter than two epochs; ``inf`` for a non-finite epoch).
    """

    def rise(values: Sequence[float]) -> float | None:
        if len(values) < 2:
            return None
        if not all(math.isfinite(v) for v in values):
            return math.inf
        return max(b - a for a, b in zip(values[:-1], values[1:]))

    val_series: list[tuple[list[int], list[float]]] = []
    train_series: list[tuple[list[int], list[float]]] = []
    for tags in scalars.values():
        for tag, (steps, values) in tags.items():
            name = tag.rsplit("/", 1)[-1].lower()
            if name == "val_bpd":
                val_series.append((list(steps), [float(v) for v in values]))
            elif name == "train_bpd":
                train_series.append((list(steps), [float(v) for v in values]))
    epochs = None
    val_rise = None
    if val_series:
        steps, values = max(val_series, key=lambda s: len(s[0]))
        order = sorted(range(len(steps)), key=lambda i: steps[i])
        epochs = max(steps) if steps else None
        val_rise = rise([values[i] for i in order])
    train_rise = None
    if train_series:
        steps, values = max(train_series, key=lambda s: len(s[0]))
        n_epochs = epochs or 1
        per_epoch = max(1, math.ceil(max(steps) / n_epochs)) if steps else 1
        buckets: dict[int, list[float]] = {}
        for s, v in zip(steps, values):
            buckets.setdefault((max(int(s), 1) - 1) // per_epoch, []).append(v)
        means = [sum(b) / len(b) for _, b in sorted(buckets.items())]
        train_rise = rise(means)
    rises = [r for r in (train_rise, val_rise) if r is not None]
    return {"max_rise": max(rises) if rises else None, "train": train_rise, "val": val_rise, "epochs": epochs}


def run_row(metrics: Mapping[str, Any], wall_s: float | None, bpd: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark figures of one run from its ``metrics.json`` (through
    :func:`~monai_condflow.evaluation.report.headline_figures`), its wall time and :func:`max_bpd_rise`.

    Returns:
        ``{key: value}`` for every key of :data:`FIGURES` (accuracies / agreement as fractions; ``None`` where not
        measured) plus ``n_images``, ``overflow_pixel_fraction``, ``fid`` and ``baseline_fid``.
    """
    from monai_condflow.evaluation.report import headline_figures

    h = headline_figures(metrics)
    base = h.get("baseline") or {}
    judged = h.get("class_agreement_per_judge") or []  # with several evaluation classifiers: how far apart they are
    return {
        "trtr": h["trtr_accuracy"],
        "tstr": h["tstr_accuracy"],
        "gap_points": h["gap_points"],
        "class_agreement": h["class_agreement"],
        "agreement_judge_spread": None if len(judged) < 2 or None in judged else max(judged) - min(judged),
        "real_test_accuracy": h["real_test_accuracy"],
        "blurred_agreement": h.get("class_agreement_real_blurred"),
        "sharpness_ratio": h.get("sharpness_ratio"),
        "lattice_peak": h.get("lattice_peak"),
        "fid": h["fid"],
        "fid_ratio": h["fid_ratio"],
        "overflowed_images": h["images_with_overflow"],
        "n_images": h["n_images"],
        "overflow_pixel_fraction": h["overflow_pixel_fraction"],
        "mia_auc": h["mia_auc"],
        "presumptive_accuracy": h["presumptive_accuracy"],
        "wall_s": _finite(wall_s),
        "max_bpd_rise": None if bpd is None else bpd.get("max_rise"),
        "baseline_tstr": base.get("tstr_accuracy"),
        "baseline_fid": base.get("fid"),
        "baseline_fid_ratio": base.get("fid_ratio"),
    }


def summarize(rows: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> dict[str, Any]:
    """Mean and (population) std over the seeds of every figure, per dataset.

    Args:
        rows: ``{dataset: {seed: run_row(...)}}``.

    Returns:
        ``{dataset: {"seeds": [...], "mean": {key: float | None}, "std": {key: float | None}, "per_seed": {seed:
        row}}}``; a figure missing (``None``) in some seeds is averaged over the others; an infinite one (a diverged
        bits/dim) makes the mean infinite.
    """
    out: dict[str, Any] = {}
    for name, per_seed in rows.items():
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        keys = [k for k, _, _ in FIGURES] + ["n_images", "fid", "baseline_fid"]
        for key in keys:
            vals = [float(r[key]) for r in per_seed.values() if isinstance(r.get(key), (int, float))]
            if not vals:
                mean[key] = std[key] = None
            elif not all(math.isfinite(v) for v in vals):
                mean[key], std[key] = math.inf, None
            else:
                mean[key] = statistics.fmean(vals)
                std[key] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out[name] = {"seeds": list(per_seed), "mean": mean, "std": std, "per_seed": dict(per_seed)}
    return out


def _fmt(value: Any, kind: str, std: Any = None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    scale = 100.0 if kind == "pct" else 1.0
    digits = {"pct": 1, "num1": 1, "num3": 3, "int": 0}[kind]
    text = f"{scale * value:.{digits}f}"
    if std is not None and isinstance(std, (int, float)) and math.isfinite(std):
        text += f" +- {scale * std:.{digits}f}"
    return text


def format_summary(summary: Mapping[str, Any], baseline: bool = False) -> str:
    """Plain-text tables of :func:`summarize`: per dataset the mean +- std row, then one row per seed."""
    figures = [f for f in FIGURES if baseline or not f[0].startswith("baseline_")]
    lines = []
    for name, block in summary.items():
        lines.append(f"== {name} ({len(block['seeds'])} flow seed(s): {', '.join(str(s) for s in block['seeds'])})")
        header = ["run"] + [label for _, label, _ in figures]
        table = [["mean +- std"] + [_fmt(block["mean"][k], kind, block["std"][k]) for k, _, kind in figures]]
        for seed, row in block["per_seed"].items():
            cells = []
            for k, _, kind in figures:
                cell = _fmt(row.get(k), kind)
                if k == "overflowed_images" and row.get("n_images") is not None and row.get(k) is not None:
                    cell = f"{row[k]}/{row['n_images']}"
                cells.append(cell)
            table.append([f"seed {seed}"] + cells)
        widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
        lines.append("")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    return obj


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="bench_fidelity.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=list(DATASETS),
        default=None,
        help=f"default: all of {', '.join(DATASETS)} (--quick: phantom50)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="flow seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench_fidelity"))
    parser.add_argument("--baseline", action="store_true", help="also train the ACGAN and print its TSTR / FID")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: token epochs, 32 px, small phantom")
    parser.add_argument(
        "--seed-scope",
        choices=("flow", "all"),
        default="flow",
        help="which stages get the seed (default: the flow stage only; the data never changes)",
    )
    parser.add_argument("--ucsd-npz", type=Path, default=DEFAULT_UCSD, help="UCSD COVID-CT npz (64 px)")
    parser.add_argument("--num-images", type=int, default=None, help="phantom slices (default 600; --quick: 240)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs instead of reusing them")
    parser.add_argument(
        "--stage-set",
        action="append",
        default=[],
        metavar="STAGE.ID=VALUE",
        help="override for one stage in every run, as the pipeline's --stage-set (repeatable), e.g. "
        "--stage-set flow.adversarial_steps=1200 --stage-set flow.adversarial_batch_size=16 (the adversarial recipe)",
    )
    parser.add_argument(
        "--retrain-classifier",
        action="store_true",
        help="with --seed-scope flow, train the classifier in every seed's run (default: the first seed's classifier "
        "stage, which does not depend on the flow seed, is copied into the other runs)",
    )
    args = parser.parse_args(argv)
    if args.datasets is None:
        args.datasets = ["phantom50"] if args.quick else list(DATASETS)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.num_images is None:
        args.num_images = 240 if args.quick else 600
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    from monai_condflow.pipeline import CPU_BUDGET, parse_stage_overrides

    try:
        parse_stage_overrides(args.stage_set, CPU_BUDGET)
    except ValueError as e:
        parser.error(f"--stage-set: {e}")
    if any(item.partition("=")[0] == "flow.seed" for item in args.stage_set):
        parser.error("--stage-set flow.seed: the flow seeds are --seeds")
    return args


def _dataset_dir(kind: str, args: argparse.Namespace) -> Path | None:
    """The COVIDx-CT-format folder of ``kind`` under ``OUTPUT_DIR/data`` (made once), or ``None`` to skip it."""
    data_root = args.output_dir.resolve() / "data"
    if kind == "phantom":
        from monai_condflow.data.phantom import generate_phantom_dataset

        folder = data_root / f"phantom_{args.num_images}"
        info = folder / "dataset.json"
        if not (info.is_file() and json.loads(info.read_text()).get("num_images") == args.num_images):
            t0 = time.perf_counter()
            size = {"image_size": 128} if args.quick else {}  # the main job's phantom has the default size
            generate_phantom_dataset(folder, num_images=args.num_images, seed=0, overwrite=True, num_workers=2, **size)
            print(f"[bench] phantom: {args.num_images} slices in {folder} ({time.perf_counter() - t0:.0f} s)")
        return folder
    if not args.ucsd_npz.is_file():
        print(f"[bench] ucsd skipped: {args.ucsd_npz} not found (the shared data folder ../shared is absent)")
        return None
    folder = data_root / "ucsd"
    if not all((folder / f"{s}.txt").is_file() for s in ("train", "val", "test")):
        from monai_condflow.data.export import main as export_main

        export_main(["--npz", str(args.ucsd_npz), "--out", str(folder)])
    return folder


def _run_one(name: str, dataset_dir: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One pipeline run (or the saved result of a finished one): ``run_row`` plus the run folder."""
    from monai_condflow.evaluation.report import read_tensorboard_scalars
    from monai_condflow.pipeline import CPU_BUDGET, default_stages, parse_stage_overrides, run_pipeline

    run_dir = args.output_dir.resolve() / name / f"seed_{seed}"
    saved = run_dir / "bench_run.json"
    if saved.is_file() and not args.force:
        result = json.loads(saved.read_text())
        if sorted(result.get("stage_set", [])) != sorted(args.stage_set):
            raise RuntimeError(
                f"{saved} was run with --stage-set {result.get('stage_set', [])}, not {args.stage_set}: give another "
                "--output-dir, or --force to run it again"
            )
        print(f"[bench] {name} seed {seed}: reusing {saved}")
        return result
    num_labels = DATASETS[name]["num_labels"]
    budget = parse_stage_overrides(args.stage_set, copy.deepcopy(QUICK_BUDGET if args.quick else CPU_BUDGET))
    overrides: dict[str, object] = dict(QUICK_COMMON) if args.quick else {}
    if args.seed_scope == "all":
        overrides["seed"] = seed
    else:
        budget.setdefault("flow", {})["seed"] = seed
    stages = default_stages(num_labels, budget, baseline=args.baseline)
    t0 = time.perf_counter()
    reused = None
    if args.seed_scope == "flow" and not args.retrain_classifier:
        reused = _reuse_classifier(args.output_dir.resolve() / name, run_dir, args.stage_set)
    if reused is not None:
        stages = stages[1:]  # the classifier stage (data and seed fixed) is the copied one
        print(f"[bench] {name} seed {seed}: classifier stage copied from {reused}", flush=True)
    print(f"[bench] {name} seed {seed}: {len(stages)} stages into {run_dir}", flush=True)
    times = run_pipeline(dataset_dir, run_dir, num_labels, overrides, stages=stages, seed=0)
    wall = time.perf_counter() - t0
    if reused is not None:  # the copied stage's own time counts: the row's wall time stays a whole run's
        first_stage, seconds = next(
            iter(json.loads((reused.parent / "bench_run.json").read_text())["stage_seconds"].items())
        )
        times = {f"{first_stage} (copied)": seconds, **times}
        wall += seconds
    metrics = json.loads((run_dir / "metrics.json").read_text())
    bpd = max_bpd_rise(flow_scalars(run_dir, read_tensorboard_scalars))
    row = run_row(metrics, wall, bpd)
    result = {"row": row, "stage_seconds": times, "bpd": bpd, "run_dir": str(run_dir), "stage_set": args.stage_set}
    saved.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    return result


def _reuse_classifier(dataset_root: Path, run_dir: Path, stage_set: Sequence[str] = ()) -> Path | None:
    """Copy the classifier stage of a finished run of the same dataset (another flow seed) into ``run_dir``.

    With ``--seed-scope flow`` the classifier stage gets the same data, labels and seed in every run, so its outputs
    (``classifier/``: weights, presumptive labels, stage info; its TensorBoard folder) are the same; copying them
    saves one classifier training per extra seed. Only a run made with the same ``stage_set`` (``--stage-set``) is
    copied from. Returns the copied folder, or ``None`` when no such finished run has one or ``run_dir`` already has
    a classifier.
    """
    import shutil

    if (run_dir / "classifier").exists():
        return None
    for other in sorted(dataset_root.glob("seed_*")):
        source = other / "classifier"
        done = other / "bench_run.json"
        if other == run_dir or not done.is_file() or not (source / "classifier.json").is_file():
            continue
        if sorted(json.loads(done.read_text()).get("stage_set", [])) == sorted(stage_set):
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, run_dir / "classifier")
            tb = other / "tensorboard" / "classifier"
            if tb.is_dir():
                shutil.copytree(tb, run_dir / "tensorboard" / "classifier")
            return source
    return None


def flow_scalars(run_dir: Path, reader: Any) -> dict[str, Any]:
    """The flow stage's TensorBoard scalars of a run: ``RUN/tensorboard/flow`` (runs from before the one-root layout:
    ``RUN/flow/tensorboard``), read with ``reader``.

    Raises:
        FileNotFoundError: when neither folder holds a ``train_bpd`` or ``val_bpd`` series, so that the benchmark's
            bits/dim-spike figure is never silently empty.
    """
    for folder in (run_dir / "tensorboard" / "flow", run_dir / "flow" / "tensorboard"):
        if folder.is_dir():
            scalars = reader(folder)
            tags = {t.rsplit("/", 1)[-1].lower() for run in scalars.values() for t in run}
            if tags & {"train_bpd", "val_bpd"}:
                return scalars
    raise FileNotFoundError(f"no flow bits/dim scalars under {run_dir / 'tensorboard' / 'flow'}")


def _restore_inf(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (math.inf if v == "inf" else v) for k, v in row.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    for name in args.datasets:
        dataset_dir = _dataset_dir(DATASETS[name]["data"], args)
        if dataset_dir is None:
            skipped[name] = f"{args.ucsd_npz} not found"
            continue
        for seed in args.seeds:
            try:
                result = _run_one(name, dataset_dir, seed, args)
            except (FileNotFoundError, RuntimeError) as e:
                print(f"[bench] {name} seed {seed} failed: {e}", file=sys.stderr)
                skipped[f"{name} seed {seed}"] = str(e)
                continue
            rows.setdefault(name, {})[seed] = _restore_inf(result["row"])
    summary = summarize(rows)
    print()
    print(format_summary(summary, baseline=args.baseline))
    for what, why in skipped.items():
        print(f"[bench] skipped {what}: {why}")
    payload = {
        "datasets": summary,
        "skipped": skipped,
        "quick": args.quick,
        "seed_scope": args.seed_scope,
        "baseline": args.baseline,
        "stage_set": args.stage_set,
        "wall_s": time.perf_counter() - t0,
    }
    (args.output_dir / "bench_fidelity.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    print("BENCH_FIDELITY " + json.dumps(_json_safe(payload), separators=(",", ":")))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
