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
Plain-language checks of a run's headline figures: does the synthetic data keep its class, look like the real data
(to the classifier and in its fine detail), decode cleanly and not memorise?

``report.md`` shows them below the headline table and the grids, and ``metrics.json`` holds them under ``checks``,
so a run whose samples are texture without class says so on its first page instead of leaving the reader to compare
numbers.
The thresholds are the project's fidelity targets (issue 14); they are a reading aid, not a statistical test (one run,
one flow seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HEADLINE_CHECKS",
    "AT_CHANCE_NOTE",
    "class_name",
    "finite_or_none",
    "headline_checks",
    "headline_check_lines",
]

HEADLINE_CHECKS: dict[str, float] = {
    "chance_margin": 0.05,
    "class_agreement_margin": 0.10,
    "tstr_gap_points": 3.0,
    "fid_ratio": 10.0,
    "sharpness_ratio": 1.25,
    "mia_auc": 0.60,
}
"""Thresholds: class agreement at least the real test accuracy minus ``class_agreement_margin``; TSTR at most
``tstr_gap_points`` below TRTR; FID / floor at most ``fid_ratio``; fine detail (Laplacian energy) of the synthetic
images within a factor ``sharpness_ratio`` of the real images' (blur below, speckle above); no synthetic image with
pixels that overflowed (or were non-finite) before clamping; membership-inference AUC at most ``mia_auc``. The
class and TSTR checks compare with a classifier trained on real images: when its balanced accuracy on the real test
split (TRTR's mean per-class recall) is below chance (1 / classes) + ``chance_margin``, they are not judged."""

AT_CHANCE_NOTE = (
    "The classifier trained on the real images is at chance level on the real test split, so the class and TSTR "
    "checks cannot tell whether the synthetic images keep their class: train the evaluation classifiers longer "
    "(evaluate.json max_epochs) or on more labelled images before reading them."
)

ADVERSARIAL_HINT = (
    "This flow was trained by maximum likelihood only. At a CPU budget such a flow's samples tend to carry texture "
    "rather than the class (the project's measurements: docs/results.md, 'Fidelity ablations'); the adversarial "
    "fine-tuning phase of the flow stage (on by default: `--stage-set flow.adversarial_steps=900`, docs/networks.md) "
    "raised the class agreement there on average (three flow seeds: 0.41 -> 0.76), at about 5 more minutes on 2 CPU "
    "cores at 64 px, but one run's result swings with its seed and the machine (0.27-0.85 measured). Check its DCR "
    "audit (near copies) when you use it."
)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a ``bool``), else ``None`` (a figure that was not
    measured, or that failed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


_LOOKS = ("class", "detail")
"""Keys of the checks that say whether the samples look like the data (a failure points to the adversarial phase)."""


def class_name(names: Any, c: int) -> str:
    """The name of class ``c`` from ``names`` (a list of class names, as ``metrics.json["class_names"]``), else
    ``"class c"``."""
    return str(names[c]) if isinstance(names, (list, tuple)) and 0 <= c < len(names) else f"class {c}"


def _lowest_class(headline: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(name, agreement)`` of the conditioning class with the lowest class agreement, when the headline has the
    per-class figures of more than one class (``class_agreement_per_class``, named by ``class_names``)."""
    per_class = headline.get("class_agreement_per_class")
    if not isinstance(per_class, (list, tuple)):
        return None
    values = [(c, v) for c, v in enumerate(per_class) if finite_or_none(v) is not None]
    if len(values) < 2:
        return None
    c, v = min(values, key=lambda cv: cv[1])
    return class_name(headline.get("class_names"), c), float(v)


def headline_checks(headline: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The checks of :data:`HEADLINE_CHECKS` on the figures of ``report.headline_figures`` (the flow's).

    Args:
        headline: ``headline_figures(metrics)`` (or ``metrics.json["headline"]``).

    Returns:
        One dict per check: ``key`` (``"class"``, ``"tstr"``, ``"fid"``, ``"detail"``, ``"decode"``,
        ``"memorisation"``), ``name``, ``wanted`` (text), ``measured`` (text) and ``holds`` (``True`` / ``False``, or
        ``None`` when the figure is missing: the check is reported as not measured, never as passed).
    """
    t = HEADLINE_CHECKS
    agree, real = finite_or_none(headline.get("class_agreement")), finite_or_none(headline.get("real_test_accuracy"))
    gap, ratio = finite_or_none(headline.get("gap_points")), finite_or_none(headline.get("fid_ratio"))
    mia, sharp = finite_or_none(headline.get("mia_auc")), finite_or_none(headline.get("sharpness_ratio"))
    over, n = headline.get("images_with_overflow"), headline.get("n_images")
    over = None if isinstance(over, bool) or not isinstance(over, int) else over
    agreement_text = None if agree is None or real is None else f"{agree:.3f} vs real {real:.3f}"
    lowest = _lowest_class(headline)
    if agreement_text is not None and lowest is not None:
        agreement_text += f" (lowest class: {lowest[0]} {lowest[1]:.3f})"
    balanced, k = finite_or_none(headline.get("real_balanced_accuracy")), headline.get("num_classes")
    at_chance = (
        balanced is not None and isinstance(k, int) and not isinstance(k, bool) and k >= 2
        and balanced < 1.0 / k + t["chance_margin"]
    )  # fmt: skip
    checks = [
        (
            "class",
            "synthetic images keep their class",
            f"class agreement >= real test accuracy - {t['class_agreement_margin']:.2f}",
            agreement_text,
            None if agree is None or real is None else agree >= real - t["class_agreement_margin"],
        ),
        (
            "tstr",
            "a classifier trained on them works on real images",
            f"TSTR at most {t['tstr_gap_points']:g} points below TRTR",
            None if gap is None else f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}",
            None if gap is None else gap <= t["tstr_gap_points"],
        ),
        (
            "fid",
            "they look like the real images to the classifier",
            f"FID / floor <= {t['fid_ratio']:g}",
            None if ratio is None else f"{ratio:.3g}",
            None if ratio is None else ratio <= t["fid_ratio"],
        ),
        (
            "detail",
            "their fine detail is like the real images'",
            f"Laplacian energy synthetic / real within [{1 / t['sharpness_ratio']:.2f}, {t['sharpness_ratio']:.2f}]",
            None if sharp is None else f"{sharp:.3f}",
            None if sharp is None else 1 / t["sharpness_ratio"] <= sharp <= t["sharpness_ratio"],
        ),
        (
            "decode",
            "they decode cleanly",
            "no image with pixels outside [-0.25, 1.25] or non-finite before clamping",
            None if over is None else (f"{over} of {n}" if isinstance(n, int) else f"{over} images"),
            None if over is None else over == 0,
        ),
        (
            "memorisation",
            "the flow does not memorise its training images",
            f"membership-inference AUC <= {t['mia_auc']:.2f}",
            None if mia is None else f"{mia:.3f}",
            None if mia is None else mia <= t["mia_auc"],
        ),
    ]
    out = [{"key": k, "name": a, "wanted": b, "measured": c or "not measured", "holds": d} for k, a, b, c, d in checks]
    if at_chance:  # the reference itself cannot tell the classes apart: neither check can pass or fail
        for check in out[:2]:
            if check["holds"] is not None:
                check["measured"] += f"; not judged: real classifier at chance (balanced accuracy {balanced:.3f})"
                check["holds"], check["at_chance"] = None, True
    return out


def headline_check_lines(checks: list[Mapping[str, Any]], adversarial_steps: int | None) -> list[str]:
    """Markdown of the checks: a table, a count of the failed ones and, for a likelihood-only flow that fails the
    class or the fine-detail check, the hint to the adversarial phase. ``adversarial_steps``:
    ``metrics.json["flow_training"]["adversarial_steps"]`` (``None``: not recorded, no hint)."""
    mark = {True: "yes", False: "**no**", None: "not measured"}
    lines = ["| check | wanted | measured | holds |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['wanted']} | {c['measured']} | {mark[c['holds']]} |" for c in checks]
    failed = [c for c in checks if c["holds"] is False]
    lines += ["", f"{len(failed)} of {len(checks)} checks fail." if failed else "Every measured check holds."]
    if any(c.get("at_chance") for c in checks):
        lines += ["", AT_CHANCE_NOTE]
    if adversarial_steps == 0 and any(c["holds"] is False and c.get("key") in _LOOKS for c in checks):
        lines += ["", ADVERSARIAL_HINT]
    return lines
