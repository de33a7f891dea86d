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
"""Issue 16: progress lines (counts, ETA) on the long loops, switchable off by the ``progress`` id, the command line
and ``CONDFLOW_PROGRESS=0``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.pipeline import BUNDLE_ROOT
from monai_condflow.progress import ENV_VAR, ProgressLog, progress_enabled


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)  # scripts/run_tests.sh turns it off for the logs


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_carry_counts_percent_elapsed_and_eta_and_are_throttled():
    clock, lines = _Clock(), []
    bar = ProgressLog(4, "generation", unit="images", interval=10.0, log=lines.append, clock=clock)
    clock.t += 5
    bar.update()  # 5 s since the start < interval: no line
    clock.t += 10
    bar.update()  # 2/4 after 15 s -> ETA 15 s
    clock.t += 1
    bar.update()  # 1 s after the last line: throttled
    clock.t += 1
    bar.update()  # complete: always logged
    bar.close()
    assert lines == [
        "generation: 2/4 images (50 %), 15 s elapsed, ETA 15 s",
        "generation: 4/4 images (100 %), 17 s elapsed",
    ]


def test_close_logs_where_an_interrupted_loop_stopped():
    clock, lines = _Clock(), []
    with pytest.raises(RuntimeError):
        with ProgressLog(10, "sweep", interval=1e9, log=lines.append, clock=clock) as bar:
            clock.t += 30
            bar.update(3)
            raise RuntimeError("stage failed")
    assert lines == ["sweep: 3/10 (30 %), 30 s elapsed, ETA 70 s"]


def test_switched_off_by_argument_and_by_environment(monkeypatch):
    lines = []
    bar = ProgressLog(2, "x", enabled=False, interval=0, log=lines.append)
    bar.update(2)
    assert lines == [] and bar.done == 2
    assert progress_enabled() and not progress_enabled(False)
    for value in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(ENV_VAR, value)
        assert not progress_enabled()
        ProgressLog(1, "x", interval=0, log=lines.append).update()
    assert lines == []
    monkeypatch.setenv(ENV_VAR, "1")
    assert progress_enabled()


def test_phantom_generation_reports_patients(tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        generate_phantom_dataset(tmp_path / "on", num_images=18, seed=1, image_size=64, slices_per_patient=2)
    assert "phantom: 9/9 patients (100 %)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        generate_phantom_dataset(
            tmp_path / "off", num_images=18, seed=1, image_size=64, slices_per_patient=2, progress=False
        )
    assert "patients (" not in caplog.text  # (the phantom module logs its own "phantom: wrote ..." line)


@pytest.mark.parametrize(
    "name, call", [("generate.json", "generation.generate("), ("evaluate.json", "run_evaluation(")]
)
def test_bundle_configs_have_a_progress_id_that_reaches_the_loop(name, call):
    config = json.loads((BUNDLE_ROOT / "configs" / name).read_text())
    common = json.loads((BUNDLE_ROOT / "configs" / "common.json").read_text())  # stacked first by every stage
    assert config.get("progress", common["progress"]) is True
    [run] = [expr for expr in config["run"] if call in expr]
    assert "progress=@progress" in run


def test_pipeline_no_progress_turns_the_stages_and_the_phantom_off(tmp_path: Path, monkeypatch):
    import monai_condflow.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: seen.update(overrides=a[3]) or {})
    assert pipeline.main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 0
    assert seen["overrides"]["progress"] is False
    assert pipeline.main([str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 0
    assert "progress" not in seen["overrides"]
    made = []
    monkeypatch.undo()
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train.txt", "val.txt", "test.txt"):
        (data / split).write_text("")
    monkeypatch.setattr(
        pipeline, "_prepare_default_dataset", lambda out, n, seed, progress: made.append(progress) or data
    )
    monkeypatch.setattr(pipeline.subprocess, "run", lambda cmd, env: type("P", (), {"returncode": 0})())
    pipeline.run_pipeline(None, tmp_path / "x", overrides={"progress": False}, stages=[])
    assert made == [False]
