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
"""Tests for the main job's orchestration (the stages themselves are covered by tests/bundle)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from monai_condflow.pipeline import CPU_BUDGET, Stage, _parse_num_labels, default_stages, main, run_pipeline


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for split in ("train.txt", "val.txt", "test.txt"):
        (root / split).write_text("")
    return root


def test_stage_command_and_override_order(tmp_path: Path):
    stage = Stage("s", ["a.json", "b.json"], {"max_epochs": 30, "lr": 0.1})
    cmd = stage.command(tmp_path, {"max_epochs": 2, "dataset_dir": "/d"})
    assert cmd[cmd.index("--config_file") + 1] == json.dumps(
        [str(tmp_path / "configs" / f) for f in ("a.json", "b.json")]
    )
    assert cmd[cmd.index("--max_epochs") + 1] == "2"  # the user's value wins over the stage budget
    assert cmd[cmd.index("--lr") + 1] == "0.1" and cmd[cmd.index("--dataset_dir") + 1] == "/d"


def test_default_stages():
    semi = default_stages(50)
    assert [s.name for s in semi] == ["classifier (semi-supervised)", "flow", "generation", "evaluation"]
    assert semi[0].config_files == ["train_classifier.json", "train_semisupervised.json"]
    assert default_stages("all")[0].config_files == ["train_classifier.json"]
    assert semi[1].overrides == CPU_BUDGET["flow"]


@pytest.mark.parametrize("text, value", [("all", "all"), ("50", 50), ("0.05", 0.05), ("1", 1)])
def test_parse_num_labels(text, value):
    assert _parse_num_labels(text) == value


def test_parse_num_labels_bad():
    with pytest.raises(argparse.ArgumentTypeError, match="--num-labels"):
        _parse_num_labels("-2")


def test_missing_dataset_and_split_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(tmp_path / "nowhere", tmp_path / "out", stages=[])
    data = _dataset(tmp_path / "d")
    (data / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        run_pipeline(data, tmp_path / "out", stages=[])
    assert main([str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")]) == 1


def test_stages_run_in_order_and_a_failure_names_the_stage(tmp_path: Path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    marker = tmp_path / "ran.txt"
    ok = {
        "imports": ["$import pathlib"],
        "marker": str(marker),
        "run": ["$pathlib.Path(@marker).write_text(@output_dir)"],
    }
    (bundle / "configs" / "ok.json").write_text(json.dumps(ok))
    (bundle / "configs" / "bad.json").write_text(json.dumps({"run": ["$1/0"]}))
    (bundle / "configs" / "logging.conf").write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n[logger_root]\nlevel=INFO\nhandlers=h\n"
        "[handler_h]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stdout,)\n[formatter_f]\nformat=%(message)s\n"
    )
    data = _dataset(tmp_path / "d")
    times = run_pipeline(data, tmp_path / "out", stages=[Stage("first", ["ok.json"])], bundle_root=bundle)
    assert list(times) == ["first"] and marker.read_text() == str((tmp_path / "out").resolve())
    with pytest.raises(RuntimeError, match="stage 'second' failed"):
        run_pipeline(data, tmp_path / "out", stages=[Stage("second", ["bad.json"])], bundle_root=bundle)
