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
"""Flow checkpoints under kills, leftovers of other runs and exact resume with random transforms
: a kill at every write / delete of a checkpoint rotation leaves a folder that resumes to the uninterrupted
run's weights."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.transforms import Compose, RandGaussianNoised

from monai_condflow.engines.flow import FLOW_STATE_PREFIXES
from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.engines.run_folder import RunSettingsError
from monai_condflow.engines.stages import finish_flow_stage
from monai_condflow.handlers.checkpoint import AtomicDiskSaver, find_latest_checkpoint, load_checkpoint
from monai_condflow.transforms import Dequantized
from monai_condflow.utils.distributed import create_loader
from tests.engines.state_diff import max_state_diff

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _train(out: Path, *, max_epochs=3, random_transforms=False, stop_at_iteration=None, **kwargs):
    """The tiny flow; ``random_transforms`` adds dequantisation noise and an augmentation drawn by the loader."""
    data = W.make_flow_data(16, 0)
    if random_transforms:
        chain = Compose([RandGaussianNoised("image", prob=0.5, std=0.01), Dequantized("image", n_bits=5)])
        data = Dataset(data, transform=chain)
    train = create_loader(data, 8, shuffle=True, seed=3)
    val = create_loader(W.make_flow_data(8, 1), 8, shuffle=False, seed=3)
    args = {"device": "cpu", "max_epochs": max_epochs, "output_dir": out, "warmup_epochs": 1, "lr": 1e-3, "seed": 5,
            "tensorboard": False, "n_saved": 1, **kwargs}  # fmt: skip
    trainer, evaluator = create_flow_trainer(W.make_flow(1), None, train, val, **args)
    if stop_at_iteration is not None:  # a kill mid-epoch: nothing of the running epoch is saved

        def _kill(engine):
            raise KeyboardInterrupt

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at_iteration), _kill)
    trainer.run()
    return trainer


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.network.flow.state_dict().items()}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_a_kill_at_every_checkpoint_write_point_leaves_a_folder_that_resumes(tmp_path, monkeypatch):
    """the folder is captured (as a kill -9 would leave it) before and after every rename and delete that the
    checkpoint rotation does; temp files are captured truncated. Each capture resumes to the uninterrupted run."""
    reference = _weights(_train(tmp_path / "full"))
    run = tmp_path / "run"
    snapshots: list[tuple[str, dict[str, bytes]]] = []
    real_replace, real_unlink = os.replace, os.unlink

    def _capture(label: str) -> None:
        files = _snapshot(run)
        files = {n: (b[: len(b) // 2] if n.startswith((".", "tmp")) else b) for n, b in files.items()}
        snapshots.append((label, files))

    def _replace(src, dst, *args, **kwargs):
        inside = Path(dst).parent == run
        if inside:
            _capture(f"before replace {Path(dst).name}")
        real_replace(src, dst, *args, **kwargs)
        if inside:
            _capture(f"after replace {Path(dst).name}")

    def _unlink(path, *args, **kwargs):
        inside = Path(path).parent == run and Path(path).suffix == ".pt"
        if inside:
            _capture(f"before delete {Path(path).name}")
        real_unlink(path, *args, **kwargs)
        if inside:
            _capture(f"after delete {Path(path).name}")

    monkeypatch.setattr(os, "replace", _replace)
    monkeypatch.setattr(os, "unlink", _unlink)
    monkeypatch.setattr(os, "remove", _unlink)
    _train(run)
    monkeypatch.undo()
    labels = [label for label, _ in snapshots]
    assert any(label.startswith("before delete state_") for label in labels), labels  # a rotation happened
    assert any(label == "before replace model.pt" for label in labels), labels  # the best epoch's model, in place
    for i, (label, files) in enumerate(snapshots):
        folder = tmp_path / f"kill{i}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        resumed = _train(folder, resume_from=folder)
        assert resumed.state.epoch == 3, label
        assert max_state_diff(reference, _weights(resumed)) <= 1e-6, label
        assert not [p.name for p in folder.iterdir() if p.name.startswith("tmp") or p.name.endswith(".tmp")], label
        finish_flow_stage(folder, resumed.network.flow, {"preset": "tiny"})  # keeps the run's model.pt
        assert "network" in load_checkpoint(folder / "model.pt"), label
        assert json.loads((folder / "flow.json").read_text())["selected"].startswith("best validation epoch"), label


_KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import test_flow_crash as T
run, op, k = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real, seen = getattr(os, op), []
def hook(path, *args, **kwargs):
    target = Path(args[0] if op == "replace" else path)
    if target.parent == run and target.suffix == ".pt":
        seen.append(target.name)
        if len(seen) == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
setattr(os, op, hook)
T._train(run)
"""


@pytest.mark.parametrize("op,k", [("replace", 3), ("unlink", 1)])
def test_a_real_kill_9_during_a_rotation_then_resume(tmp_path, op, k):
    """A crash inside a checkpoint rotation, with a real SIGKILL: just before the 3rd rename into place (epoch 1
    wrote model.pt then its state file; the 3rd is epoch 2's model.pt, or its state file when epoch 2 did not
    improve) / the 1st delete of a rotation (epoch 1's state file, after epoch 2's is written)."""
    run = tmp_path / "run"
    # the same intra-op thread count as this process (the reference run): float sums differ between thread counts
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": threads}
    args = [sys.executable, "-c", _KILLER, str(run), op, str(k), str(Path(__file__).parent)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = _train(run, resume_from=run)
    assert resumed.state.epoch == 3
    assert max_state_diff(_weights(_train(tmp_path / "full")), _weights(resumed)) <= 1e-6


def test_a_deleted_best_checkpoint_does_not_block_resume(tmp_path):
    """The issue's reproducer: train 1 epoch, delete model.pt (the best epoch's weights), rerun with max_epochs 3."""
    _train(tmp_path, max_epochs=1)
    (tmp_path / "model.pt").unlink()
    trainer = _train(tmp_path, max_epochs=3, resume_from=tmp_path)
    assert trainer.state.epoch == 3
    finish_flow_stage(tmp_path, trainer.network.flow, {"preset": "tiny"})
    assert (tmp_path / "model.pt").is_file()  # the next validation wrote it again
    assert json.loads((tmp_path / "flow.json").read_text())["selected_epoch"] in (2, 3)


def test_rotation_writes_the_new_file_before_deleting_the_old_one(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.ones(1)}, "a_1.pt")
    saver.remove("a_1.pt")  # Ignite's Checkpoint calls remove first ...
    assert (tmp_path / "a_1.pt").is_file()  # ... but the old file stays until its successor is written
    saver({"w": torch.ones(1)}, "a_2.pt")
    assert sorted(os.listdir(tmp_path)) == ["a_2.pt"]
    saver.remove("gone.pt")  # a file named by restored bookkeeping but already deleted: no error
    saver({"w": torch.ones(1)}, "a_3.pt")
    assert sorted(os.listdir(tmp_path)) == ["a_2.pt", "a_3.pt"]


def test_a_symlink_at_a_checkpoint_name_is_replaced_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").symlink_to(target)
    AtomicDiskSaver(tmp_path / "ckpt", filename="model.pt")({"w": torch.ones(1)}, "ignored.pt")
    assert target.read_text() == "keep me"
    assert not (tmp_path / "ckpt" / "model.pt").is_symlink()
    assert load_checkpoint(tmp_path / "ckpt" / "model.pt")["w"].item() == 1.0
    torch.save({"w": torch.zeros(1)}, tmp_path / "elsewhere.pt")
    (tmp_path / "ckpt" / "state_checkpoint_epoch=1.pt").write_bytes((tmp_path / "ckpt" / "model.pt").read_bytes())
    (tmp_path / "ckpt" / "state_checkpoint_epoch=9.pt").symlink_to(tmp_path / "elsewhere.pt")  # planted
    assert find_latest_checkpoint(tmp_path / "ckpt")[0].name == "state_checkpoint_epoch=1.pt"  # not resumed


@pytest.mark.parametrize("val_interval", [1, 5])
def test_a_stale_model_never_becomes_the_model_after_a_fresh_start(tmp_path, val_interval):
    """a model.pt of an earlier run (whose state checkpoints are gone) is not this run's model: the first validation
    replaces it, and a run that never validates (``val_interval`` past ``max_epochs``) ends with its last weights."""
    _train(tmp_path, max_epochs=1)
    stale = load_checkpoint(tmp_path / "model.pt")["network"]
    stale = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in stale.items()}
    torch.save({"network": stale}, tmp_path / "model.pt")
    for p in tmp_path.glob("state_*.pt"):
        p.unlink()
    trainer = _train(tmp_path, max_epochs=2, resume_from=tmp_path, val_interval=val_interval)  # from scratch
    finish_flow_stage(tmp_path, trainer.network.flow, {"preset": "tiny"})
    model = load_checkpoint(tmp_path / "model.pt")["network"]
    assert all(v.numel() == 0 or not (v == 7.0).all() for v in model.values() if v.is_floating_point())
    selected = json.loads((tmp_path / "flow.json").read_text())["selected"]
    assert selected.startswith("best validation epoch") if val_interval == 1 else selected == "last epoch"
    if val_interval > 1:
        last = trainer.network.flow.state_dict()
        assert all(torch.equal(model[k], last[k]) for k in last)


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"seed": 6}, {"settings": {"audit_holdout": 0.3}}])
def test_a_rerun_with_other_settings_is_refused_naming_the_setting(tmp_path, change):
    _train(tmp_path, max_epochs=1, settings={"audit_holdout": 0.0})
    before = sorted(os.listdir(tmp_path))
    name = next(iter(change["settings"])) if "settings" in change else next(iter(change))
    with pytest.raises(RunSettingsError, match=f"'{name}' was .*delete the folder") as refused:
        _train(tmp_path, max_epochs=2, resume_from=tmp_path, **{"settings": {"audit_holdout": 0.0}, **change})
    assert "fresh=true" not in str(refused.value)  # the Python API has no such argument
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run_with_random_transforms(tmp_path):
    """dequantisation noise and augmentation drawn by the loader continue where the killed run was."""
    reference = _weights(_train(tmp_path / "full", random_transforms=True))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(cut, random_transforms=True, stop_at_iteration=5)  # epoch 3, after epoch 2's checkpoint
    assert load_checkpoint(cut / "state_checkpoint_epoch=2.pt")["trainer"]["iteration"] == 4
    resumed = _train(cut, random_transforms=True, resume_from=cut)
    assert resumed.state.epoch == 3
    assert max_state_diff(reference, _weights(resumed)) <= 1e-6


@pytest.mark.parametrize("val_interval", [1, 5])
def test_every_file_of_the_flow_stage_is_written_atomically(tmp_path, monkeypatch, val_interval):
    """Each ``.pt`` file of the flow stage (``model.pt`` from the best-validation saver, or from
    ``finish_flow_stage`` when no epoch was validated; ``state_checkpoint_epoch=N.pt``) gets its name only by
    ``os.replace`` of a complete temporary file from the same folder, so at no instant is a partial file visible
    under a checkpoint name; the folder then holds exactly ``model.pt`` and the state files; a write interrupted
    mid-save leaves the previous files as they were and no temporary file."""
    out = tmp_path / "run"
    replaced: list[str] = []
    real_replace = os.replace

    def _checked_replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if dst.parent == out and dst.suffix == ".pt":
            assert src.parent == out and src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp"), src
            torch.load(src, weights_only=True)  # complete before it takes the name
            for visible in out.glob("*.pt"):  # and every file already under a checkpoint name is complete
                torch.load(visible, weights_only=True)
            replaced.append(dst.name)
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", _checked_replace)
    trainer = _train(out, max_epochs=2, n_saved=2, val_interval=val_interval)
    finish_flow_stage(out, trainer.network.flow, {"preset": "tiny"})
    monkeypatch.undo()
    saved = sorted(p.name for p in out.glob("*.pt"))
    assert saved == ["model.pt", "state_checkpoint_epoch=1.pt", "state_checkpoint_epoch=2.pt"]
    assert set(saved) <= set(replaced)  # every save went through it
    assert replaced.count("model.pt") >= 1 and not [n for n in replaced if n not in saved]
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}

    real_fsync = os.fsync

    def _interrupted_fsync(fd):
        if any(p.name.endswith(".tmp") for p in out.iterdir()):  # a checkpoint's temporary file is being written
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", _interrupted_fsync)
    with pytest.raises(OSError, match="disk full"):
        _train(out, max_epochs=3, n_saved=2, val_interval=val_interval, resume_from=out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("tmp")]


def test_a_run_folder_with_the_old_checkpoint_names_resumes(tmp_path):
    """A folder written before the one naming scheme (``latest_checkpoint_N.pt`` whose bookkeeping names it, and
    ``best_flow_N.pt``, no ``model.pt``: a run killed before its end) resumes to the uninterrupted run's weights;
    the new state files rotate the old one out and the stage ends with ``model.pt`` (the old best file when the
    run had nothing left to train)."""
    reference = _weights(_train(tmp_path / "full"))
    run = tmp_path / "run"
    _train(run, max_epochs=1)
    ckpt = load_checkpoint(run / "state_checkpoint_epoch=1.pt")
    ckpt["checkpointer"]["_saved"] = [(1, "latest_checkpoint_1.pt")]
    ckpt["best_checkpoint"]["_saved"] = [(ckpt["best_checkpoint"]["_saved"][0][0], "best_flow_1.pt")]
    torch.save(ckpt, run / "latest_checkpoint_1.pt")
    torch.save(load_checkpoint(run / "model.pt")["network"], run / "best_flow_1.pt")
    (run / "state_checkpoint_epoch=1.pt").unlink()
    (run / "model.pt").unlink()
    assert find_latest_checkpoint(run, FLOW_STATE_PREFIXES)[0].name == "latest_checkpoint_1.pt"
    ended = tmp_path / "ended"  # the same folder resumed at its end: its best_flow_1.pt becomes model.pt
    shutil.copytree(run, ended)
    finished = _train(ended, max_epochs=1, resume_from=ended)
    finish_flow_stage(ended, finished.network.flow, {"preset": "tiny"})
    assert json.loads((ended / "flow.json").read_text())["selected"] == "best validation epoch 1"
    best = load_checkpoint(run / "best_flow_1.pt")
    assert all(torch.equal(load_checkpoint(ended / "model.pt")["network"][k], v) for k, v in best.items())
    resumed = _train(run, resume_from=run)
    assert resumed.state.epoch == 3
    assert max_state_diff(reference, _weights(resumed)) <= 1e-6
    assert not (run / "latest_checkpoint_1.pt").exists() and (run / "state_checkpoint_epoch=3.pt").is_file()
    finish_flow_stage(run, resumed.network.flow, {"preset": "tiny"})
    assert json.loads((run / "flow.json").read_text())["selected_epoch"] in (2, 3)


def test_a_run_folder_created_by_another_rank_mid_check_is_read_as_a_folder(tmp_path, monkeypatch):
    """Under torchrun rank 0 creates the run folder while rank 1 decides what ``resume_from`` is. Seen once in CI:
    the folder was missing at the first check and present at the second, was opened as a checkpoint file
    (IsADirectoryError), and the lost rank used up the run's restart. Here the folder appears right after the first
    check of the path, whatever that check is."""
    from monai_condflow.engines.flow_trainer import _resume_checkpoint

    run = tmp_path / "run"
    calls: list[str] = []
    for name in ("is_dir", "is_file", "exists"):
        real = getattr(Path, name)

        def _racy(self, *args, _real=real, _name=name, **kwargs):
            answer = _real(self, *args, **kwargs)
            if self == run and not calls:
                calls.append(_name)
                run.mkdir()  # the other rank, just after this rank looked
            return answer

        monkeypatch.setattr(Path, name, _racy)
    assert _resume_checkpoint(run) == (None, None)  # an empty folder: from scratch, no error
    assert calls and run.is_dir()


def test_resume_from_a_file_of_any_name_or_a_missing_pt_file(tmp_path):
    """A checkpoint file is read whatever its suffix; a missing ``.pt`` file is an error naming it, not a silent
    fresh start; a missing folder is a fresh start."""
    from monai_condflow.engines.flow_trainer import _resume_checkpoint
    from monai_condflow.handlers.checkpoint import CheckpointError

    _train(tmp_path / "run", max_epochs=1)
    state = find_latest_checkpoint(tmp_path / "run", FLOW_STATE_PREFIXES)[0]
    other = tmp_path / "resume.ckpt"
    shutil.copy(state, other)
    path, checkpoint = _resume_checkpoint(other)
    assert path == other and "flow" in checkpoint
    with pytest.raises(CheckpointError, match="gone.pt"):
        _resume_checkpoint(tmp_path / "gone.pt")
    assert _resume_checkpoint(tmp_path / "not_yet") == (None, None)
