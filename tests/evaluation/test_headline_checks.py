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
"""The plain-language checks under the report's headline: thresholds at their edges, missing figures, the hint."""

from __future__ import annotations

import json

import torch

from monai_condflow.evaluation.headline_checks import (
    ADVERSARIAL_HINT,
    AT_CHANCE_NOTE,
    headline_check_lines,
    headline_checks,
)
from monai_condflow.evaluation.report import write_report

_GOOD = {
    "class_agreement": 0.80,
    "real_test_accuracy": 0.90,  # 0.80 >= 0.90 - 0.10: holds at the edge
    "gap_points": 3.0,
    "fid_ratio": 10.0,
    "sharpness_ratio": 1.25,
    "images_with_overflow": 0,
    "n_images": 840,
    "mia_auc": 0.60,
}


def _holds(headline):
    return [c["holds"] for c in headline_checks(headline)]


def test_each_check_holds_at_its_threshold_and_fails_just_past_it():
    assert _holds(_GOOD) == [True] * 6
    assert _holds({**_GOOD, "sharpness_ratio": 0.8}) == [True] * 6  # 1 / 1.25: the blurred edge
    past = {
        "class_agreement": 0.7999,
        "gap_points": 3.01,
        "fid_ratio": 10.01,
        "sharpness_ratio": 1.2501,
        "images_with_overflow": 1,
        "mia_auc": 0.601,
    }
    for i, (key, value) in enumerate(past.items()):
        expected = [True] * 6
        expected[i] = False
        assert _holds({**_GOOD, key: value}) == expected, key
    assert _holds({**_GOOD, "sharpness_ratio": 0.7999})[3] is False  # blur fails too
    # the main job's default run of 2026-12-05: every check fails
    main_job = {"class_agreement": 0.355, "real_test_accuracy": 0.911, "gap_points": 16.7, "fid_ratio": 53.5,
                "sharpness_ratio": 1.288, "images_with_overflow": 155, "n_images": 840, "mia_auc": 0.810}  # fmt: skip
    checks = headline_checks(main_job)
    assert [c["holds"] for c in checks] == [False] * 6
    assert [c["key"] for c in checks] == ["class", "tstr", "fid", "detail", "decode", "memorisation"]
    assert checks[0]["measured"] == "0.355 vs real 0.911" and checks[4]["measured"] == "155 of 840"
    assert checks[1]["measured"] == "16.7 points below"
    assert headline_checks({**_GOOD, "gap_points": -3.1})[1] == {
        "key": "tstr", "name": "a classifier trained on them works on real images",
        "wanted": "TSTR at most 3 points below TRTR", "measured": "3.1 points above", "holds": True,
    }  # fmt: skip


def test_a_missing_or_non_finite_figure_is_not_measured_never_passed():
    for key in ("class_agreement", "real_test_accuracy", "gap_points", "fid_ratio", "sharpness_ratio", "mia_auc"):
        for bad in (None, float("nan"), float("inf"), True):
            checks = headline_checks({**_GOOD, key: bad})
            missing = [c for c in checks if c["holds"] is None]
            assert len(missing) == 1 and missing[0]["measured"] == "not measured", (key, bad)
    assert _holds({**_GOOD, "images_with_overflow": None})[4] is None
    assert headline_checks({**_GOOD, "images_with_overflow": 2, "n_images": None})[4]["measured"] == "2 images"


def test_lines_count_failures_and_hint_only_for_a_likelihood_flow_that_loses_the_class():
    failing = {**_GOOD, "class_agreement": 0.3}
    lines = headline_check_lines(headline_checks(failing), adversarial_steps=0)
    assert "| synthetic images keep their class | class agreement >= real test accuracy - 0.10 |" in lines[2]
    assert lines[2].endswith("| 0.300 vs real 0.900 | **no** |")
    assert "1 of 6 checks fail." in lines and lines[-1] == ADVERSARIAL_HINT
    assert ADVERSARIAL_HINT not in headline_check_lines(headline_checks(failing), adversarial_steps=1200)
    assert ADVERSARIAL_HINT not in headline_check_lines(headline_checks(failing), adversarial_steps=None)
    other_fail = headline_check_lines(headline_checks({**_GOOD, "mia_auc": 0.9}), adversarial_steps=0)
    assert ADVERSARIAL_HINT not in other_fail and "1 of 6 checks fail." in other_fail
    # blobs whose class a weak judge still reads: the fine-detail check fails and the hint is given
    blobs = headline_check_lines(headline_checks({**_GOOD, "sharpness_ratio": 0.754}), adversarial_steps=0)
    assert blobs[-1] == ADVERSARIAL_HINT and "| 0.754 | **no** |" in blobs[5]
    assert "Every measured check holds." in headline_check_lines(headline_checks(_GOOD), 0)


def test_report_shows_the_checks_and_metrics_json_holds_them(tmp_path):
    scores = {"accuracy": 0.9, "f1": 0.9, "precision": 0.9, "recall": 0.9}
    metrics = {
        "trtr": scores,
        "tstr": dict(scores, accuracy=0.7),
        "fid": 0.5,
        "fid_floor": 0.01,
        "class_agreement": 0.4,
        "real_classifier_test_accuracy": 0.9,
        "sharpness_ratio": 1.1,
        "samples": {"n_images": 10, "images_with_overflow": 0},
        "privacy": {"mia_auc": 0.55},
        "flow_training": {"adversarial_steps": 0},
    }
    grids = {f"{src} c": torch.rand(2, 1, 8, 8) for src in ("real", "flow")}
    report, js = write_report(tmp_path, metrics, sample_images=grids)
    text = report.read_text()
    top = text[: text.index("## Fidelity")]
    assert top.index("| class | real | flow |") < top.index("### Checks")  # grids first, then the checks
    assert "| they look like the real images to the classifier | FID / floor <= 10 | 50 | **no** |" in top
    assert "| they decode cleanly |" in top and "| 0 of 10 | yes |" in top
    assert "3 of 6 checks fail." in top and ADVERSARIAL_HINT in top
    checks = json.loads(js.read_text())["checks"]
    assert [c["holds"] for c in checks] == [False, False, False, True, True, True]
    assert checks[1]["measured"] == "20.0 points below"


def test_the_class_check_names_the_class_the_samples_lose():
    # overall 0.265: the evaluation classifier calls nearly every synthetic slice COVID-19
    headline = {**_GOOD, "class_agreement": 0.265, "class_agreement_per_class": [0.033, 1.0],
                "class_names": ["non-COVID", "COVID-19"]}  # fmt: skip
    check = headline_checks(headline)[0]
    assert check["measured"] == "0.265 vs real 0.900 (lowest class: non-COVID 0.033)" and check["holds"] is False
    # unnamed classes, a missing class (None) and a single measured class
    unnamed = headline_checks({**headline, "class_names": None, "class_agreement_per_class": [0.9, None, 0.4]})[0]
    assert unnamed["measured"].endswith("(lowest class: class 2 0.400)")
    one = headline_checks({**headline, "class_agreement_per_class": [0.5, None]})[0]
    assert one["measured"] == "0.265 vs real 0.900"


def test_class_and_tstr_checks_are_not_judged_when_the_real_classifier_is_at_chance(tmp_path):
    """A 1-epoch evaluation classifier at chance (balanced accuracy 1/3 of 3 classes) made both checks read "yes"
    although they compare with it; now they are neither passed nor failed, and the report says why."""
    at_chance = {**_GOOD, "real_balanced_accuracy": 1 / 3, "num_classes": 3}
    checks = headline_checks(at_chance)
    assert [c["holds"] for c in checks] == [None, None, True, True, True, True]
    assert checks[0]["measured"].startswith("0.800 vs real 0.900; not judged: real classifier at chance (balanced")
    assert AT_CHANCE_NOTE in headline_check_lines(checks, adversarial_steps=1200)
    # just above chance + 0.05 (0.3334 + 0.05): judged as before; a missing count: no guard
    assert _holds({**at_chance, "real_balanced_accuracy": 1 / 3 + 0.0501}) == [True] * 6
    assert _holds({**at_chance, "num_classes": None}) == [True] * 6
    assert AT_CHANCE_NOTE not in headline_check_lines(headline_checks(_GOOD), adversarial_steps=1200)
    # through the report: TRTR's per-class recall [1, 0] (majority class only) of two classes is 0.5 = chance
    scores = {"accuracy": 0.75, "f1": 0.4, "precision": 0.4, "recall": 0.5, "per_class_recall": [1.0, 0.0]}
    metrics = {"trtr": scores, "tstr": dict(scores), "class_agreement": 0.75, "real_classifier_test_accuracy": 0.75,
               "fid": 0.5, "fid_floor": 0.01, "samples": {"n_images": 10, "images_with_overflow": 0}}  # fmt: skip
    report, js = write_report(tmp_path, metrics)
    data = json.loads(js.read_text())
    assert data["headline"]["real_balanced_accuracy"] == 0.5 and data["headline"]["num_classes"] == 2
    assert [c["holds"] for c in data["checks"]][:2] == [None, None] and AT_CHANCE_NOTE in report.read_text()
