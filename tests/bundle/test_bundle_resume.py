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
"""The bundle's stages after a kill or beside leftovers: the classifier's ``model.pt`` stays the
best epoch across a resume and is never written through a symlink; a rerun with other settings is refused before
anything is written; a stale label list does not survive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.engines.run_folder import RunSettingsError
from monai_condflow.handlers.checkpoint import load_checkpoint

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"
TINY = {"image_size": 32, "batch_size": 16, "num_workers": 0, "device": "cpu", "lr": 0.01}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(root, num_images=48, seed=3, image_size=64, slices_per_patient=4, overwrite=True)
    return root


def _workflow(files: list[str], **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ["common.json", *files]],
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE),
        **overrides,
    )


def _run(files: list[str], **overrides) -> ConfigWorkflow:
    wf = _workflow(files, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _classifier(dataset: Path, out: Path, max_epochs: int, **kw) -> dict:
    _run(["train_classifier.json"], dataset_dir=str(dataset), output_dir=str(out), max_epochs=max_epochs, **TINY, **kw)
    return json.loads((out / "classifier" / "classifier.json").read_text())


def _weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return state.get("network", state)  # a single saved object is stored bare


def test_classifier_resume_keeps_the_best_model_and_never_follows_a_symlink(dataset, tmp_path):
    full = _classifier(dataset, tmp_path / "full", 3)
    target = tmp_path / "precious.pt"
    target.write_bytes(b"not a checkpoint")
    (tmp_path / "cut" / "classifier").mkdir(parents=True)
    (tmp_path / "cut" / "classifier" / "model.pt").symlink_to(target)  # planted
    _classifier(dataset, tmp_path / "cut", 2)
    assert target.read_bytes() == b"not a checkpoint"
    assert not (tmp_path / "cut" / "classifier" / "model.pt").is_symlink()
    resumed = _classifier(dataset, tmp_path / "cut", 3)  # resumes from the epoch-2 state checkpoint
    assert [p.name for p in (tmp_path / "cut" / "classifier").glob("state_*")] == ["state_checkpoint_epoch=3.pt"]
    assert resumed["best_val_macro_f1"] == pytest.approx(full["best_val_macro_f1"])
    a = _weights(tmp_path / "full" / "classifier" / "model.pt")
    b = _weights(tmp_path / "cut" / "classifier" / "model.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    # the resumed run compares against the best score it restored: an unbeatable best keeps model.pt unchanged
    state_path = max((tmp_path / "cut" / "classifier").glob("state_checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    state = load_checkpoint(state_path)
    assert state["best"]["best_metric"] == pytest.approx(full["best_val_macro_f1"])
    state["best_saver"]["_saved"] = [(1.0, state["best_saver"]["_saved"][0][1])]
    state["best"]["best_metric"] = 1.0
    torch.save(state, state_path)
    before = (tmp_path / "cut" / "classifier" / "model.pt").read_bytes()
    assert _classifier(dataset, tmp_path / "cut", 4)["best_val_macro_f1"] == 1.0
    assert (tmp_path / "cut" / "classifier" / "model.pt").read_bytes() == before


def test_a_rerun_with_other_settings_is_refused_and_fresh_starts_over(dataset, tmp_path):
    _classifier(dataset, tmp_path, 1)
    stale = tmp_path / "classifier" / "train_labels.json"  # as a 50-label semi-supervised run leaves it
    stale.write_text(json.dumps([{"image": "x.png", "label": 1, "presumptive": True}]))
    before = sorted(p.name for p in (tmp_path / "classifier").iterdir())
    wf = _workflow(["train_classifier.json"], dataset_dir=str(dataset), output_dir=str(tmp_path), max_epochs=2,
                   **{**TINY, "seed": 1})  # fmt: skip
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    cause = _root_cause(info.value)
    assert isinstance(cause, RunSettingsError) and "'seed' was 0, now 1" in str(cause) and "fresh=true" in str(cause)
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == before
    _classifier(dataset, tmp_path, 1, seed=1, fresh=True)
    assert not stale.exists()  # a supervised run leaves no label list for the flow stage to pick up
    assert json.loads((tmp_path / "classifier" / "run_settings.json").read_text())["stage"]["seed"] == 1


def test_flow_stage_refuses_another_audit_holdout_before_writing_it(dataset, tmp_path):
    common = {"dataset_dir": str(dataset), "output_dir": str(tmp_path), **TINY}
    wf = _workflow(["train_flow.json"], **common, audit_holdout=0.0)
    wf.initialize()
    wf.finalize()
    # what that run trained (a run that wrote nothing binds no later one: test_run_folder.py)
    (tmp_path / "flow" / "state_checkpoint_epoch=1.pt").write_bytes(b"weights trained on every training image")
    wf = _workflow(["train_flow.json"], **common, audit_holdout=0.3)
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert "'audit_holdout' was 0.0, now 0.3" in str(_root_cause(info.value))
    assert not (tmp_path / "flow" / "audit_holdout.json").exists()


def test_flow_stage_resumes_after_its_best_checkpoint_was_deleted(dataset, tmp_path):
    """The issue's reproducer through the bundle: 1 epoch, delete flow/model.pt (the best epoch's weights), rerun
    with max_epochs 3; the stage's folder then holds exactly model.pt and the state files."""
    tiny_flow = {
        "flow_overrides": {"num_levels": 2, "num_steps": 2, "num_blocks": 1, "hidden_channels": 8},
        "adversarial_steps": 0,
    }
    common = {"dataset_dir": str(dataset), "output_dir": str(tmp_path), **TINY, **tiny_flow, "sample_every": 0}
    _classifier(dataset, tmp_path, 1)
    _run(["train_flow.json"], **common, max_epochs=1)
    (tmp_path / "flow" / "model.pt").unlink()
    _run(["train_flow.json"], **common, max_epochs=3)
    info = json.loads((tmp_path / "flow" / "flow.json").read_text())
    assert info["selected"].startswith("best validation epoch") and info["selected_epoch"] in (2, 3)
    assert (tmp_path / "flow" / "model.pt").is_file() and (tmp_path / "flow" / "state_checkpoint_epoch=3.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "flow").glob("*.pt")) == [
        "model.pt", "state_checkpoint_epoch=2.pt", "state_checkpoint_epoch=3.pt"]  # fmt: skip
