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
"""Label-scarcity sweep: level names, label counts, the summary table and the resumable driver (pipeline faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import monai_condflow.evaluation.sweep as sweep
from monai_condflow.evaluation.sweep import labelled_count, level_name, run_label_sweep, summarize_sweep


@pytest.mark.parametrize(
    "level, name",
    [(20, "20"), (50, "50"), (0.05, "5pct"), (0.005, "0p5pct"), (0.01, "1pct"), (0.125, "12p5pct"), ("all", "all"),
     (1.0, "1"), (20.0, "20")],
)  # fmt: skip
def test_level_name(level, name):
    assert level_name(level) == name


@pytest.mark.parametrize(
    "level, n_train, expected",
    [("all", 1000, 1000), (20, 1000, 20), (20, 10, 10), (0.05, 1000, 50), (0.005, 1000, 5), (0.001, 1000, 2),
     (0.5, 7, 4), (0.05, 30, 2)],
)  # fmt: skip
def test_labelled_count(level, n_train, expected):
    assert labelled_count(level, n_train) == expected


def test_labelled_count_at_least_one_per_class():
    assert labelled_count(0.001, 1000, num_classes=3) == 3


def _scores(acc: float, f1: float, std: float | None = None) -> dict:
    out = {"accuracy": acc, "f1": f1, "precision": 0.5, "recall": 0.5}
    return out if std is None else {**out, "accuracy_std": std}


def test_summarize_sweep_rows_and_ratio_to_all():
    results = {
        "20": {"trtr": _scores(0.9, 0.88, 0.01), "tstr": _scores(0.6, 0.55, 0.02), "fid": 0.5, "num_labels": 20},
        "all": {"trtr": _scores(0.95, 0.9), "tstr": _scores(0.8, 0.75), "fid": 0.1, "presumptive_accuracy": 0.9},
    }
    summary = summarize_sweep(results, n_train=400)
    assert summary["n_train"] == 400 and [r["level"] for r in summary["rows"]] == ["20", "all"]
    low, full = summary["rows"]
    assert low == {
        "level": "20", "num_labels": 20, "tstr_accuracy": 0.6, "tstr_accuracy_std": 0.02, "tstr_f1": 0.55,
        "trtr_accuracy": 0.9, "trtr_accuracy_std": 0.01, "trtr_f1": 0.88, "fid": 0.5, "presumptive_accuracy": None,
        "tstr_vs_all": pytest.approx(0.75),
    }  # fmt: skip
    assert full["tstr_vs_all"] == 1.0 and full["presumptive_accuracy"] == 0.9 and full["num_labels"] is None
    without_all = summarize_sweep({"20": results["20"]})
    assert without_all["rows"][0]["tstr_vs_all"] is None and without_all["n_train"] is None


class _Clock:
    """Stands in for the ``time`` module of the sweep: the fake pipeline advances it by 12 s per level."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


_METRICS = {
    "20": {"trtr": _scores(0.9, 0.88, 0.01), "tstr": _scores(0.6, 0.55, 0.02), "fid": 0.1234},
    "5pct": {"trtr": _scores(0.9, 0.88, 0.01), "tstr": _scores(0.7, 0.66), "fid": 2.5},
    "all": {"trtr": _scores(0.92, 0.9, 0.01), "tstr": _scores(0.8, 0.78, 0.015), "fid": 0.05},
}


@pytest.fixture
def fake_pipeline(monkeypatch):
    clock = _Clock()
    calls = []

    def fake_run_pipeline(dataset_dir, output_dir, num_labels, overrides=None, stages=None, seed=0, **kwargs):
        name = level_name(num_labels)
        calls.append({"level": num_labels, "dir": Path(output_dir), "overrides": overrides, "seed": seed,
                      "stages": [s.name for s in stages], "dataset_dir": dataset_dir})  # fmt: skip
        clf = Path(output_dir) / "classifier"
        clf.mkdir(parents=True, exist_ok=True)
        if name == "20":
            rounds = [{"presumptive_accuracy": 0.5}, {"presumptive_accuracy": 0.75}]
            labels = [{"image": f"{i}.png", "label": i % 2, "presumptive": i >= 20} for i in range(50)]
        elif name == "5pct":
            rounds = []
            labels = [{"image": f"{i}.png", "label": 0, "presumptive": i >= 7} for i in range(50)]
        else:
            rounds, labels = None, None
        (clf / "classifier.json").write_text(json.dumps({"preset": "small", "rounds": rounds}))
        if labels is not None:
            (clf / "train_labels.json").write_text(json.dumps(labels))
        (Path(output_dir) / "metrics.json").write_text(json.dumps(_METRICS[name]))
        clock.now += 12.0
        return {}

    monkeypatch.setattr(sweep, "run_pipeline", fake_run_pipeline)
    monkeypatch.setattr(sweep, "time", clock)
    return calls


_TABLE_ROWS = [
    "| 20 | 20 | 0.750 | 90.00 ± 1.00 | 60.00 ± 2.00 | 55.00 | 0.1234 | 0.750 | 12 |",
    "| 5pct | 7 | - | 90.00 ± 1.00 | 70.00 | 66.00 | 2.5 | 0.875 | 12 |",
    "| all | - | - | 92.00 ± 1.00 | 80.00 ± 1.50 | 78.00 | 0.05 | 1.000 | 12 |",
]


def test_run_label_sweep_writes_table_json_and_plot(tmp_path, fake_pipeline):
    out = tmp_path / "sweep"
    summary = run_label_sweep(tmp_path / "data", out, levels=[20, 0.05, "all"], overrides={"lr": 0.1},
                              baseline_at=["all"], seed=7)  # fmt: skip
    assert [c["level"] for c in fake_pipeline] == [20, 0.05, "all"]
    assert [c["dir"] for c in fake_pipeline] == [out.resolve() / f"labels_{n}" for n in ("20", "5pct", "all")]
    assert all(c["overrides"] == {"seed": 7, "lr": 0.1} and c["seed"] == 7 for c in fake_pipeline)
    assert fake_pipeline[0]["stages"] == ["classifier (semi-supervised)", "flow", "generation", "evaluation"]
    assert fake_pipeline[2]["stages"] == ["classifier", "flow", "generation", "baseline (ACGAN)", "evaluation"]

    rows = {r["level"]: r for r in summary["rows"]}
    assert [r["num_labels"] for r in summary["rows"]] == [20, 7, None]  # non-presumptive entries of train_labels
    assert rows["20"]["presumptive_accuracy"] == 0.75 and rows["5pct"]["presumptive_accuracy"] is None
    assert rows["5pct"]["tstr_vs_all"] == pytest.approx(0.875)
    assert summary["times"] == {"20": 12.0, "5pct": 12.0, "all": 12.0}
    assert summary["levels"] == ["20", "5pct", "all"]
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(summary))
    assert all(json.loads((out / f"labels_{n}" / "sweep_time.json").read_text()) == {"seconds": 12.0} for n in rows)

    md = (out / "sweep.md").read_text().splitlines()
    assert md[0] == "# Label-scarcity sweep"
    header = md.index("|---|---|---|---|---|---|---|---|---|")
    assert md[header + 1 : header + 4] == _TABLE_ROWS
    assert "![label sweep](figures/label_sweep.png)" in md
    with Image.open(out / "figures" / "label_sweep.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_run_label_sweep_resumes_finished_levels(tmp_path, fake_pipeline):
    out = tmp_path / "sweep"
    first = run_label_sweep(tmp_path / "data", out, levels=[20, 0.05, "all"])
    assert len(fake_pipeline) == 3
    second = run_label_sweep(tmp_path / "data", out, levels=[20, 0.05, "all"])
    assert len(fake_pipeline) == 3  # every level has its metrics.json: nothing runs again
    assert second == first
    (out / "labels_5pct" / "metrics.json").unlink()  # a level killed before its evaluation
    third = run_label_sweep(tmp_path / "data", out, levels=[20, 0.05, "all"])
    assert [c["level"] for c in fake_pipeline[3:]] == [0.05]
    assert third["rows"] == first["rows"] and third["times"] == {"20": 12.0, "5pct": 12.0, "all": 12.0}
    md = (out / "sweep.md").read_text().splitlines()
    assert [line for line in md if line.startswith("| ") and not line.startswith("| labels")] == _TABLE_ROWS


def test_sweeps_of_different_levels_side_by_side_keep_every_time(tmp_path, fake_pipeline):
    # two sweep processes over one folder (here: one after the other, each with its own level list)
    out = tmp_path / "sweep"
    run_label_sweep(tmp_path / "data", out, levels=[20])
    run_label_sweep(tmp_path / "data", out, levels=[0.05])
    joint = run_label_sweep(tmp_path / "data", out, levels=[20, 0.05])
    assert len(fake_pipeline) == 2 and joint["times"] == {"20": 12.0, "5pct": 12.0}


def test_run_label_sweep_reads_the_earlier_shared_times_file(tmp_path, fake_pipeline):
    out = tmp_path / "sweep"
    run_label_sweep(tmp_path / "data", out, levels=[20])
    (out / "labels_20" / "sweep_time.json").unlink()
    (out / "sweep_times.json").write_text(json.dumps({"20": 99.0, "gone": 1.0}))
    assert run_label_sweep(tmp_path / "data", out, levels=[20])["times"] == {"20": 99.0}


def test_a_level_held_by_a_live_sweep_process_is_skipped(tmp_path, fake_pipeline, capsys):
    out = tmp_path / "sweep"
    (out / "labels_20").mkdir(parents=True)
    (out / "labels_20" / sweep.LOCK_NAME).write_text(str(os.getppid()))  # a live process (pytest's parent)
    summary = run_label_sweep(tmp_path / "data", out, levels=[20, "all"])
    assert [c["level"] for c in fake_pipeline] == ["all"]
    assert [r["level"] for r in summary["rows"]] == ["all"]
    assert (out / "labels_20" / sweep.LOCK_NAME).is_file()  # not ours to remove
    assert "another sweep process is running it" in capsys.readouterr().out


def test_a_stale_lock_is_taken_over_and_every_lock_is_released(tmp_path, fake_pipeline):
    out = tmp_path / "sweep"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "labels_20").mkdir(parents=True)
    (out / "labels_20" / sweep.LOCK_NAME).write_text(gone.stdout.strip())  # that process has exited
    run_label_sweep(tmp_path / "data", out, levels=[20])
    assert [c["level"] for c in fake_pipeline] == [20]
    assert not (out / "labels_20" / sweep.LOCK_NAME).exists()


def test_the_lock_is_released_when_the_pipeline_fails(tmp_path, monkeypatch):
    def failing_pipeline(*args, **kwargs):
        raise RuntimeError("stage flow failed")

    monkeypatch.setattr(sweep, "run_pipeline", failing_pipeline)
    with pytest.raises(RuntimeError, match="stage flow failed"):
        run_label_sweep(tmp_path / "data", tmp_path / "sweep", levels=[20])
    assert not (tmp_path / "sweep" / "labels_20" / sweep.LOCK_NAME).exists()


def test_run_label_sweep_with_a_null_fid(tmp_path, fake_pipeline, monkeypatch):
    monkeypatch.setitem(_METRICS, "all", {**_METRICS["all"], "fid": None})
    run_label_sweep(tmp_path / "data", tmp_path / "sweep", levels=["all"])
    row = [line for line in (tmp_path / "sweep" / "sweep.md").read_text().splitlines() if line.startswith("| all")]
    assert row == ["| all | - | - | 92.00 ± 1.00 | 80.00 ± 1.50 | 78.00 | - | 1.000 | 12 |"]


def test_sweep_progress_lines_and_the_switch(tmp_path, fake_pipeline, capsys, monkeypatch):
    """Issue 16: a count and ETA per level run here; ``progress=False`` also reaches the stages as an override."""
    monkeypatch.delenv("CONDFLOW_PROGRESS", raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("".join(f"img_{i}.png 0 0 0 1 1\n" for i in range(50)))
    run_label_sweep(tmp_path / "data", tmp_path / "a", levels=[20, "all"])
    out = capsys.readouterr().out
    assert "[sweep] levels: 1/2 levels (50 %)" in out and "ETA" in out and "[sweep] levels: 2/2 levels" in out
    assert (tmp_path / "a" / "figures" / "label_sweep.png").is_file()
    assert (tmp_path / "a" / "figures" / "label_sweep.pdf").is_file()
    run_label_sweep(tmp_path / "data", tmp_path / "b", levels=[20], progress=False)
    assert "[sweep] levels:" not in capsys.readouterr().out
    assert fake_pipeline[-1]["overrides"] == {"seed": 0, "progress": False}
