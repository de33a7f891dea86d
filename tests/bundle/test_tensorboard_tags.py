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
"""What each training stage writes to TensorBoard, read back from its event files, against docs/tensorboard.md and
docs/privacy.md: the classifier's ``lr``, ``privacy/epsilon`` once per epoch under both DP overlays, the adversarial
phase's ``adversarial/*`` losses; the rounds of a semi-supervised classifier (also resumed) continue every tag's
steps; under torchrun only rank 0 writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from monai_condflow.evaluation.tensorboard import read_tensorboard_scalars

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
CONFIGS = BUNDLE / "configs"
EPOCHS = 2
TINY = {"image_size": 32, "batch_size": 16, "max_epochs": EPOCHS, "num_workers": 0, "device": "cpu"}
TINY_FLOW = {
    "flow_overrides": {"num_levels": 2, "num_steps": 2, "num_blocks": 1, "hidden_channels": 8},
    "adversarial_steps": 2,  # fewer than log_every (10): the phase's last step is logged all the same
    "sample_every": 1,
}
CLASSIFIER_TAGS = {"train_loss", "lr", "val_accuracy", "val_macro_f1", "val_macro_precision", "val_macro_recall"}
FLOW_TAGS = {"train_bpd", "lr", "skipped_steps", "val_bpd"}
ADVERSARIAL_TAGS = {
    "adversarial/bpd", "adversarial/d_loss", "adversarial/g_adversarial", "adversarial/consistency",
    "adversarial/excess",
}  # fmt: skip
EPSILON = "privacy/epsilon"
PER_ITERATION = {"train_loss", "train_bpd"}
DP_IDS = {"target_epsilon": 3.0, "target_delta": 1e-4, "dp_accountant": "rdp"}
# semi-supervised: 8 labels (loader batch 8) and 16 unlabelled images. Round 0: 2 epochs over the labelled set 10 times
# (semi_min_steps=20), 10 steps each; round 1: 1 epoch over 8 + 16 records, 3 steps: shorter epochs than round 0's
SEMI = {
    "image_size": 32, "batch_size": 16, "num_workers": 0, "device": "cpu", "lr": 0.01, "num_labels": 8,
    "max_epochs": 2, "epochs_per_round": 1, "max_rounds": 1, "tol": 0.0, "semi_min_steps": 20,
}  # fmt: skip
SEMI_ITERATIONS, SEMI_EPOCHS, SEMI_ROUNDS = 2 * 10 + 1 * 3, 3, 2
SEMI_FILES = ["train_classifier.json", "train_semisupervised.json"]
ROUND_TAGS = {"class_balance/0", "class_balance/1", "mean_confidence", "presumptive_accuracy"}


def _workflow(files: list[str], **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ["common.json", *files]],
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE),
        **overrides,
    )


def _run(files: list[str], **overrides) -> None:
    wf = _workflow(files, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def _scalars(out: Path, stage: str) -> dict[str, tuple[list[int], list[float]]]:
    """The scalar series of ``out/tensorboard/<stage>`` itself (its sub-folders are other runs)."""
    return read_tensorboard_scalars(out / "tensorboard" / stage).get(".", {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phantom) -> dict[str, Path]:
    """Classifier -> flow with the adversarial phase (``plain``); DP classifier -> DP flow (``dp``); the phantom
    (``data``)."""
    root, data = tmp_path_factory.mktemp("tb"), phantom
    plain, dp = root / "plain", root / "dp"
    _run(["train_classifier.json"], **TINY, dataset_dir=str(data), output_dir=str(plain))
    _run(["train_flow.json"], **TINY, **TINY_FLOW, dataset_dir=str(data), output_dir=str(plain))
    _run(["train_classifier.json", "train_classifier_dp.json"], **TINY, **DP_IDS, dataset_dir=str(data),
         output_dir=str(dp))  # fmt: skip
    _run(["train_flow.json", "train_flow_dp.json"], **TINY, **TINY_FLOW, **DP_IDS, dataset_dir=str(data),
         output_dir=str(dp))  # fmt: skip
    return {"plain": plain, "dp": dp, "data": data}


def _assert_once_per_epoch(scalars: dict, tags: set[str]) -> None:
    for tag in tags - PER_ITERATION:
        assert scalars[tag][0] == list(range(1, EPOCHS + 1)), tag


def test_the_classifier_logs_the_learning_rate_of_each_epoch(runs):
    scalars = _scalars(runs["plain"], "classifier")
    assert set(scalars) == CLASSIFIER_TAGS
    _assert_once_per_epoch(scalars, CLASSIFIER_TAGS)
    lr = json.loads((runs["plain"] / "classifier" / "run_settings.json").read_text())["stage"]["lr"]
    steps, values = scalars["lr"]
    assert values[0] == pytest.approx(lr) and values[1] < values[0]  # the epoch-level decay, after epoch 1


def test_the_dp_classifier_logs_epsilon_once_per_epoch(runs):
    scalars = _scalars(runs["dp"], "classifier")
    assert set(scalars) == CLASSIFIER_TAGS | {EPSILON}
    _assert_once_per_epoch(scalars, CLASSIFIER_TAGS | {EPSILON})
    spent = json.loads((runs["dp"] / "classifier" / "classifier.json").read_text())["dp"]["epsilon"]
    steps, values = scalars[EPSILON]
    assert 0 < values[0] < values[1] and values[1] == pytest.approx(spent, rel=1e-5)


def test_the_dp_flow_logs_epsilon_exactly_once_per_epoch(runs):
    scalars = _scalars(runs["dp"], "flow")
    assert set(scalars) == FLOW_TAGS | {EPSILON}  # no adversarial phase under DP-SGD
    _assert_once_per_epoch(scalars, FLOW_TAGS | {EPSILON})
    spent = json.loads((runs["dp"] / "flow" / "flow.json").read_text())["dp"]["epsilon"]
    assert scalars[EPSILON][1][-1] == pytest.approx(spent, rel=1e-5)


def test_a_resumed_dp_flow_logs_epsilon_once_per_epoch_too(runs, tmp_path):
    """A DP flow killed at the end of epoch 1 and run again: epoch 1 from the first run, epoch 2 from the second."""
    from ignite.engine import Events

    shutil.copytree(runs["dp"] / "classifier", tmp_path / "classifier")
    common = {**TINY, **TINY_FLOW, **DP_IDS, "dataset_dir": str(runs["data"]), "output_dir": str(tmp_path)}
    wf = _workflow(["train_flow.json", "train_flow_dp.json"], **common)
    wf.initialize()
    wf.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate()
    )
    wf.run()
    wf.finalize()
    _run(["train_flow.json", "train_flow_dp.json"], **common)
    assert _scalars(tmp_path, "flow")[EPSILON][0] == [1, 2]


def test_the_flow_logs_the_adversarial_phase_under_its_own_tags(runs):
    scalars = _scalars(runs["plain"], "flow")
    assert set(scalars) == FLOW_TAGS | ADVERSARIAL_TAGS  # no bare `loss` / `d_loss` beside `train_bpd`
    _assert_once_per_epoch(scalars, FLOW_TAGS)
    last = json.loads((runs["plain"] / "flow" / "flow.json").read_text())["adversarial"]["last"]
    for tag in ADVERSARIAL_TAGS:
        steps, values = scalars[tag]
        key = "loss" if tag == "adversarial/bpd" else tag.split("/", 1)[1]
        assert steps == [TINY_FLOW["adversarial_steps"]] and values == pytest.approx([last[key]], rel=1e-6), tag
    acc = EventAccumulator(str(runs["plain"] / "tensorboard" / "flow"))
    acc.Reload()
    assert {"samples/class_0", "samples/class_1"} <= set(acc.Tags()["images"])


def test_the_docs_name_every_tag_the_stages_write():
    tensorboard = (ROOT / "docs" / "tensorboard.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", tensorboard, flags=re.DOTALL)))
    assert CLASSIFIER_TAGS | FLOW_TAGS | ADVERSARIAL_TAGS | {EPSILON} <= documented
    assert f"`{EPSILON}`" in (ROOT / "docs" / "privacy.md").read_text(encoding="utf-8")


def _raw_steps(folder: Path) -> dict[str, list[int]]:
    """Every tag's steps in ``folder``'s own event files, in the order they were written (no purging reader)."""
    events = [e for f in folder.glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()]
    steps: dict[str, list[int]] = {}
    for event in sorted(events, key=lambda e: e.wall_time):
        for value in event.summary.value:
            steps.setdefault(value.tag, []).append(int(event.step))
    return steps


def _assert_semisupervised_steps(out: Path) -> None:
    """One point per iteration / epoch / round, at strictly increasing steps."""
    tb = out / "tensorboard" / "classifier"
    steps = _raw_steps(tb)
    assert set(steps) == CLASSIFIER_TAGS
    assert steps["train_loss"] == list(range(1, SEMI_ITERATIONS + 1))
    for tag in CLASSIFIER_TAGS - PER_ITERATION:
        assert steps[tag] == list(range(1, SEMI_EPOCHS + 1)), tag
    rounds = _raw_steps(tb / "label_propagation")
    assert set(rounds) == ROUND_TAGS | {"fraction_changed"}
    for tag in ROUND_TAGS:
        assert rounds[tag] == list(range(SEMI_ROUNDS)), tag
    assert rounds["fraction_changed"] == list(range(1, SEMI_ROUNDS))


def test_semisupervised_rounds_continue_every_tags_steps(phantom, tmp_path):
    """Round 1's epochs are shorter than round 0's: its ``train_loss`` still follows round 0's last iteration."""
    _run(SEMI_FILES, **SEMI, dataset_dir=str(phantom), output_dir=str(tmp_path))
    _assert_semisupervised_steps(tmp_path)


class Killed(RuntimeError):
    pass


def test_a_resumed_semisupervised_run_writes_no_step_twice(phantom, tmp_path):
    """Killed as round 1 starts (after the checkpoint of epoch 2, the end of round 0, and round 0's summary), run
    again: it goes on from round 0's propagation, which it does not log again, and round 1's first iteration."""
    from ignite.engine import Events

    common = {**SEMI, "dataset_dir": str(phantom), "output_dir": str(tmp_path)}
    wf = _workflow(SEMI_FILES, **common)
    wf.initialize()

    def kill(engine) -> None:
        if engine.state.epoch == 3:
            raise Killed("killed")

    wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED, kill)
    with pytest.raises(Exception):  # noqa: B017 - the config parser wraps Killed
        wf.run()
    wf.finalize()
    assert [p.name for p in (tmp_path / "classifier").glob("state_*")] == ["state_checkpoint_epoch=2.pt"]
    _run(SEMI_FILES, **common)
    _assert_semisupervised_steps(tmp_path)


def _torchrun(files: list[str], overrides: dict) -> subprocess.CompletedProcess:
    """``monai.bundle run`` in 2 gloo processes on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", json.dumps([str(CONFIGS / f) for f in ["common.json", *files]]),
           "--bundle_root", str(BUNDLE)]  # fmt: skip
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_only_rank_0_of_the_multi_process_classifier_writes(phantom, tmp_path):
    """Two ranks: one event file per TensorBoard handler, every point once, the metrics printed once."""
    out = tmp_path / "ddp"
    files = ["train_classifier.json", "multi_gpu_train_classifier.json"]
    done = _torchrun(files, {**TINY, "dataset_dir": str(phantom), "output_dir": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    tb = out / "tensorboard" / "classifier"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # the train and the validation handler of rank 0
    steps = _raw_steps(tb)
    assert set(steps) == CLASSIFIER_TAGS
    for tag in CLASSIFIER_TAGS - PER_ITERATION:
        assert steps[tag] == list(range(1, EPOCHS + 1)), tag
    iterations = steps["train_loss"]
    assert iterations == list(range(1, len(iterations) + 1)) and len(iterations) % EPOCHS == 0
    assert (done.stdout + done.stderr).count("Epoch[1] Metrics") == 1  # StatsHandler: rank 0 only
    assert (out / "classifier" / "classifier.json").is_file() and (out / "classifier" / "model.pt").is_file()


def test_the_semisupervised_classifier_runs_under_torchrun(phantom, tmp_path):
    """Label propagation under 2 ranks: each round's records change the training set's length, which the ranks'
    DistributedSampler must follow (it failed with "Number of indices (48) does not match total_size (8)"); the
    ranks label with rank 0's embeddings, and rank 0 alone writes, every step once."""
    out = tmp_path / "ddp_semi"
    files = [*SEMI_FILES, "multi_gpu_train_classifier.json"]
    done = _torchrun(files, {**SEMI, "dataset_dir": str(phantom), "output_dir": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    rounds = info["rounds"]
    assert [r["round"] for r in rounds] == list(range(SEMI_ROUNDS))
    assert (out / "classifier" / "train_labels.json").is_file()
    steps = _raw_steps(out / "tensorboard" / "classifier")
    iterations = steps["train_loss"]
    assert iterations == list(range(1, len(iterations) + 1))  # one rank, no step twice or missing
    assert steps["lr"] == list(range(1, SEMI_EPOCHS + 1))


def test_the_dp_classifier_refuses_torchrun_as_the_dp_flow_does(phantom, tmp_path):
    """Under torchrun the multi-process overlay's DDP network replaced the private one: the DP optimizer stepped
    weights that got no gradients, with rc 0 and an epsilon that described nothing. Now refused by name."""
    files = ["train_classifier.json", "train_classifier_dp.json", "multi_gpu_train_classifier.json"]
    done = _torchrun(files, {**TINY, **DP_IDS, "dataset_dir": str(phantom), "output_dir": str(tmp_path / "dp")})
    assert done.returncode != 0
    assert "DP-SGD classifier training runs in one process; start it without torchrun" in done.stderr
    assert not (tmp_path / "dp" / "classifier" / "model.pt").exists()
