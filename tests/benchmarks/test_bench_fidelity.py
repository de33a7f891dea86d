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
"""benchmarks/bench_fidelity.py without running the pipeline: arguments, figures of a run, summary and tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_fidelity")


def _metrics(trtr: float, tstr: float, agree: float, overflow: int, mia: float, pres: float | None) -> dict:
    scores = {"f1": 0.5, "precision": 0.5, "recall": 0.5}
    return {
        "trtr": dict(scores, accuracy=trtr),
        "tstr": dict(scores, accuracy=tstr),
        "trtr_point": [{"accuracy": trtr + 0.01}],
        "real_classifier_test_accuracy": trtr + 0.01,
        "fid": 0.5,
        "fid_floor": 0.05,
        "fid_ratio": 10.0,
        "class_agreement": agree,
        "class_agreement_real_blurred": 0.31,
        "sharpness_ratio": 0.62,
        "lattice_peak": 12.5,
        "samples": {"n_images": 840, "images_with_overflow": overflow, "overflow_pixel_fraction": 1e-4},
        "privacy": {"mia_auc": mia},
        "presumptive_accuracy": pres,
        "baseline": {"trtr": dict(scores, accuracy=trtr), "tstr": dict(scores, accuracy=0.7), "fid": 1.0},
    }


def test_arguments(bench):
    args = bench.parse_args([])
    assert args.datasets == ["phantom50", "phantom_all", "ucsd"] and args.seeds == [0, 1, 2]
    assert args.seed_scope == "flow" and not args.baseline and args.num_images == 600
    quick = bench.parse_args(["--quick", "--output-dir", "/tmp/x", "--baseline"])
    assert quick.datasets == ["phantom50"] and quick.seeds == [0] and quick.baseline
    assert quick.output_dir == Path("/tmp/x") and quick.num_images == 240
    args = bench.parse_args(["--datasets", "ucsd", "phantom50", "--seeds", "3", "4"])
    assert args.datasets == ["ucsd", "phantom50"] and args.seeds == [3, 4]
    with pytest.raises(SystemExit):
        bench.parse_args(["--datasets", "mnist"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "1", "1"])


def test_max_bpd_rise_from_epoch_and_iteration_series(bench):
    scalars = {
        ".": {
            "val_bpd": ([1, 2, 3, 4], [5.0, 4.6, 4.9, 4.5]),  # +0.3 at epoch 3
            # 2 iterations per epoch: epoch means 5.0, 4.5, 6.5, 4.4 -> +2.0 at epoch 3
            "train_bpd": ([1, 2, 3, 4, 5, 6, 7, 8], [5.1, 4.9, 4.6, 4.4, 4.5, 8.5, 4.4, 4.4]),
            "lr": ([1, 2], [1e-3, 1e-3]),
        }
    }
    out = bench.max_bpd_rise(scalars)
    assert out["epochs"] == 4
    assert out["val"] == pytest.approx(0.3) and out["train"] == pytest.approx(2.0)
    assert out["max_rise"] == pytest.approx(2.0)
    diverged = bench.max_bpd_rise({"flow": {"val_bpd": ([1, 2], [5.0, float("nan")])}})
    assert math.isinf(diverged["max_rise"]) and diverged["train"] is None
    assert bench.max_bpd_rise({})["max_rise"] is None


def test_summary_table_and_json_line(bench):
    rows = {
        "phantom50": {
            0: bench.run_row(_metrics(0.90, 0.86, 0.80, 0, 0.55, 0.92), 600.0, {"max_rise": 0.2}),
            1: bench.run_row(_metrics(0.90, 0.88, 0.90, 2, 0.65, 0.94), 700.0, {"max_rise": 0.4}),
        },
        "phantom_all": {0: bench.run_row(_metrics(0.96, 0.95, 0.93, 0, 0.60, None), 650.0, {"max_rise": None})},
    }
    row = rows["phantom50"][0]
    assert row["gap_points"] == pytest.approx(4.0) and row["real_test_accuracy"] == pytest.approx(0.91)
    assert row["overflowed_images"] == 0 and row["n_images"] == 840 and row["fid_ratio"] == 10.0
    assert row["baseline_tstr"] == 0.7 and row["baseline_fid_ratio"] == pytest.approx(20.0)
    assert row["blurred_agreement"] == 0.31 and row["sharpness_ratio"] == 0.62 and row["lattice_peak"] == 12.5
    assert row["agreement_judge_spread"] is None  # one evaluation classifier: no spread to give
    judged = dict(_metrics(0.90, 0.86, 0.80, 0, 0.55, 0.92), class_agreement_per_judge=[0.83, 0.54, 0.80])
    assert bench.run_row(judged, 600.0, None)["agreement_judge_spread"] == pytest.approx(0.29)
    summary = bench.summarize(rows)
    p50 = summary["phantom50"]
    assert p50["seeds"] == [0, 1]
    assert p50["mean"]["tstr"] == pytest.approx(0.87) and p50["std"]["tstr"] == pytest.approx(0.01)
    assert p50["mean"]["gap_points"] == pytest.approx(3.0) and p50["mean"]["overflowed_images"] == 1.0
    assert p50["mean"]["mia_auc"] == pytest.approx(0.60) and p50["mean"]["wall_s"] == 650.0
    assert p50["mean"]["max_bpd_rise"] == pytest.approx(0.3)
    assert summary["phantom_all"]["mean"]["presumptive_accuracy"] is None
    assert summary["phantom_all"]["std"]["tstr"] == 0.0

    text = bench.format_summary(summary, baseline=True)
    assert "== phantom50 (2 flow seed(s): 0, 1)" in text and "== phantom_all (1 flow seed(s): 0)" in text
    lines = text.splitlines()
    header = lines[1]
    for label in ("TRTR %", "TSTR %", "gap pts", "agree %", "real acc %", "FID/floor", "overflow", "MIA AUC",
                  "presump %", "wall s", "max bpd rise", "ACGAN TSTR %", "ACGAN FID/floor"):  # fmt: skip
        assert label in header
    assert lines[2].startswith("mean +- std") and "87.0 +- 1.0" in lines[2] and "3.0 +- 1.0" in lines[2]
    assert lines[3].startswith("seed 0") and "0/840" in lines[3] and "80.0" in lines[3] and "91.0" in lines[3]
    assert "2/840" in lines[4] and "n/a" in text  # phantom_all has no presumptive labels
    assert "ACGAN" not in bench.format_summary(summary)

    payload = json.loads(json.dumps(bench._json_safe({"datasets": summary})))
    assert payload["datasets"]["phantom50"]["mean"]["tstr"] == pytest.approx(0.87)
    inf = bench.summarize({"x": {0: {"max_bpd_rise": math.inf}, 1: {"max_bpd_rise": 0.1}}})
    assert math.isinf(inf["x"]["mean"]["max_bpd_rise"]) and "inf" in bench.format_summary(inf)
    assert bench._json_safe(inf)["x"]["mean"]["max_bpd_rise"] == "inf"


def test_the_classifier_stage_of_a_finished_seed_is_copied_not_retrained(bench, tmp_path):
    """With the flow seed the only difference between runs, a later seed copies the finished run's ``classifier/``
    (and its TensorBoard folder); an unfinished run, a run folder that has a classifier, or no other run: nothing."""
    root = tmp_path / "phantom50"
    first, second = root / "seed_0", root / "seed_1"
    (first / "classifier").mkdir(parents=True)
    (first / "classifier" / "classifier.json").write_text("{}")
    (first / "classifier" / "model.pt").write_bytes(b"weights")
    (first / "tensorboard" / "classifier").mkdir(parents=True)
    (first / "tensorboard" / "classifier" / "events").write_bytes(b"tb")
    assert bench._reuse_classifier(root, second) is None  # seed 0 has not finished (no bench_run.json)
    (first / "bench_run.json").write_text('{"stage_seconds": {"classifier (semi-supervised)": 170.0}}')
    assert bench._reuse_classifier(root, first) is None  # never from itself
    assert bench._reuse_classifier(root, second) == first / "classifier"
    assert (second / "classifier" / "model.pt").read_bytes() == b"weights"
    assert (second / "tensorboard" / "classifier" / "events").read_bytes() == b"tb"
    assert bench._reuse_classifier(root, second) is None  # it has one now
    assert bench.parse_args([]).retrain_classifier is False
    # a run made with other --stage-set settings is not copied from (its classifier may differ)
    third = root / "seed_2"
    recipe = ["classifier.max_epochs=3"]
    assert bench._reuse_classifier(root, third, recipe) is None and not (third / "classifier").exists()
    (first / "bench_run.json").write_text(json.dumps({"stage_seconds": {"c": 1.0}, "stage_set": recipe}))
    assert bench._reuse_classifier(root, third, list(reversed(recipe))) == first / "classifier"


def test_stage_set_is_parsed_checked_and_guards_reuse(bench, tmp_path):
    """``--stage-set`` is checked at parse time (bad item, unknown stage, the flow seed), and a finished run made
    with other settings is refused by name rather than reported as if it were the requested one."""
    recipe = ["flow.adversarial_steps=1200", "flow.adversarial_batch_size=16"]
    args = bench.parse_args(["--stage-set", recipe[0], "--stage-set", recipe[1], "--output-dir", str(tmp_path)])
    assert args.stage_set == recipe and bench.parse_args([]).stage_set == []
    for bad in ("flow.adversarial_steps", "nostage.x=1", "flow.seed=3"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--stage-set", bad])
    run = tmp_path / "ucsd" / "seed_0"
    run.mkdir(parents=True)
    (run / "bench_run.json").write_text(json.dumps({"row": {"tstr": 0.5}, "stage_set": []}))
    with pytest.raises(RuntimeError, match="stage-set"):
        bench._run_one("ucsd", tmp_path, 0, args)
    (run / "bench_run.json").write_text(json.dumps({"row": {"tstr": 0.6}, "stage_set": list(reversed(recipe))}))
    assert bench._run_one("ucsd", tmp_path, 0, args)["row"] == {"tstr": 0.6}


def test_flow_scalars_are_read_where_the_flow_stage_writes_them(bench, tmp_path):
    """The spike figure reads ``RUN/tensorboard/flow`` (the one-root layout; the old ``RUN/flow/tensorboard`` too) and
    fails loudly when neither holds a bits/dim series, instead of reporting no rise."""
    from torch.utils.tensorboard import SummaryWriter

    from monai_condflow.evaluation.report import read_tensorboard_scalars

    with pytest.raises(FileNotFoundError, match="no flow bits/dim scalars"):
        bench.flow_scalars(tmp_path, read_tensorboard_scalars)
    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "flow"))
    for epoch, value in enumerate([5.0, 4.5, 4.9, 4.2], start=1):
        writer.add_scalar("val_bpd", value, epoch)
    writer.close()
    rise = bench.max_bpd_rise(bench.flow_scalars(tmp_path, read_tensorboard_scalars))
    assert rise["val"] == pytest.approx(0.4) and rise["epochs"] == 4
