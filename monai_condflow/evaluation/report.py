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
"""Evaluation report (``report.md`` + ``metrics.json``) and the end-to-end :func:`run_evaluation` of a trained run.

The stage models are found and loaded by :mod:`.checkpoints`, the training curves read by :mod:`.tensorboard`.

``metrics.json`` always holds ``trtr`` and ``tstr`` objects with ``accuracy``, ``f1``, ``precision``, ``recall``
(fractions, plus ``*_std``) and ``fid`` (a number); ``baseline`` holds the same keys when the ACGAN baseline was
evaluated. Both files are written atomically (temporary file + ``os.replace``).

Read TSTR beside the FID-to-floor ratio, the class agreement and the sample grids: a generator of class-correlated
textures can reach a respectable TSTR without producing anatomy (see the peer comparison in ``docs/results.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from monai_condflow.data.datalists import check_shared_images
from monai_condflow.engines.generation import (
    check_class_names,
    generate_tensors,
    pixel_range_stats,
    summarize_sample_stats,
)
from monai_condflow.engines.stage_io import presumptive_label_summary
from monai_condflow.engines.stages import privacy_spent
from monai_condflow.evaluation.augmentation import augmentation_study, plot_augmentation
from monai_condflow.evaluation.checkpoints import find_model_checkpoint, load_module
from monai_condflow.evaluation.headline_checks import (
    class_name,
    finite_or_none,
    headline_check_lines,
    headline_checks,
)
from monai_condflow.evaluation.plots import bar_chart, image_grid, line_chart
from monai_condflow.evaluation.tensorboard import read_tensorboard_scalars
from monai_condflow.evaluation.tstr import (
    METRIC_KEYS,
    ImageSet,
    as_image_set,
    default_fit_fn,
    evaluate_tstr,
    train_real_classifiers,
)
from monai_condflow.metrics.fid import (
    check_fid_sample_size,
    extract_features,
    fid_from_features,
    fid_to_floor_ratio,
)
from monai_condflow.networks.nets import ConditionalGlow, PEPXNet
from monai_condflow.networks.nets.acgan import ACGANGenerator
from monai_condflow.privacy.audits import dcr_audit, membership_inference_auc, privacy_section, privacy_summary
from monai_condflow.utils.checks import check_positive_int
from monai_condflow.utils.io import MODEL_FILE, atomic_write_text, shareable_file_mode  # noqa: F401  (re-exported)

__all__ = [
    "atomic_write_text",
    "check_evaluation_data",
    "default_classifier_factory",
    "shareable_file_mode",
    "find_model_checkpoint",
    "headline_figures",
    "load_module",
    "read_tensorboard_scalars",
    "run_evaluation",
    "sample_synthetic_set",
    "write_report",
]

logger = logging.getLogger(__name__)


def _pct(scores: Mapping[str, Any], key: str) -> str:
    v, s = scores.get(key), scores.get(f"{key}_std")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.2f} ± {100 * s:.2f}" if isinstance(s, (int, float)) and math.isfinite(s) else f"{100 * v:.2f}"


def _num(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _check_metrics(metrics: Mapping[str, Any]) -> None:
    for part in ("trtr", "tstr"):
        if not isinstance(metrics.get(part), Mapping):
            raise ValueError(f"metrics must hold a '{part}' dict with {METRIC_KEYS}.")
    blocks = [("", metrics)] + ([("baseline.", metrics["baseline"])] if "baseline" in metrics else [])
    for prefix, block in blocks:
        for part in ("trtr", "tstr"):
            for k in METRIC_KEYS:
                v = block.get(part, {}).get(k)
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"metrics {prefix}{part}.{k} must be a finite number, got {v!r}.")
        fid = block.get("fid")
        if not isinstance(fid, (int, float)) or not math.isfinite(fid):
            raise ValueError(f"metrics {prefix}fid must be a finite number, got {fid!r}.")


def _jsonable(obj: Any) -> Any:
    """Plain JSON values; non-finite floats become ``None`` (strict JSON has no NaN / Infinity)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _finite_list(values: Any) -> list[float | None] | None:
    """A list of :func:`finite_or_none` values, or ``None`` when ``values`` is not a list."""
    return [finite_or_none(v) for v in values] if isinstance(values, (list, tuple)) else None


def headline_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures ``report.md`` opens with (and ``metrics.json`` holds under ``headline``), for the flow and, when
    evaluated, the ACGAN baseline. Missing figures are ``None``.

    Returns:
        ``{"trtr_accuracy", "tstr_accuracy", "gap_points" (TRTR - TSTR in accuracy points),
        "class_agreement" (real-trained evaluation classifier on the synthetic images), "class_agreement_per_class"
        (the same per conditioning class, a list or None), "class_agreement_per_judge" (per real-trained
        evaluation classifier, a list or None), "class_names", "real_test_accuracy" (the
        same classifiers on the real test split), "real_balanced_accuracy" (TRTR's mean per-class recall on the real
        test split) and "num_classes" (its number of classes), "class_agreement_real_blurred" (on the real training
        images blurred by 1 px), "sharpness_ratio" (fine detail of the synthetic images over the real ones),
        "variety_ratio" (spread of the synthetic images of a class over the real ones'), "lattice_peak" (the squeeze
        lattice of the synthetic images, about 1 without one), "lattice_peak_real" (the same of the real training
        images), "fid", "fid_floor", "fid_ratio", "fid_ratio_per_judge" (a list or None), "images_with_overflow",
        "n_images", "overflow_pixel_fraction", "nonfinite_pixel_fraction", "mia_auc", "presumptive_accuracy",
        "baseline": {"tstr_accuracy", "gap_points", "class_agreement", "class_agreement_per_class",
        "class_agreement_per_judge", "sharpness_ratio", "variety_ratio", "lattice_peak", "fid", "fid_ratio",
        "fid_ratio_per_judge", "images_with_overflow", "n_images", "overflow_pixel_fraction"} or None}`` (accuracies
        and agreement as fractions).
    """

    def _block(block: Mapping[str, Any]) -> dict[str, Any]:
        trtr = finite_or_none((metrics.get("trtr") or {}).get("accuracy"))
        tstr = finite_or_none((block.get("tstr") or {}).get("accuracy"))
        fid, floor = finite_or_none(block.get("fid")), finite_or_none(metrics.get("fid_floor"))
        ratio = finite_or_none(block.get("fid_ratio"))
        if ratio is None and fid is not None and floor:
            ratio = finite_or_none(fid_to_floor_ratio(fid, floor))
        samples = block.get("samples") if isinstance(block.get("samples"), Mapping) else {}
        return {
            "tstr_accuracy": tstr,
            "gap_points": None if trtr is None or tstr is None else 100.0 * (trtr - tstr),
            "class_agreement": finite_or_none(block.get("class_agreement")),
            "class_agreement_per_class": _finite_list(block.get("class_agreement_per_class")),
            "class_agreement_per_judge": _finite_list(block.get("class_agreement_per_judge")),
            "sharpness_ratio": finite_or_none(block.get("sharpness_ratio")),
            "variety_ratio": finite_or_none(block.get("variety_ratio")),
            "lattice_peak": finite_or_none(block.get("lattice_peak")),
            "fid": fid,
            "fid_ratio": ratio,
            "fid_ratio_per_judge": _finite_list(block.get("fid_ratio_per_judge")),
            "images_with_overflow": samples.get("images_with_overflow"),
            "n_images": samples.get("n_images"),
            "overflow_pixel_fraction": finite_or_none(samples.get("overflow_pixel_fraction")),
            "nonfinite_pixel_fraction": finite_or_none(samples.get("nonfinite_pixel_fraction")),
        }

    flow = _block(metrics)
    recall = (metrics.get("trtr") or {}).get("per_class_recall")
    recall = [finite_or_none(v) for v in recall] if isinstance(recall, (list, tuple)) and len(recall) >= 2 else None
    flow["real_balanced_accuracy"] = None if not recall or None in recall else sum(recall) / len(recall)
    flow["num_classes"] = len(recall) if recall else None
    privacy = metrics.get("privacy") if isinstance(metrics.get("privacy"), Mapping) else {}
    real_acc = finite_or_none(metrics.get("real_classifier_test_accuracy"))
    if real_acc is None:
        real_acc = finite_or_none((metrics.get("trtr") or {}).get("accuracy"))
    pres = metrics.get("presumptive_accuracy")
    if pres is None and isinstance(metrics.get("presumptive_labels"), Mapping):
        pres = metrics["presumptive_labels"].get("accuracy")
    base = None
    if isinstance(metrics.get("baseline"), Mapping):
        b = _block(metrics["baseline"])
        keys = ("tstr_accuracy", "gap_points", "class_agreement", "class_agreement_per_class",
                "class_agreement_per_judge", "sharpness_ratio", "variety_ratio", "lattice_peak", "fid", "fid_ratio",
                "fid_ratio_per_judge", "images_with_overflow", "n_images", "overflow_pixel_fraction")  # fmt: skip
        base = {k: b[k] for k in keys}
    return {
        "trtr_accuracy": finite_or_none((metrics.get("trtr") or {}).get("accuracy")),
        **{k: v for k, v in flow.items()},
        "class_names": [str(n) for n in names]
        if isinstance(names := metrics.get("class_names"), Sequence) and not isinstance(names, str)
        else None,
        "real_test_accuracy": real_acc,
        "class_agreement_real_blurred": finite_or_none(metrics.get("class_agreement_real_blurred")),
        "lattice_peak_real": finite_or_none(metrics.get("lattice_peak_real")),
        "fid_floor": finite_or_none(metrics.get("fid_floor")),
        "mia_auc": finite_or_none(privacy.get("mia_auc")),
        "presumptive_accuracy": finite_or_none(pres),
        "baseline": base,
    }


def _describe(value: Any) -> str:
    """A readable record of a non-JSON training argument: a transform chain by its steps' names
    (``"Compose(RandAffined, RandScaleIntensityd)"``), anything else by ``repr``."""
    steps = getattr(value, "transforms", None)
    if isinstance(steps, (list, tuple)):
        names = [_describe(t) if hasattr(t, "transforms") else type(t).__name__ for t in steps]
        return f"{type(value).__name__}({', '.join(names)})"
    return repr(value)


def _headline_lines(h: Mapping[str, Any]) -> list[str]:
    """The headline table of :func:`headline_figures`' figures ``h``."""
    base = h["baseline"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    def overflow(b: Mapping[str, Any]) -> str:
        if b.get("n_images") is None:
            return "n/a"
        text = f"{b['images_with_overflow']} / {b['n_images']}"
        if b.get("overflow_pixel_fraction") is not None:
            text += f" ({100 * b['overflow_pixel_fraction']:.3g} % of pixels)"
        return text

    def agreement(b: Mapping[str, Any]) -> str:
        text = f"{_num(b['class_agreement'], '.3f')} ("
        per_class = b.get("class_agreement_per_class")
        if per_class:
            parts = [f"{class_name(h.get('class_names'), c)} {_num(v, '.3f')}" for c, v in enumerate(per_class)]
            text += f"by conditioning class: {', '.join(parts)}; "
        text += f"real test accuracy {_num(h['real_test_accuracy'], '.3f')}"
        if h["class_agreement_real_blurred"] is not None:
            text += f"; real training slices blurred by 1 px: {h['class_agreement_real_blurred']:.3f}"
        spread = judge_range(b.get("class_agreement_per_judge"), ".3f")
        return text + (f"; {spread}" if spread else "") + ")"

    def judge_range(values: Sequence[float | None] | None, fmt: str) -> str:
        # with several evaluation classifiers, how far apart they put the same figure
        if not values or len(values) < 2:
            return ""
        if any(v is None for v in values):
            return f"{len(values)} evaluation classifiers, some n/a"
        return f"{len(values)} evaluation classifiers: {format(min(values), fmt)} to {format(max(values), fmt)}"

    def fid(b: Mapping[str, Any]) -> str:
        text = f"{_num(b['fid'])} / {_num(h['fid_floor'])} = {_num(b['fid_ratio'], '.3g')}"
        spread = judge_range(b.get("fid_ratio_per_judge"), ".3g")
        return text + (f" ({spread})" if spread else "")

    def gap(b: Mapping[str, Any]) -> str:
        return "n/a" if b["gap_points"] is None else f"{b['gap_points']:+.1f} points"

    rows = [
        ("TRTR accuracy (real-trained, real test)", pct(h["trtr_accuracy"]), None),
        ("TSTR accuracy (synthetic-trained, real test)", pct(h["tstr_accuracy"]),
         pct(base["tstr_accuracy"]) if base else None),
        ("gap TRTR - TSTR", gap(h), gap(base) if base else None),
        ("class agreement on synthetic images (vs the real-trained classifiers' real test accuracy)", agreement(h),
         agreement(base) if base else None),
        ("fine detail, synthetic / real (Laplacian energy; below 1: blurrier)", _num(h["sharpness_ratio"], ".3f"),
         _num(base["sharpness_ratio"], ".3f") if base else None),
        ("variety of a class, synthetic / real (per-pixel std; below 1: fewer modes)",
         _num(h["variety_ratio"], ".3f"), _num(base["variety_ratio"], ".3f") if base else None),
        (f"periodic lattice at the squeeze periods (spectral peak over its neighbours; about 1 without one; real "
         f"training slices: {_num(h['lattice_peak_real'], '.2f')})", _num(h["lattice_peak"], ".2f"),
         _num(base["lattice_peak"], ".2f") if base else None),
        ("FID / floor", fid(h), fid(base) if base else None),
        ("samples overflowed before clamping (outside [-0.25, 1.25] or non-finite)", overflow(h),
         overflow(base) if base else None),
        ("membership-inference AUC (0.5 = no memorisation signal)", _num(h["mia_auc"], ".3f"), None),
        ("presumptive-label accuracy (label propagation)",
         _num(h["presumptive_accuracy"], ".3f") if h["presumptive_accuracy"] is not None
         else "n/a (all labels or not recorded)", None),
    ]  # fmt: skip
    if base:
        lines = ["| figure | conditional flow | ACGAN baseline |", "|---|---|---|"]
        lines += [f"| {name} | {flow} | {'' if b is None else b} |" for name, flow, b in rows]
    else:
        lines = ["| figure | conditional flow |", "|---|---|"]
        lines += [f"| {name} | {flow} |" for name, flow, _ in rows]
    return lines


def _grid_pngs(fig_dir: Path, sample_images: Mapping[str, torch.Tensor]) -> dict[str, Path]:
    out = {}
    for name, imgs in sample_images.items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        out[name] = image_grid(fig_dir / f"grid_{safe}.png", imgs, nrow=8)
    return out


def _side_by_side_lines(grids: Mapping[str, Path]) -> list[str]:
    """Per class a table row ``real | flow | acgan | ...`` of the grids named ``"<source> <class>"``."""
    classes = [name.split(" ", 1)[1] for name in grids if name.startswith("real ") and " " in name]
    if not classes:
        return []
    sources: list[str] = []
    for name in grids:
        src = name.split(" ", 1)[0]
        if src != "real" and src not in sources and " " in name:
            sources.append(src)
    lines = ["| class | real | " + " | ".join(sources) + " |", "|---" * (len(sources) + 2) + "|"]
    for cls in classes:
        cells = [f"![real {cls}](figures/{grids[f'real {cls}'].name})"]
        for src in sources:
            png = grids.get(f"{src} {cls}")
            cells.append(f"![{src} {cls}](figures/{png.name})" if png is not None else "")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    output_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    *,
    data_summary: Mapping[str, Any] | None = None,
    sample_images: Mapping[str, torch.Tensor] | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    extra_sections: Mapping[str, str] | None = None,
    title: str = "monai_condflow evaluation",
) -> tuple[Path, Path]:
    """Write ``report.md`` (with PNG figures under ``figures/``) and ``metrics.json`` into ``output_dir``.

    The report opens with a headline table (:func:`headline_figures`: TRTR, TSTR, their gap, class agreement next to
    the real test accuracy, FID / floor, samples overflowed before clamping, membership-inference AUC, presumptive-
    label accuracy) and, per class, the real and synthetic grids side by side (``sample_images`` named
    ``"real <class>"``, ``"flow <class>"``, ``"acgan <class>"``); the detailed sections follow. ``metrics.json``
    gets the headline figures under ``headline``.

    Args:
        output_dir: run folder (created if needed).
        metrics: at least ``trtr`` / ``tstr`` (dicts with ``accuracy``, ``f1``, ``precision``, ``recall`` and
            optional ``*_std``, as from :func:`~monai_condflow.evaluation.tstr.evaluate_tstr`) and ``fid``; optional
            ``fid_floor``, ``fid_ratio``, ``class_agreement``, ``class_agreement_real``, ``baseline`` (same keys, for
            the ACGAN), ``augmentation`` (from :func:`~monai_condflow.evaluation.augmentation.augmentation_study`)
            and anything else JSON-able (copied to ``metrics.json``).
        data_summary: ``name -> value`` lines of the data section (split sizes, class counts, image size, ...).
        sample_images: ``name -> [N, 1, S, S]`` images; one PNG grid each (e.g. ``"real class 1"``,
            ``"flow class 1"``).
        tensorboard_dir: folder of TensorBoard event files (default ``output_dir/tensorboard``); each scalar tag
            becomes a line chart.
        extra_sections: ``heading -> markdown`` appended at the end.
        title: report title.

    Returns:
        ``(report_md_path, metrics_json_path)``.

    Raises:
        ValueError: when a required metric is missing or not a finite number.
    """
    _check_metrics(metrics)
    out = Path(output_dir)
    fig_dir = out / "figures"
    lines = [f"# {title}", ""]

    # headline: the figures a reader needs first, then the real and synthetic grids side by side (issue 14)
    headline = headline_figures(metrics)
    checks = headline_checks(headline)
    lines += ["## Headline", ""] + _headline_lines(headline) + [""]
    grids = _grid_pngs(fig_dir, sample_images or {})
    side = _side_by_side_lines(grids)
    if side:
        lines += ["Real (test split) and synthetic images per class, side by side:", ""] + side + [""]
    steps = (metrics.get("flow_training") or {}).get("adversarial_steps")
    lines += ["### Checks", ""] + headline_check_lines(checks, steps) + [""]

    if data_summary:
        lines += ["## Data", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in data_summary.items()] + [""]

    # Table 2: FID on evaluation-classifier embeddings
    lines += ["## Fidelity (Table 2 format: FID on evaluation-classifier embeddings, lower is better)", ""]
    lines += ["| method | FID | FID floor (real val vs test) | FID / floor | class agreement | TSTR accuracy (%) |"]
    lines += ["|---|---|---|---|---|---|"]
    rows = [("conditional flow", metrics)] + (
        [("ACGAN baseline", metrics["baseline"])] if "baseline" in metrics else []
    )
    floor = metrics.get("fid_floor")
    for name, block in rows:
        ratio = block.get("fid_ratio")
        if ratio is None and isinstance(floor, (int, float)):
            ratio = fid_to_floor_ratio(block["fid"], floor)
        lines.append(
            f"| {name} | {_num(block['fid'])} | {_num(floor)} | {_num(ratio, '.3g')} | "
            f"{_num(block.get('class_agreement'), '.3f')} | {_pct(block['tstr'], 'accuracy')} |"
        )
    if isinstance(metrics.get("class_agreement_real"), (int, float)):
        lines.append("")
        lines.append(
            f"Class agreement of the real-trained classifier on the real training images (reference): "
            f"{metrics['class_agreement_real']:.3f}"
            + (f" (mean over {metrics['n_judges']} classifiers)." if (metrics.get("n_judges") or 1) > 1 else ".")
        )
    lines.append("")

    # Table 3: TRTR vs TSTR
    lines += ["## Utility (Table 3 format: TRTR vs TSTR on the real test split, % mean ± std)", ""]
    n_boot, n_sets = metrics.get("n_bootstrap"), metrics.get("n_synthetic_sets")
    if n_boot is not None or n_sets is not None:
        n_judges = metrics.get("n_judges") or 1
        judges = f"; TRTR over {n_judges} real-data classifiers (different seeds)" if n_judges > 1 else ""
        lines += [f"Over {n_boot} test-set bootstraps and {n_sets} synthetic sets (different seeds){judges}.", ""]
    lines += ["| training data | accuracy | macro-F1 | macro-precision | macro-recall |", "|---|---|---|---|---|"]
    table = [("real (TRTR)", metrics["trtr"]), ("flow synthetic (TSTR)", metrics["tstr"])]
    if "baseline" in metrics:
        table.append(("ACGAN synthetic (TSTR)", metrics["baseline"]["tstr"]))
    for name, s in table:
        lines.append(f"| {name} | " + " | ".join(_pct(s, k) for k in METRIC_KEYS) + " |")
    lines.append("")
    class_names = metrics.get("class_names")
    for name, s in table:
        recall = s.get("per_class_recall")
        if recall is not None:
            labels = class_names if isinstance(class_names, list) and len(class_names) == len(recall) else None
            pcr = ", ".join(f"{labels[c]} {100 * v:.1f}" if labels else f"{100 * v:.1f}" for c, v in enumerate(recall))
            lines.append(f"- per-class recall (%), {name}: {pcr}")
    series = {name: [s[k] for k in METRIC_KEYS] for name, s in table}
    errs = {name: [s.get(f"{k}_std", 0.0) for k in METRIC_KEYS] for name, s in table}
    bar_chart(fig_dir / "tstr_trtr.png", list(METRIC_KEYS), series, errs, "TRTR vs TSTR (real test split)", "score")
    lines += ["", "![TRTR vs TSTR](figures/tstr_trtr.png)", ""]

    aug = metrics.get("augmentation")
    if isinstance(aug, Mapping) and aug.get("rows"):
        lines += ["## Augmentation (real imbalanced training set + synthetic minority images)", ""]
        minority = aug.get("minority_class")
        if isinstance(minority, int):
            shown = (
                f"{class_names[minority]} (class {minority})"
                if isinstance(class_names, list) and 0 <= minority < len(class_names)
                else f"class {minority}"
            )
            lines += [
                f"Minority class: {shown}, the rarest in the real training split; \"% of gap\" is the share of the "
                "gap between it and the largest class filled with synthetic images of it (other classes are left as "
                "they are).",
                "",
            ]
        lines += [
            "| synthetic added (% of gap) | images added | minority recall | macro-recall | accuracy | macro-F1 |",
            "|---|---|---|---|---|---|",
        ]
        for r in aug["rows"]:
            lines.append(
                f"| {100 * r['fraction']:.0f} | {r['n_added']} | {_pct(r, 'minority_recall')} | {_pct(r, 'recall')} | "
                f"{_pct(r, 'accuracy')} | {_pct(r, 'f1')} |"
            )
        if aug.get("plot"):
            lines += ["", f"![augmentation]({os.path.relpath(aug['plot'], out)})"]
        lines.append("")

    tb_dir = Path(tensorboard_dir) if tensorboard_dir is not None else out / "tensorboard"
    runs = read_tensorboard_scalars(tb_dir)
    if runs:
        lines += ["## Training curves", ""]
        for run, tags in runs.items():
            for tag, (steps, values) in tags.items():
                safe = "".join(ch if ch.isalnum() else "_" for ch in f"{run}_{tag}").strip("_")
                png = line_chart(fig_dir / f"curve_{safe}.png", {tag: (steps, values)}, f"{run}: {tag}", "step", tag)
                lines.append(f"![{run}: {tag}](figures/{png.name})")
        lines.append("")

    if sample_images:
        lines += ["## Sample grids", "", "Look at them: TSTR alone can be fooled by class-correlated textures.", ""]
        for name, png in grids.items():
            lines.append(f"- {name}: [figures/{png.name}](figures/{png.name})")
            lines.append(f"  ![{name}](figures/{png.name})")
        lines.append("")

    for heading, body in (extra_sections or {}).items():
        lines += [f"## {heading}", "", body, ""]

    report = atomic_write_text(out / "report.md", "\n".join(lines))
    payload = json.dumps(
        _jsonable({**dict(metrics), "headline": headline, "checks": checks}),
        indent=2, sort_keys=True, allow_nan=False,
    )  # fmt: skip
    metrics_path = atomic_write_text(out / "metrics.json", payload + "\n")
    logger.info("wrote %s and %s", report, metrics_path)
    return report, metrics_path


def sample_synthetic_set(
    sampler: Callable[[torch.Tensor, torch.Generator], torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    conditions: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    batch_size: int,
    return_stats: bool = False,
) -> tuple[ImageSet, int] | tuple[ImageSet, int, dict[str, Any]]:
    """Draw one synthetic set, count its overflowed pixels before clamping, and drop images still non-finite.

    Args:
        sampler: ``(conditions [B, ...], generator) -> images [B, 1, S, S]``, or ``-> (images, stats)`` with the
            per-image pre-clamp counts ``{"overflow_pixels": [B], "nonfinite_pixels": [B]}`` of a sampler that clamps
            itself (the flow through :func:`~monai_condflow.engines.generation.generate_tensors`). For a sampler
            without statistics (e.g. the ACGAN) the counts are taken on its raw output.
        conditions: ``[N, ...]`` what the sampler is conditioned on (embeddings ``z`` or class labels).
        labels: ``[N]`` class label of each condition.
        seed: seed of the CPU generator handed to the sampler.
        batch_size: conditions per sampler call.
        return_stats: also return the statistics.

    Returns:
        ``((images, labels), n_dropped)`` with images clamped to ``[0, 1]``, and with ``return_stats`` a third item
        ``{"overflow_pixels": LongTensor[N], "nonfinite_pixels": LongTensor[N], "pixels_per_image": int,
        "counted_on": "flow" | "sampler output"}`` over *all* drawn images (dropped ones included).
    """
    g = torch.Generator().manual_seed(int(seed))
    outs, overflow, nonfinite, own_stats = [], [], [], True
    with torch.no_grad():
        for start in range(0, conditions.shape[0], batch_size):
            res = sampler(conditions[start : start + batch_size], g)
            if isinstance(res, tuple):
                x, stats = res
            else:
                x, stats, own_stats = res, None, False
            x = x.detach().float().cpu()
            if stats is None:
                stats = pixel_range_stats(x)
            overflow.append(torch.as_tensor(stats["overflow_pixels"]).long().cpu().reshape(-1))
            nonfinite.append(torch.as_tensor(stats["nonfinite_pixels"]).long().cpu().reshape(-1))
            outs.append(x)
    images = torch.cat(outs)
    finite = torch.isfinite(images.flatten(1)).all(1)
    n_bad = int((~finite).sum())
    if n_bad:
        logger.warning("dropping %d of %d synthetic images with NaN / Inf pixels", n_bad, images.shape[0])
    result = (images[finite].clamp(0.0, 1.0), labels.reshape(-1)[finite].long())
    if not return_stats:
        return result, n_bad
    info = {
        "overflow_pixels": torch.cat(overflow),
        "nonfinite_pixels": torch.cat(nonfinite),
        "pixels_per_image": int(images[0].numel()) if images.shape[0] else 0,
        "counted_on": "flow" if own_stats else "sampler output",
    }
    return result, n_bad, info


def _samples_block(stats: Sequence[Mapping[str, Any]], n_dropped: int) -> dict[str, Any]:
    """The ``samples`` block of ``metrics.json`` over the synthetic sets' statistics (see
    :func:`sample_synthetic_set`)."""
    block = summarize_sample_stats(
        torch.cat([s["overflow_pixels"] for s in stats]),
        torch.cat([s["nonfinite_pixels"] for s in stats]),
        stats[0]["pixels_per_image"],
        source=stats[0]["counted_on"],
    )
    block["n_dropped_nonfinite"] = int(n_dropped)
    return block


def _flow_sampler(
    flow: nn.Module, temperature: float
) -> Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``(z, generator) -> (images clamped to [0, 1], pre-clamp statistics)`` of the flow."""

    def sample(z: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return generate_tensors(flow, z, temperature, g, return_stats=True)

    return sample


def default_classifier_factory(num_classes: int) -> Callable[[], nn.Module]:
    """The evaluation's classifier when none is given: a ``small`` PEPX network for 1-channel 2-D slices."""

    def classifier_factory() -> nn.Module:
        return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=num_classes)

    return classifier_factory


def _check_fid_sample_sizes(factory: Callable[[], nn.Module], image: torch.Tensor, sizes: Mapping[str, int]) -> None:
    """Fail before any training when a set is too small for FID with the evaluation network's features.

    The feature dimension ``D`` comes from one forward pass of ``image`` (``[1, C, *S]``) through a freshly built
    network (its construction does not consume the global random stream); FID needs ``N > D`` images per set.
    ``sizes`` (``{set name: N}``) may hold the training set: every synthetic set has one image per training image.
    """
    with torch.random.fork_rng(devices=[]):
        probe = factory()
    dim = extract_features(probe, image, 1, "cpu").shape[1]
    for name, n in sizes.items():
        what = "the training set (each synthetic set has one image per training image)" if name == "training" else (
            f"the {name} set"
        )
        try:
            check_fid_sample_size(n, dim, what)
        except ValueError as err:
            raise ValueError(
                f"{err} The evaluation cannot run on these splits (it stops before training anything): add {name} "
                "images (or use a smaller evaluation network)."
            ) from None


def check_evaluation_data(
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    num_classes: int,
    classifier_factory: Callable[[], nn.Module] | None = None,
) -> bool:
    """What the evaluation needs of the real splits, checked before anything is trained: no image in two splits
    (:func:`~monai_condflow.data.datalists.check_shared_images`) and more images per split than the evaluation
    classifier's feature dimension (FID's full-rank covariance; the synthetic sets have as many images as the
    training split). ``evaluate.json`` runs it first, and the pipeline (``python -m monai_condflow.pipeline``) runs
    it before its first stage, so that a dataset the evaluation cannot use is refused before hours of training.

    Args:
        train: the preprocessed training records (``image`` ``[C, *S]`` arrays, ``label``), e.g. ``@records#train``.
        val: the preprocessed validation records.
        test: the preprocessed test records.
        num_classes: classes of the evaluation classifier.
        classifier_factory: the evaluation classifier (default: :func:`default_classifier_factory`).

    Returns:
        ``True`` (bundle configs chain it).

    Raises:
        DataError: an image in two splits (names both files).
        ValueError: a split with too few images for FID (names the split and the count needed).
    """
    check_shared_images({"train": list(train), "val": list(val), "test": list(test)})
    sets = {"training": train, "validation": val, "test": test}
    for name, records in sets.items():
        if not records:
            raise ValueError(f"evaluation needs {name} images; the {name} split is empty.")
    factory = classifier_factory or default_classifier_factory(num_classes)
    image = torch.as_tensor(np.asarray(val[0]["image"]), dtype=torch.float32)[None]
    _check_fid_sample_sizes(factory, image, {name: len(records) for name, records in sets.items()})
    return True


def run_evaluation(
    output_dir: str | os.PathLike,
    real_train: ImageSet | Sequence[Mapping[str, Any]],
    real_val: ImageSet | Sequence[Mapping[str, Any]],
    real_test: ImageSet | Sequence[Mapping[str, Any]],
    *,
    classifier: nn.Module | str | os.PathLike | None = None,
    flow: nn.Module | str | os.PathLike | None = None,
    acgan: nn.Module | str | os.PathLike | None = None,
    classifier_factory: Callable[[], nn.Module] | None = None,
    flow_factory: Callable[[], nn.Module] | None = None,
    acgan_factory: Callable[[], nn.Module] | None = None,
    eval_network_factory: Callable[[], nn.Module] | None = None,
    fit_fn: Callable[..., nn.Module] = default_fit_fn,
    train_kwargs: Mapping[str, Any] | None = None,
    num_classes: int = 2,
    class_names: Sequence[str] | None = None,
    n_synthetic_sets: int = 3,
    n_judges: int = 1,
    temperature: float = 0.9,
    n_bootstrap: int = 200,
    augmentation: bool = False,
    augmentation_fractions: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    n_grid: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    privacy_audit: bool = True,
    n_bits: int = 8,
    audit_holdout: torch.Tensor | None = None,
    true_train_records: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run end to end and write ``report.md`` / ``metrics.json`` into ``output_dir``.

    Steps: load the conditioning classifier and the flow (default: the checkpoints in ``output_dir/classifier`` and
    ``output_dir/flow``); embed the real training images (``z``) and draw ``n_synthetic_sets`` synthetic sets
    (one image per real training image, same ``z``, temperature ``temperature``, seeds ``seed + k``; the pixels
    that were non-finite or outside ``SAMPLE_RANGE`` *before* clamping are counted per image into the ``samples``
    block, and images still non-finite after sampling are dropped and counted); train ``n_judges`` evaluation
    classifiers on real data only (seeds ``seed + j``: the TRTR classifiers, the FID feature extractors and the
    class-agreement judges); TSTR / TRTR with bootstraps; FID of each synthetic set vs the real test split, the
    floor (real val vs real test) and their ratio, in each judge's features. With several judges, class agreement,
    FID and the floor are means over judges (``fid_ratio`` = mean FID / mean floor) and the per-judge figures sit
    beside them (``class_agreement_per_judge``, ``fid_per_judge``, ``fid_floor_per_judge``,
    ``fid_ratio_per_judge``): two classifiers trained alike can judge the same synthetic images very differently.
    The privacy audit's embeddings and the augmentation study's reference use the first judge. When an ACGAN
    checkpoint exists (``acgan`` or ``output_dir/acgan``) the same is done for it under ``baseline``.
    ``augmentation=True`` adds the augmentation study for the minority class.

    Args:
        output_dir: run folder (holds ``classifier/``, ``flow/``, optionally ``acgan/`` and ``tensorboard/``).
        real_train: real training set ``(images, labels)`` or records (see
            :func:`~monai_condflow.evaluation.tstr.as_image_set`).
        real_val: real validation set (epoch selection and FID floor).
        real_test: held-out real test set.
        classifier: conditioning classifier (module, checkpoint file or folder).
        flow: conditional flow (module, checkpoint file or folder).
        acgan: ACGAN generator (module with ``sample(labels, generator)``, file or folder), or ``None`` to look in
            ``output_dir/acgan``.
        classifier_factory: builds the conditioning classifier for loading (default ``PEPXNet`` "small", 1 -> C).
        flow_factory: builds the flow for loading (default ``ConditionalGlow.from_preset("small")``).
        acgan_factory: builds the ACGAN generator for loading (default ``ACGANGenerator`` with defaults).
        eval_network_factory: fresh classifiers for TRTR / TSTR / FID (default ``classifier_factory``).
        fit_fn: classifier training function (see :func:`~monai_condflow.evaluation.tstr.default_fit_fn`).
        train_kwargs: passed to ``fit_fn`` (``max_epochs``, ``lr``, ``batch_size``, ...).
        num_classes: number of classes.
        class_names: names for the report, a list in class-id order with one per class (default ``"class 0"``,
            ...); anything else is refused before any training (``ValueError``).
        n_synthetic_sets: synthetic sets (seeds) per generator.
        n_judges: real-data evaluation classifiers (seeds ``seed``, ``seed + 1``, ...); each adds one classifier
            training to the evaluation's time.
        temperature: flow sampling temperature (paper: 0.9).
        n_bootstrap: test-set bootstraps.
        augmentation: run the augmentation study too.
        augmentation_fractions: fractions of the class gap filled with synthetic minority images.
        n_grid: images per class in the sample grids.
        batch_size: batch size of embedding / sampling / FID feature passes.
        seed: base seed.
        device: device for every network.
        privacy_audit: run the memorisation and membership-inference audits on the flow: distance to
            closest training record of the first synthetic set vs the real test split (pixels and evaluation-
            classifier embeddings) and the likelihood-threshold attack (training vs test images). They go to the
            ``privacy`` object of ``metrics.json`` (with ``epsilon`` / ``delta`` when the run used DP-SGD, from
            :func:`~monai_condflow.engines.stages.privacy_spent`) and to the report's "Privacy" section.
        n_bits: bit depth of the data (membership-inference bits/dim).
        audit_holdout: ``[N_train]`` bool mask of the training images the flow stage held back (config id
            ``audit_holdout`` of ``train_flow.json``). With it, both audits compare the flow's real training images
            with these non-members of the same distribution; without it, with the real test split (a shift between
            the splits then also raises the attack AUC).
        true_train_records: the training split's records with their *true* labels (e.g. ``load_covidx_split`` of
            ``train.txt``). When the semi-supervised classifier stage ran (``classifier/train_labels.json``), its
            presumptive labels are compared with these (matched by ``source``, else image path) for
            ``presumptive_accuracy``; without them the last label-propagation round's accuracy in
            ``classifier/classifier.json`` is used when recorded.
        progress: log progress lines (count and ETA) for the classifier trainings of the TSTR / TRTR evaluation and
            the augmentation study (bundle id ``progress``; see :mod:`monai_condflow.progress`).

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    out = Path(output_dir)
    # the names the synthetic set's manifest uses, checked alike (a list in id order, one per class)
    names = check_class_names(class_names, range(num_classes), f"num_classes {num_classes} has") or [
        f"class {c}" for c in range(num_classes)
    ]
    train, val, test = as_image_set(real_train), as_image_set(real_val), as_image_set(real_test)
    if classifier_factory is None:
        classifier_factory = default_classifier_factory(num_classes)

    if flow_factory is None:

        def flow_factory() -> nn.Module:
            return ConditionalGlow.from_preset("small")

    check_positive_int("n_judges", n_judges)
    eval_factory = eval_network_factory or classifier_factory
    _check_fid_sample_sizes(eval_factory, val[0][:1], {"training": len(train[0]), "validation": len(val[0]),
                                                       "test": len(test[0])})
    cond_net = load_module(
        classifier if classifier is not None else out / "classifier", classifier_factory, "classifier", device
    )
    flow_net = load_module(flow if flow is not None else out / "flow", flow_factory, "flow", device)

    z = extract_features(cond_net, train[0], batch_size, device)
    flow_sets, flow_bad, flow_stats = [], 0, []
    for k in range(n_synthetic_sets):
        syn, bad, stats = sample_synthetic_set(
            _flow_sampler(flow_net, temperature), z.to(device), train[1], seed + k, batch_size, return_stats=True
        )
        flow_sets.append(syn)
        flow_bad += bad
        flow_stats.append(stats)

    logger.info("training %d evaluation classifier(s) on real data only", n_judges)
    judges = train_real_classifiers(
        train,
        val,
        [seed + j for j in range(n_judges)],
        network_factory=eval_factory,
        fit_fn=fit_fn,
        train_kwargs=train_kwargs,
        device=device,
    )
    eval_net = judges[0]
    test_feats = [extract_features(net, test[0], batch_size, device) for net in judges]
    floors = [
        fid_from_features(extract_features(net, val[0], batch_size, device), feats)
        for net, feats in zip(judges, test_feats)
    ]
    floor = float(np.mean(floors))

    def _evaluate(sets: list[ImageSet], samples_block: dict[str, Any]) -> dict[str, Any]:
        res = evaluate_tstr(
            train,
            val,
            test,
            sets,
            network_factory=eval_factory,
            num_classes=num_classes,
            fit_fn=fit_fn,
            train_kwargs=train_kwargs,
            n_bootstrap=n_bootstrap,
            real_classifier=judges,
            seed=seed,
            device=device,
            progress=progress,
        )
        fids = np.array(  # [judge, set]
            [
                [fid_from_features(extract_features(net, s[0], batch_size, device), feats) for s in sets]
                for net, feats in zip(judges, test_feats)
            ]
        )
        res["fid"] = float(fids.mean())
        res["fid_std"] = float(np.std(fids.mean(axis=0)))
        res["fid_per_set"] = [float(v) for v in fids.mean(axis=0)]
        res["fid_per_judge"] = [float(v) for v in fids.mean(axis=1)]
        res["fid_ratio"] = fid_to_floor_ratio(res["fid"], floor)
        res["fid_ratio_per_judge"] = [fid_to_floor_ratio(f, fl) for f, fl in zip(res["fid_per_judge"], floors)]
        # honest: images with a non-finite pixel before any clamping, over all images drawn
        n_images = samples_block["n_images"]
        res["nonfinite_fraction"] = samples_block["images_with_nonfinite"] / n_images if n_images else 0.0
        res["samples"] = samples_block
        return res

    metrics: dict[str, Any] = _evaluate(flow_sets, _samples_block(flow_stats, flow_bad))
    prior = getattr(flow_net, "sampling_prior", None)
    metrics["samples"]["sampling_prior"] = (
        {"kind": "fitted", "shrinkage": float(prior.shrinkage)}
        if prior is not None and prior.fitted
        else {"kind": "standard"}
    )
    flow_info_file = out / "flow" / "flow.json"
    flow_info = json.loads(flow_info_file.read_text(encoding="utf-8")) if flow_info_file.is_file() else {}
    # how the evaluated flow was trained: the checkpoint's selection and the adversarial phase (flow_adversarial)
    metrics["flow_training"] = {
        "selected": flow_info.get("selected"),
        "stopped_epoch": flow_info.get("stopped_epoch"),
        "max_epochs": flow_info.get("max_epochs"),
        "adversarial_steps": (flow_info.get("adversarial") or {}).get("steps", 0),
    }
    trtr_point = [p for p in metrics.get("trtr_point") or [] if "accuracy" in p]
    metrics["real_classifier_test_accuracy"] = (  # the judges' own accuracy on the real test split
        float(np.mean([p["accuracy"] for p in trtr_point])) if trtr_point else metrics["trtr"]["accuracy"]
    )
    metrics["presumptive_labels"] = presumptive_label_summary(out / "classifier", true_train_records)
    metrics["presumptive_accuracy"] = (metrics["presumptive_labels"] or {}).get("accuracy")
    metrics["fid_floor"] = floor
    metrics["fid_floor_per_judge"] = floors
    metrics["class_names"] = names
    metrics["temperature"] = float(temperature)
    metrics["seed"] = int(seed)
    # how every evaluation classifier was trained (the arguments given to fit_fn; absent ones take its defaults)
    metrics["evaluation_training"] = {
        k: v if isinstance(v, (int, float, str, bool)) or v is None else _describe(v)
        for k, v in (train_kwargs or {}).items()
    }

    samples: dict[str, torch.Tensor] = {}
    for c in range(num_classes):
        samples[f"real {names[c]}"] = test[0][test[1] == c][:n_grid]
        samples[f"flow {names[c]}"] = flow_sets[0][0][flow_sets[0][1] == c][:n_grid]

    acgan_spec = acgan if acgan is not None else (out / "acgan" if (out / "acgan").is_dir() else None)
    if acgan_spec is not None:
        if acgan_factory is None:

            def acgan_factory() -> nn.Module:
                return ACGANGenerator(num_classes=num_classes)

        gen = load_module(acgan_spec, acgan_factory, "acgan", device)
        acgan_sets, acgan_bad, acgan_stats = [], 0, []
        for k in range(n_synthetic_sets):
            syn, bad, stats = sample_synthetic_set(
                lambda y, g: gen.sample(y.to(device), generator=g),
                train[1],
                train[1],
                seed + k,
                batch_size,
                return_stats=True,
            )
            acgan_sets.append(syn)
            acgan_bad += bad
            acgan_stats.append(stats)
        base = _evaluate(acgan_sets, _samples_block(acgan_stats, acgan_bad))
        base["name"] = "acgan"
        metrics["baseline"] = base
        for c in range(num_classes):
            samples[f"acgan {names[c]}"] = acgan_sets[0][0][acgan_sets[0][1] == c][:n_grid]

    if augmentation:
        counts = torch.bincount(train[1], minlength=num_classes)
        minority = int(counts.argmin())
        gap = int(counts.max() - counts[minority])
        pool_idx = torch.nonzero(train[1] == minority).reshape(-1)
        n_pool = max(int(max(augmentation_fractions) * gap * 1.1) + 8, 1)  # margin for dropped non-finite samples
        pick = pool_idx[torch.randint(0, pool_idx.numel(), (n_pool,), generator=torch.Generator().manual_seed(seed))]
        pool, _ = sample_synthetic_set(
            _flow_sampler(flow_net, temperature), z[pick].to(device), train[1][pick], seed + 10_000, batch_size
        )
        aug = augmentation_study(
            train,
            val,
            test,
            pool,
            network_factory=eval_factory,
            num_classes=num_classes,
            minority_class=minority,
            fractions=augmentation_fractions,
            fit_fn=fit_fn,
            train_kwargs=train_kwargs,
            n_bootstrap=n_bootstrap,
            seed=seed,
            device=device,
            progress=progress,
            real_classifier=eval_net,
        )
        aug["plot"] = str(plot_augmentation(aug, out / "figures" / "augmentation.png"))
        metrics["augmentation"] = aug

    extra_sections: dict[str, str] = {}
    if privacy_audit:
        if audit_holdout is not None and bool(audit_holdout.any()):
            mask = torch.as_tensor(audit_holdout, dtype=torch.bool).reshape(-1)
            if mask.numel() != train[0].shape[0]:
                raise ValueError(f"audit_holdout has {mask.numel()} entries for {train[0].shape[0]} training images.")
            members, holdout, holdout_name = train[0][~mask], train[0][mask], "held-back training images"
        else:
            members, holdout, holdout_name = train[0], test[0], "real test split"
        metrics["privacy"], extra_sections["Privacy"] = _privacy_audit(
            out, flow_net, cond_net, eval_net, flow_sets[0][0], members, holdout, holdout_name, n_bits, batch_size
        )

    summary = {
        "image size": "x".join(str(s) for s in train[0].shape[1:]),
        "real train / val / test": f"{train[1].numel()} / {val[1].numel()} / {test[1].numel()}",
    }
    for split, s in (("train", train), ("val", val), ("test", test)):
        counts = torch.bincount(s[1], minlength=num_classes).tolist()
        summary[f"{split} per class"] = ", ".join(f"{names[c]}: {n}" for c, n in enumerate(counts))
    summary["synthetic sets (flow)"] = f"{n_synthetic_sets} x {train[1].numel()} (T = {temperature})"
    summary["evaluation classifiers (TRTR, TSTR, augmentation, FID features)"] = (
        ", ".join(f"{k} {v}" for k, v in sorted(metrics["evaluation_training"].items()))
        or "the fit function's defaults"
    ) + ("" if fit_fn is default_fit_fn else f" ({getattr(fit_fn, '__name__', 'custom fit function')})")
    fs = metrics["samples"]
    lo, hi = fs["range"]
    summary["flow samples overflowed before clamping"] = (
        f"{fs['images_with_overflow']} of {fs['n_images']} images had pixels outside [{lo:g}, {hi:g}] or non-finite "
        f"({100 * fs['overflow_pixel_fraction']:.3g}% of pixels); {fs['images_with_nonfinite']} images with non-finite "
        f"pixels ({100 * fs['nonfinite_pixel_fraction']:.3g}% of pixels)"
    )
    sp = fs.get("sampling_prior") or {"kind": "standard"}
    summary["flow sampling prior of the top latent"] = (
        f"fitted to the encoded training set (covariance shrinkage {sp['shrinkage']:g})"
        if sp["kind"] == "fitted"
        else "standard N(0, T^2 I)"
    )
    ft = metrics["flow_training"]
    if ft["selected"]:
        summary["flow training"] = (
            f"likelihood epochs: {ft['stopped_epoch']} of {ft['max_epochs']}; model: {ft['selected']}"
        )
    if flow_bad:
        summary["flow samples dropped (still non-finite after sampling)"] = str(flow_bad)
    write_report(out, metrics, data_summary=summary, sample_images=samples, extra_sections=extra_sections)
    return metrics


def _privacy_audit(
    out: Path,
    flow: nn.Module,
    classifier: nn.Module,
    eval_net: nn.Module,
    synthetic: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor,
    holdout_name: str,
    n_bits: int,
    batch_size: int,
) -> tuple[dict[str, Any], str]:
    """The ``privacy`` block of ``metrics.json`` and the report section (the "## Privacy" heading removed)."""

    logger.info("privacy audit: DCR and membership inference (%d train vs %d held-out)", len(train), len(holdout))
    dcr = dcr_audit(synthetic, train, holdout, feature_extractor=eval_net, batch_size=max(batch_size, 256))
    mia = None
    if hasattr(flow, "bits_per_dim"):
        mia = membership_inference_auc(flow, classifier, train, holdout, n_bits=n_bits, batch_size=batch_size)
    else:
        logger.warning("privacy audit: the flow has no bits_per_dim; membership inference skipped")
    spent = privacy_spent(out) or {}
    block = privacy_summary(dcr, mia, epsilon=spent.get("epsilon"), delta=spent.get("delta"),
                            dp_covers=spent.get("covers"))  # fmt: skip
    if spent:
        block["dp_stages"] = {
            stage: None if spent.get(stage) is None else {k: spent[stage].get(k) for k in ("epsilon", "delta")}
            for stage in ("classifier", "flow")
        }
    block["holdout"] = holdout_name
    intro = f"Members: the flow's {len(train)} training images; non-members: {len(holdout)} {holdout_name}.\n\n"
    return block, intro + privacy_section(block).split("\n", 2)[2]  # without its heading: write_report adds one
