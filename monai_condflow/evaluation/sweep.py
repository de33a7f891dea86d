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
"""Label-scarcity sweep: the whole semi-supervised pipeline at several label levels, one table and one plot.

Usage::

    python -m monai_condflow.evaluation.sweep DATASET_DIR --output-dir runs/sweep \\
        [--levels 20 50 0.005 0.01 0.05 all] [--stage-set flow.max_epochs=30] [--baseline-at all]

Every level runs :func:`monai_condflow.pipeline.run_pipeline` into ``OUTPUT_DIR/labels_<level>``; a level whose
``metrics.json`` already exists is not run again, so a killed sweep resumes where it stopped. The summary goes to
``OUTPUT_DIR/sweep.md``, ``OUTPUT_DIR/sweep.json`` and ``OUTPUT_DIR/figures/label_sweep.png`` (and
``label_sweep.pdf`` beside it: accuracy against the number of labels on a log axis).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_condflow.engines.run_folder import pid_alive
from monai_condflow.evaluation.plots import label_sweep_chart
from monai_condflow.pipeline import (
    BUNDLE_ROOT,
    CPU_BUDGET,
    default_stages,
    num_labels_arg,
    parse_stage_overrides,
    run_pipeline,
)
from monai_condflow.progress import ProgressLog
from monai_condflow.utils.io import atomic_write_text

__all__ = ["DEFAULT_LEVELS", "level_name", "labelled_count", "summarize_sweep", "run_label_sweep", "main"]

logger = logging.getLogger(__name__)

DEFAULT_LEVELS: tuple[object, ...] = (20, 50, 0.005, 0.01, 0.05, "all")


def level_name(level: object) -> str:
    """Folder-safe name of a label level: ``20`` -> ``"20"``, ``0.05`` -> ``"5pct"``, ``"all"`` -> ``"all"``."""
    if level == "all":
        return "all"
    if isinstance(level, float) and level < 1:
        return f"{100 * level:g}pct".replace(".", "p")
    return str(int(level))


def labelled_count(level: object, n_train: int, num_classes: int = 2) -> int:
    """Labels the level asks for on ``n_train`` training images (fractions round, at least one per class)."""
    if level == "all":
        return n_train
    if isinstance(level, float) and level < 1:
        return min(n_train, max(num_classes, round(level * n_train)))
    return min(n_train, int(level))


def summarize_sweep(results: Mapping[str, Mapping[str, Any]], n_train: int | None = None) -> dict[str, Any]:
    """Rows of the sweep table from ``level name -> metrics.json`` dicts.

    Each row holds the level, the TSTR / TRTR accuracy and macro-F1 (mean and std), the FID and the TSTR accuracy
    relative to the ``all``-label level (``tstr_vs_all``; ``None`` when that level is missing).
    """
    full = results.get("all")
    full_acc = full["tstr"]["accuracy"] if full else None
    rows = []
    for name, m in results.items():
        row = {
            "level": name,
            "num_labels": m.get("num_labels"),
            "tstr_accuracy": m["tstr"]["accuracy"],
            "tstr_accuracy_std": m["tstr"].get("accuracy_std"),
            "tstr_f1": m["tstr"]["f1"],
            "trtr_accuracy": m["trtr"]["accuracy"],
            "trtr_accuracy_std": m["trtr"].get("accuracy_std"),
            "trtr_f1": m["trtr"]["f1"],
            "fid": m["fid"],
            "presumptive_accuracy": m.get("presumptive_accuracy"),
            "tstr_vs_all": (m["tstr"]["accuracy"] / full_acc) if full_acc else None,
        }
        rows.append(row)
    return {"rows": rows, "n_train": n_train}


def _pct(v: Any, std: Any = None) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{100 * v:.2f}" + (f" ± {100 * std:.2f}" if isinstance(std, (int, float)) else "")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _markdown(summary: Mapping[str, Any], times: Mapping[str, float]) -> str:
    lines = [
        "# Label-scarcity sweep",
        "",
        "TSTR / TRTR accuracy (%) on the real test split, mean ± std over test-set bootstraps and synthetic sets.",
        "",
        "| labels | labelled images | presumptive-label accuracy | TRTR accuracy | TSTR accuracy | TSTR macro-F1 | "
        "FID | TSTR / TSTR(all) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        pres = r["presumptive_accuracy"]
        rel = r["tstr_vs_all"]
        lines.append(
            f"| {r['level']} | {r['num_labels'] if r['num_labels'] is not None else '-'} | "
            f"{f'{pres:.3f}' if isinstance(pres, (int, float)) else '-'} | "
            f"{_pct(r['trtr_accuracy'], r['trtr_accuracy_std'])} | "
            f"{_pct(r['tstr_accuracy'], r['tstr_accuracy_std'])} | "
            f"{_pct(r['tstr_f1'])} | {_num(r['fid'])} | {f'{rel:.3f}' if rel is not None else '-'} | "
            f"{times.get(r['level'], float('nan')):.0f} |"
        )
    lines += ["", "![label sweep](figures/label_sweep.png)", ""]
    return "\n".join(lines)


def _presumptive_accuracy(run_dir: Path) -> float | None:
    """Accuracy of the last round's presumptive labels (from ``classifier/classifier.json``), if recorded."""
    info = run_dir / "classifier" / "classifier.json"
    if not info.is_file():
        return None
    rounds = json.loads(info.read_text()).get("rounds") or []
    value = rounds[-1].get("presumptive_accuracy") if rounds else None
    return float(value) if isinstance(value, (int, float)) else None


def run_label_sweep(
    dataset_dir: Path,
    output_dir: Path,
    levels: Sequence[object] = DEFAULT_LEVELS,
    budget: dict[str, dict[str, object]] | None = None,
    overrides: dict[str, object] | None = None,
    baseline_at: Sequence[object] = (),
    seed: int = 0,
    bundle_root: Path = BUNDLE_ROOT,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline at every label level (resuming finished levels) and write the sweep summary.

    Args:
        dataset_dir: COVIDx-CT-format dataset folder.
        output_dir: sweep folder; each level runs in ``labels_<level>``.
        levels: label levels (counts, fractions in (0, 1) or ``"all"``).
        budget: per-stage overrides (default :data:`~monai_condflow.pipeline.CPU_BUDGET`).
        overrides: bundle overrides for every stage (``seed`` is added).
        baseline_at: levels at which the ACGAN baseline also runs.
        seed: seed of every stage.
        bundle_root: the bundle whose configs the stages run (default: the one installed with the package).
        progress: print ``[sweep] levels: done/total levels, ETA`` after each level run here, and pass
            ``progress=False`` to the stages when off.

    Returns:
        The summary written to ``sweep.json`` (``rows``, ``times``, ``levels``).
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    times: dict[str, float] = {}
    legacy_times = output_dir / "sweep_times.json"  # one shared file in earlier versions
    if legacy_times.is_file():
        times.update(json.loads(legacy_times.read_text()))
    if not progress:
        overrides = {**(overrides or {}), "progress": False}
    to_run = [v for v in levels if not (output_dir / f"labels_{level_name(v)}" / "metrics.json").is_file()]
    bar = ProgressLog(
        len(to_run), "[sweep] levels", unit="levels", enabled=progress, interval=0.0, log=lambda t: print(t, flush=True)
    )
    for level in levels:
        name = level_name(level)
        run_dir = output_dir / f"labels_{name}"
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            print(f"[sweep] level {name}: found {metrics_file}, not run again", flush=True)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not _claim_level(run_dir):
                print(
                    f"[sweep] level {name}: another sweep process is running it ({run_dir / LOCK_NAME}); skipped here,"
                    " run the sweep again once it has finished to include it in the summary",
                    flush=True,
                )
                continue
            try:
                print(f"[sweep] level {name}: running the pipeline into {run_dir}", flush=True)
                t0 = time.perf_counter()
                stages = default_stages(level, budget, baseline=level in baseline_at)
                run_pipeline(
                    dataset_dir,
                    run_dir,
                    level,
                    {"seed": seed, **(overrides or {})},
                    stages=stages,
                    seed=seed,
                    bundle_root=bundle_root,
                )
                # one file per level, so that sweeps of different levels can run side by side into one folder
                atomic_write_text(run_dir / "sweep_time.json", json.dumps({"seconds": time.perf_counter() - t0}) + "\n")
            finally:
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
            bar.update()
        level_time = run_dir / "sweep_time.json"
        if level_time.is_file():
            times[name] = json.loads(level_time.read_text())["seconds"]
        metrics = json.loads(metrics_file.read_text())
        metrics["presumptive_accuracy"] = _presumptive_accuracy(run_dir)
        metrics["num_labels"] = _labels_used(run_dir)
        results[name] = metrics
    summary = summarize_sweep(results)
    summary["times"] = {k: v for k, v in times.items() if k in results}
    summary["levels"] = [level_name(v) for v in levels]
    train_list = Path(dataset_dir) / "train.txt"
    n_all = sum(1 for line in train_list.read_text().splitlines() if line.strip()) if train_list.is_file() else None
    label_sweep_chart(output_dir / "figures" / "label_sweep.png", summary["rows"], n_all=n_all)
    atomic_write_text(output_dir / "sweep.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write_text(output_dir / "sweep.md", _markdown(summary, times) + "\n")
    return summary


LOCK_NAME = "sweep.lock"
"""File in ``labels_<level>`` that marks a level as being run by a live sweep process (its pid inside)."""


def _claim_level(run_dir: Path) -> bool:
    """Create ``run_dir/sweep.lock`` for this process; ``False`` if a live process holds it (a dead one's is taken)."""
    lock = run_dir / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder > 0 and holder != os.getpid() and pid_alive(holder):
                return False
            logger.warning("sweep: taking over the stale lock %s (process %s is gone)", lock, holder or "unknown")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _labels_used(run_dir: Path) -> int | None:
    """Number of true labels the classifier stage used (entries of ``train_labels.json`` not presumptive)."""
    listing = run_dir / "classifier" / "train_labels.json"
    if not listing.is_file():
        return None
    return sum(1 for entry in json.loads(listing.read_text()) if not entry.get("presumptive", False))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_condflow.evaluation.sweep",
        description="Label-scarcity sweep: the whole semi-supervised pipeline at several label levels, one table "
        "(OUTPUT_DIR/sweep.md, sweep.json) and one plot (OUTPUT_DIR/figures/label_sweep.png). Finished levels are "
        "not run again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset_dir", type=Path, help="COVIDx-CT-format dataset folder")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/sweep"), help="sweep folder; level L runs in labels_L"
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        type=num_labels_arg,
        default=list(DEFAULT_LEVELS),
        help="label levels: counts, fractions in (0, 1) or all",
    )
    parser.add_argument(
        "--stage-set",
        action="append",
        default=[],
        metavar="STAGE.ID=VALUE",
        help="override for one stage at every level, e.g. flow.max_epochs=30 (repeatable)",
    )
    parser.add_argument(
        "--baseline-at", nargs="*", type=num_labels_arg, default=[], help="levels at which the ACGAN also runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument(
        "--bundle-root",
        type=Path,
        default=BUNDLE_ROOT,
        help="the MONAI bundle whose configs/ the stages run (default: the bundle installed with the package)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress lines (levels done, ETA; stages: --set progress=false)"
    )
    args = parser.parse_args(argv)
    try:
        budget = parse_stage_overrides(args.stage_set, CPU_BUDGET)
    except ValueError as e:
        parser.error(str(e))
    try:
        summary = run_label_sweep(
            args.dataset_dir,
            args.output_dir,
            args.levels,
            budget,
            baseline_at=args.baseline_at,
            seed=args.seed,
            bundle_root=args.bundle_root,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, RuntimeError) as e:
        print(f"[sweep] error: {e}", file=sys.stderr)
        return 1
    print((Path(args.output_dir) / "sweep.md").read_text())
    print(f"[sweep] {len(summary['rows'])} levels; summary in {Path(args.output_dir).resolve() / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
