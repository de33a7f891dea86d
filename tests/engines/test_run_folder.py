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
"""One writer per output folder (a lock; a dead writer's lock is taken over) and the settings fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monai_condflow.engines.run_folder import (
    LOCK_NAME,
    SETTINGS_NAME,
    OutputFolderLockedError,
    RunSettingsError,
    check_run_settings,
    close_run_folder,
    lock_output_dir,
    open_run_folder,
    release_output_dir,
)

ROOT = Path(__file__).resolve().parents[2]
_HOLDER = (
    "import sys, time\n"
    "from monai_condflow.engines.run_folder import lock_output_dir\n"
    "lock_output_dir(sys.argv[1], rank=0)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _hold_lock(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(OutputFolderLockedError, match=f"in use by another run \\(process {holder.pid}"):
            lock_output_dir(tmp_path, rank=0)
        with pytest.raises(OutputFolderLockedError):  # the bundle's entry point too
            open_run_folder(tmp_path, {"seed": 0})
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind by the killed process
    lock = lock_output_dir(tmp_path, rank=0)  # a stale lock: taken over
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert lock_output_dir(tmp_path, rank=0) is lock  # re-entrant in one process
    release_output_dir(tmp_path)
    release_output_dir(tmp_path)
    assert not lock.held
    assert lock_output_dir(tmp_path, rank=1) is None  # only rank 0 of a torchrun job locks


def test_settings_are_recorded_and_a_change_is_refused_naming_the_setting(tmp_path):
    check_run_settings(tmp_path, {"seed": 0, "lr": 1e-3, "betas": (0.5, 0.9)}, section="trainer")
    check_run_settings(tmp_path, {"seed": 0, "lr": 1e-3, "betas": [0.5, 0.9]}, section="trainer")  # same values
    check_run_settings(tmp_path, {"dataset_dir": "/data/a"}, section="stage")  # another section
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state_1.pt").write_bytes(b"a checkpoint of that run")
    with pytest.raises(RunSettingsError, match=r"'lr' was 0.001, now 0.002.*delete the folder"):
        check_run_settings(tmp_path, {"seed": 0, "lr": 2e-3}, section="trainer")
    recorded = json.loads((tmp_path / SETTINGS_NAME).read_text())
    assert recorded == {"trainer": {"seed": 0, "lr": 1e-3, "betas": [0.5, 0.9]}, "stage": {"dataset_dir": "/data/a"}}


def test_the_settings_of_a_run_that_left_no_files_do_not_bind_the_next_one(tmp_path):
    """A stage refused after it recorded its settings (a later check, a missing earlier stage) leaves only
    ``run_settings.json`` and the lock: a corrected rerun with other settings goes ahead and records its own, while
    one file of that run (at any depth) keeps the refusal."""
    open_run_folder(tmp_path, {"lr": 0.001, "seed": 0}, section="trainer")
    check_run_settings(tmp_path, {"dataset_dir": "/data/a"}, section="stage")
    close_run_folder(tmp_path)
    (tmp_path / "tensorboard").mkdir()  # an empty folder is no file of the run
    open_run_folder(tmp_path, {"lr": 0.002, "seed": 0}, section="trainer")
    close_run_folder(tmp_path)
    assert json.loads((tmp_path / SETTINGS_NAME).read_text()) == {"trainer": {"lr": 0.002, "seed": 0}}
    (tmp_path / "tensorboard" / "events.out").write_bytes(b"x")
    with pytest.raises(RunSettingsError, match=r"'lr' was 0.002, now 0.003"):
        open_run_folder(tmp_path, {"lr": 0.003, "seed": 0}, section="trainer")


def test_fresh_clears_the_earlier_run(tmp_path):
    open_run_folder(tmp_path, {"num_labels": "50"})
    close_run_folder(tmp_path)
    (tmp_path / "train_labels.json").write_text("[]")
    (tmp_path / "model.pt").write_bytes(b"old")
    (tmp_path / "samples").mkdir()
    with pytest.raises(RunSettingsError, match="'num_labels' was '50', now 'all'.*fresh=true"):
        open_run_folder(tmp_path, {"num_labels": "all"})
    assert (tmp_path / "train_labels.json").is_file()
    assert lock_output_dir(tmp_path, rank=0) is not None  # a refusal releases the lock
    release_output_dir(tmp_path)
    open_run_folder(tmp_path, {"num_labels": "all"}, fresh=True)
    close_run_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, SETTINGS_NAME]
    with pytest.raises(ValueError, match="'fresh'"):
        open_run_folder(tmp_path, {}, fresh="yes")


def test_fresh_also_empties_the_stages_tensorboard_folder(tmp_path):
    """The earlier run's event files were left and drawn under the fresh run's curves (two points per step)."""
    run, tb = tmp_path / "classifier", tmp_path / "tensorboard" / "classifier"
    (tb / "label_propagation").mkdir(parents=True)
    (tb / "events.out.tfevents.1.host").write_bytes(b"old")
    (tb / "label_propagation" / "events.out.tfevents.2.host").write_bytes(b"old")
    open_run_folder(run, {"seed": 0}, fresh_folders=[tb])
    close_run_folder(run)
    assert (tb / "events.out.tfevents.1.host").is_file()  # not fresh: kept (a resumed run continues its curves)
    open_run_folder(run, {"seed": 0}, fresh=True, fresh_folders=[tb, tmp_path / "absent"])
    close_run_folder(run)
    assert list(tb.iterdir()) == []


def test_a_caller_without_fresh_gives_its_own_hint(tmp_path):
    open_run_folder(tmp_path, {"lr": 0.001}, section="trainer")
    close_run_folder(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"a file of that run")
    with pytest.raises(RunSettingsError, match=r"'lr' was 0.001, now 0.002") as refused:
        open_run_folder(tmp_path, {"lr": 0.002}, section="trainer", fresh_hint="start in a new folder")
    assert str(refused.value).endswith("start fresh: start in a new folder.")
    assert "fresh=true" not in str(refused.value)
