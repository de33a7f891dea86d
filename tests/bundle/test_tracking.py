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
"""MONAI's experiment-tracking hook (``monai.bundle run ... --tracking``) on every training stage, and the flow
stage's config ids: ``--tracking`` appends its handlers to ``train#handlers`` and ``validate#handlers``, which the
stages' trainers and evaluators use, and reads the loss with ``from_engine(['loss'], first=True)``."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.bundle.utils import DEFAULT_HANDLERS_ID

from monai_condflow.engines.flow import FlowBitsPerDim, FlowTrainer

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
TINY = {"image_size": 32, "batch_size": 16, "num_workers": 0, "device": "cpu", "max_epochs": 1}
TINY_FLOW = {
    "flow_overrides": {"num_levels": 2, "num_steps": 2, "num_blocks": 1, "hidden_channels": 8},
    "sample_every": 0,
    "warmup_epochs": 1,
    "adversarial_steps": 0,
}
STAGES = {
    "flow": (["train_flow.json"], TINY_FLOW),
    "classifier": (["train_classifier.json"], {}),
    "semisupervised": (
        ["train_classifier.json", "train_semisupervised.json"],
        {"num_labels": 8, "max_rounds": 1, "epochs_per_round": 1, "semi_min_steps": 2},
    ),
    "acgan": (["train_acgan.json"], {}),
}


class EventRecorder:
    """A tracking handler for custom settings: appends ``[event, epoch, iteration, values]`` lines to a JSON-lines
    file; ``values`` is ``output_transform(engine.state.output)`` per iteration (the tracker's loss) and the
    engine's metrics per epoch."""

    def __init__(self, path: str, output_transform=None, iteration_log: bool = True) -> None:
        self.path = Path(path)
        self.output_transform = output_transform
        self.iteration_log = iteration_log

    def _write(self, event: str, engine, values) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps([event, engine.state.epoch, engine.state.iteration, values]) + "\n")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self._write("started", e, None))
        if self.iteration_log:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(
            Events.EPOCH_COMPLETED,
            lambda e: self._write("epoch", e, {k: float(v) for k, v in e.state.metrics.items()}),
        )
        engine.add_event_handler(Events.COMPLETED, lambda e: self._write("completed", e, None))

    def _iteration(self, engine) -> None:
        value = self.output_transform(engine.state.output)
        value = {k: float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)
        self._write("iteration", engine, value)


def _recording_settings(path: Path) -> dict:
    target = f"{EventRecorder.__module__}.EventRecorder"
    return {
        "handlers_id": copy.deepcopy(DEFAULT_HANDLERS_ID),
        "configs": {
            "trainer": {
                "_target_": target,
                "path": str(path.with_suffix(".trainer.jsonl")),
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
            "validator": {
                "_target_": target,
                "path": str(path.with_suffix(".validator.jsonl")),
                "iteration_log": False,
            },
        },
    }


def _read(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def dataset(phantom) -> Path:
    return phantom  # tests/bundle/conftest.py


@pytest.fixture(scope="module")
def classifier_dir(dataset, tmp_path_factory) -> Path:
    """A trained classifier stage (the flow and ACGAN stages read it), copied into each test's output folder."""
    out = tmp_path_factory.mktemp("classifier_run")
    _run(["train_classifier.json"], dataset_dir=str(dataset), output_dir=str(out), **TINY)
    return out / "classifier"


def _workflow(files: list[str], tracking=None, **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ["common.json", *files]],
        meta_file=META,
        bundle_root=str(BUNDLE),
        tracking=tracking,
        **overrides,
    )


def _run(files: list[str], tracking=None, **overrides) -> ConfigWorkflow:
    wf = _workflow(files, tracking, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _output_dir(tmp_path: Path, classifier_dir: Path, stage: str) -> Path:
    out = tmp_path / "run"
    if stage in ("flow", "acgan"):
        shutil.copytree(classifier_dir, out / "classifier")
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_custom_tracking_settings_reach_the_trainer_and_the_evaluator(dataset, classifier_dir, tmp_path, stage):
    """The hook without mlflow: a settings dict whose handlers record events, on every training stage."""
    files, extra = STAGES[stage]
    out = _output_dir(tmp_path, classifier_dir, stage)
    record = tmp_path / "events"
    wf = _run(files, _recording_settings(record), dataset_dir=str(dataset), output_dir=str(out), **TINY, **extra)
    trainer = _read(record.with_suffix(".trainer.jsonl"))
    assert trainer[0][0] == "started" and trainer[-1][0] == "completed"
    losses = [values for event, _, _, values in trainer if event == "iteration"]
    assert losses, trainer
    if stage == "acgan":  # both losses, by name
        assert all(set(v) == {"g_loss", "d_loss"} and all(math.isfinite(x) for x in v.values()) for v in losses)
        assert wf.parser.get_parsed_content("train#trainer").state.iteration == len(losses)
        return
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    validator = [values for event, _, _, values in _read(record.with_suffix(".validator.jsonl")) if event == "epoch"]
    key = "val_bpd" if stage == "flow" else "val_macro_f1"
    assert validator and all(key in v for v in validator)
    if stage == "flow":
        trainer_engine = wf.parser.get_parsed_content("train#trainer")
        assert losses[-1] == pytest.approx(float(trainer_engine.state.output["loss"]))
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        assert validator[-1]["val_bpd"] == pytest.approx(evaluator.state.metrics["val_bpd"])


@pytest.mark.parametrize("stage", list(STAGES))
def test_mlflow_tracking_records_the_losses(dataset, classifier_dir, tmp_path, monkeypatch, stage):
    """``--tracking mlflow`` (MONAI's default settings) into a local SQLite store: the run has the stage's losses."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    files, extra = STAGES[stage]
    out = _output_dir(tmp_path, classifier_dir, stage)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"  # MONAI's MLFlowHandler refuses the file store (mlflow >= 3.13)
    _run(files, "mlflow", dataset_dir=str(dataset), output_dir=str(out), tracking_uri=uri,
         experiment_name=f"condflow_{stage}", **TINY, **extra)  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"condflow_{stage}")
    runs = client.search_runs([experiment.experiment_id])
    assert runs
    metrics = {k for run in runs for k in run.data.metrics}
    expected = {
        "flow": {"train_loss", "val_bpd", "lr_group_0"},
        "classifier": {"train_loss", "val_macro_f1"},
        "semisupervised": {"train_loss", "val_macro_f1"},
        "acgan": {"g_loss", "d_loss"},
    }[stage]
    assert expected <= metrics, metrics
    if stage == "flow":
        history = client.get_metric_history(runs[0].info.run_id, "train_loss")
        assert history and all(math.isfinite(m.value) and 2.0 < m.value < 20.0 for m in history)  # bits/dim
        assert list(out.glob("config_*.json"))  # the executed config, logged as an artifact
    assert (out / "acgan" / "model.pt").is_file() if stage == "acgan" else True


def test_mlflow_tracking_from_the_command_line(dataset, classifier_dir, tmp_path):
    """``python -m monai.bundle run --tracking mlflow`` on the flow stage, as a user runs it."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    out = _output_dir(tmp_path, classifier_dir, "flow")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps([str(CONFIGS / "common.json"), str(CONFIGS / "train_flow.json")]), "--meta_file", META,
           "--bundle_root", str(BUNDLE), "--dataset_dir", str(dataset), "--output_dir", str(out),
           "--tracking", "mlflow", "--tracking_uri", uri,
           "--flow_overrides", repr(TINY_FLOW["flow_overrides"])]  # fmt: skip
    # the likelihood epoch only: 900 adversarial steps (the stage's default) would take two minutes of the suite
    for k, v in {**TINY, **{k: v for k, v in TINY_FLOW.items() if k != "flow_overrides"}}.items():
        cmd += [f"--{k}", str(v)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assert {"train_loss", "val_bpd"} <= {k for run in runs for k in run.data.metrics}
    assert (out / "flow" / "model.pt").is_file()


def test_flow_stage_uses_its_config_ids(dataset, classifier_dir, tmp_path):
    """``optimizer``, ``lr_scheduler``, ``ema``, ``train#handlers`` and ``validate#evaluator`` are the objects the
    stage trains and validates with: the lr set in the config reaches the trainer, and the evaluator's val bits/dim is
    the mean ``FlowBitsPerDim`` of the (EMA) flow on the validation set."""
    out = _output_dir(tmp_path, classifier_dir, "flow")
    wf = _run(["train_flow.json"], dataset_dir=str(dataset), output_dir=str(out), **TINY,
              **{**TINY_FLOW, "lr": 3e-3, "warmup_epochs": 0, "lr_decay": 0.5, "ema_decay": 0.9})  # fmt: skip
    get = wf.parser.get_parsed_content
    trainer, evaluator, optimizer = get("train#trainer"), get("validate#evaluator"), get("optimizer")
    assert isinstance(trainer, FlowTrainer) and trainer.optimizer is optimizer
    assert optimizer.defaults["lr"] == 3e-3 and trainer.lr_scheduler is get("lr_scheduler")
    assert trainer.lr_scheduler.base_lrs == [3e-3]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)  # no warm-up; decayed once after epoch 1
    assert trainer.ema is get("ema") and get("eval_flow") is trainer.ema.module
    assert trainer.state.epoch == 1 and trainer.max_grad_norm == get("max_grad_norm")
    handler_types = {type(h).__name__ for h in get("train#handlers")}
    assert {"LrScheduleHandler", "ValidationHandler", "StatsHandler", "TensorBoardStatsHandler"} <= handler_types
    val_bpd = evaluator.state.metrics["val_bpd"]
    assert math.isfinite(val_bpd) and evaluator.state.best_metric == pytest.approx(val_bpd)
    # the same number from the flow directly, on the batches the evaluator saw (dequantisation noise is random)
    from ignite.engine import Events

    batches = []
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda e: batches.append(e.state.batch))
    evaluator.run()
    model = FlowBitsPerDim(get("eval_flow"), n_bits=get("n_bits")).eval()
    with torch.no_grad():
        values = [model(x, z) for x, _, (z,), _ in (get("prepare_batch")(b, "cpu", False) for b in batches)]
    assert len(batches) == len(get("validate#dataloader"))
    assert evaluator.state.metrics["val_bpd"] == pytest.approx(torch.cat(values).mean().item(), rel=1e-5)
    info = json.loads((out / "flow" / "flow.json").read_text())
    assert info["selected"] == "best validation epoch 1" and info["ema_decay"] == 0.9
    assert info["best_val_bpd"] == pytest.approx(evaluator.state.best_metric)
    assert (out / "flow" / "state_checkpoint_epoch=1.pt").is_file()
    from monai_condflow.handlers.checkpoint import load_checkpoint

    model = load_checkpoint(out / "flow" / "model.pt")["network"]  # the EMA weights of the best (only) epoch
    assert all(torch.equal(model[k], v) for k, v in get("eval_flow").state_dict().items())


def test_flow_stage_checkpoints_hold_the_config_objects_and_resume_from_them(dataset, classifier_dir, tmp_path):
    """The ``checkpointer`` saves the config's objects; a rerun with more epochs resumes through ``resumer`` and
    continues with the saved optimizer, schedule, EMA and counters."""
    from monai_condflow.handlers.checkpoint import load_checkpoint

    out = _output_dir(tmp_path, classifier_dir, "flow")
    common = {"dataset_dir": str(dataset), "output_dir": str(out), **TINY, **TINY_FLOW, "early_stop_patience": 3}
    _run(["train_flow.json"], **common)
    ckpt = load_checkpoint(out / "flow" / "state_checkpoint_epoch=1.pt")
    expected = {"flow", "optimizer", "lr_scheduler", "trainer", "rng", "best_checkpoint", "ema", "early_stopping",
                "loader_rng", "checkpointer"}  # fmt: skip
    assert expected == set(ckpt)
    assert ckpt["early_stopping"]["counter"] == 0 and ckpt["best_checkpoint"]["_saved"]
    wf = _run(["train_flow.json"], **{**common, "max_epochs": 2})
    get = wf.parser.get_parsed_content
    assert get("resumer").resumed_epoch == 1 and get("train#trainer").state.epoch == 2
    assert get("train#trainer").state.iteration == 2 * len(get("train#dataloader"))
    assert get("ema").num_updates == ckpt["ema"]["num_updates"] + len(get("train#dataloader"))
    assert sorted(p.name for p in (out / "flow").glob("*.pt")) == [
        "model.pt", "state_checkpoint_epoch=1.pt", "state_checkpoint_epoch=2.pt"]  # fmt: skip


def test_dp_overlay_resumes_a_killed_run_and_refuses_another_plan(dataset, classifier_dir, tmp_path):
    """train_flow_dp.json on the config ids: a run killed after epoch 1 resumes with its privacy accountant and DP
    plan (``resumer`` restores ``dp_plan`` first); a rerun with another target is refused before training."""
    from ignite.engine import Events

    out = _output_dir(tmp_path, classifier_dir, "flow")
    common = {"dataset_dir": str(dataset), "output_dir": str(out), **TINY, **TINY_FLOW, "max_epochs": 2,
              "target_epsilon": 3.0, "target_delta": 1e-4}  # fmt: skip
    wf = _workflow(["train_flow.json", "train_flow_dp.json"], **common)
    wf.initialize()
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate()
    )
    wf.run()
    wf.finalize()
    first = json.loads((out / "flow" / "privacy.json").read_text())
    info = json.loads((out / "flow" / "flow.json").read_text())  # the stopped run's stage end wrote model.pt ...
    assert info["selected"] == "last epoch" and "selected_epoch" not in info  # ... not chosen on private data
    assert (out / "flow" / "state_checkpoint_epoch=1.pt").is_file()
    wf = _run(["train_flow.json", "train_flow_dp.json"], **common)
    assert wf.parser.get_parsed_content("resumer").resumed_epoch == 1
    second = json.loads((out / "flow" / "privacy.json").read_text())
    assert second["steps"] > first["steps"] and first["epsilon"] < second["epsilon"] <= 3.0 * 1.01
    wf = _workflow(["train_flow.json", "train_flow_dp.json"], **{**common, "target_epsilon": 5.0, "max_epochs": 3})
    wf.initialize()
    with pytest.raises(Exception) as info:  # noqa: PT011 - MONAI wraps the error; its cause is checked below
        wf.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("'target_epsilon' was 3.0, now 5.0" in text for text in chain), chain
    wf.finalize()
