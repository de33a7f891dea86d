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
"""The semi-supervised overlay trains ``train_classifier.json``'s own trainer: its augmentation, its ``lr_decay``, its
TensorBoard and its state checkpoints, so a killed label-propagation run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.engines.label_propagation import RoundLRScheduler
from monai_condflow.handlers.checkpoint import load_checkpoint

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"
# 8 labels and 16 unlabelled images; round 0: 2 epochs, each over the labelled set twice (semi_min_steps); round 1: 1
SEMI = {
    "image_size": 32, "batch_size": 16, "num_workers": 0, "device": "cpu", "lr": 0.01, "num_labels": 8,
    "max_epochs": 2, "epochs_per_round": 1, "max_rounds": 1, "tol": 0.0, "semi_min_steps": 4,
}  # fmt: skip
N_LABELLED, N_UNLABELLED, REPEATS = 8, 16, 2


class CountingAugmentation:
    """An augmentation that records every item it sees (a class-level list: the config may copy the object)."""

    seen: list[int] = []

    def __call__(self, item: dict) -> dict:
        CountingAugmentation.seen.append(int(item["label"]))
        return item


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(root, num_images=48, seed=3, image_size=64, slices_per_patient=4, overwrite=True)
    return root


def _workflow(dataset: Path, out: Path, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ("common.json", "train_classifier.json", "train_semisupervised.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE),
        workflow_type="train",
        dataset_dir=str(dataset),
        output_dir=str(out),
        **{**SEMI, **overrides},
    )
    wf.initialize()
    return wf


def _outputs(out: Path) -> tuple[dict, list, dict]:
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    labels = json.loads((out / "classifier" / "train_labels.json").read_text())
    return info, labels, load_checkpoint(out / "classifier" / "model.pt")["network"]


def test_the_overlay_trains_the_configs_trainer_with_its_augmentation_and_lr_decay(dataset, tmp_path):
    CountingAugmentation.seen.clear()
    wf = _workflow(dataset, tmp_path, augmentation=CountingAugmentation(), lr_decay=0.5)
    scheduler = wf.parser.get_parsed_content("lr_scheduler")
    assert isinstance(scheduler, RoundLRScheduler) and scheduler.gamma == 0.5  # the config's lr_decay id
    wf.run()
    wf.finalize()
    # the config's augmentation saw every training item of both rounds, and nothing else (embeddings are clean)
    assert len(CountingAugmentation.seen) == N_LABELLED * REPEATS * 2 + (N_LABELLED + N_UNLABELLED) * 1
    info, labels, _ = _outputs(tmp_path)
    assert [r["round"] for r in info["rounds"]] == [0, 1] and [r["epochs"] for r in info["rounds"]] == [2, 3]
    assert sum(not e["presumptive"] for e in labels) == N_LABELLED and len(labels) == N_LABELLED + N_UNLABELLED
    # the config's own state checkpoint (resume) and TensorBoard folder
    assert [p.name for p in (tmp_path / "classifier").glob("state_*")] == ["state_checkpoint_epoch=3.pt"]
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "classifier"))
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"] and "val_macro_f1" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("val_macro_f1")] == [1, 2, 3]
    rounds = EventAccumulator(str(tmp_path / "tensorboard" / "classifier" / "label_propagation"))
    rounds.Reload()
    assert [e.step for e in rounds.Scalars("presumptive_accuracy")] == [0, 1]


def test_the_overlay_without_augmentation_leaves_it_out(dataset, tmp_path):
    CountingAugmentation.seen.clear()
    wf = _workflow(dataset, tmp_path, augmentation=CountingAugmentation(), semi_augmentation=False, max_rounds=0)
    wf.run()
    wf.finalize()
    assert CountingAugmentation.seen == []


def test_a_killed_semisupervised_run_resumes_where_it_stopped(dataset, tmp_path):
    CountingAugmentation.seen.clear()
    wf = _workflow(dataset, tmp_path / "full", augmentation=CountingAugmentation())
    wf.run()
    wf.finalize()
    full_info, full_labels, full_weights = _outputs(tmp_path / "full")

    wf = _workflow(dataset, tmp_path / "cut", augmentation=CountingAugmentation())
    trainer = wf.parser.get_parsed_content("train#trainer")

    def kill(engine) -> None:
        if engine.state.epoch == 3:  # in round 1, after the checkpoint of epoch 2 (the end of round 0)
            raise Killed("killed")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, kill)
    with pytest.raises(Exception) as info:
        wf.run()
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, Killed):
        err = err.__cause__ or err.__context__
    assert isinstance(err, Killed)
    wf.finalize()
    assert not (tmp_path / "cut" / "classifier" / "classifier.json").exists()
    assert [p.name for p in (tmp_path / "cut" / "classifier").glob("state_*")] == ["state_checkpoint_epoch=2.pt"]

    CountingAugmentation.seen.clear()
    wf = _workflow(dataset, tmp_path / "cut", augmentation=CountingAugmentation())
    wf.run()
    wf.finalize()
    assert len(CountingAugmentation.seen) == N_LABELLED + N_UNLABELLED  # only round 1 was trained again
    info, labels, weights = _outputs(tmp_path / "cut")
    assert info["rounds"] == full_info["rounds"] and labels == full_labels
    for key in full_weights:
        torch.testing.assert_close(weights[key], full_weights[key], atol=1e-6, rtol=0, msg=key)


def _presumptive_from(weights: dict, dataset: Path, out: Path) -> list[int]:
    """The labels centroid propagation gives with ``weights``: the overlay's own datasets and propagation rule."""
    from monai_condflow.engines.classifier import compute_embeddings
    from monai_condflow.engines.label_propagation import LabelPropagation

    wf = _workflow(dataset, out)
    network = wf.parser.get_parsed_content("network")
    network.load_state_dict(weights)
    loader = {k: torch.utils.data.DataLoader(wf.parser.get_parsed_content(f"semi#{k}_dataset"), batch_size=16)
              for k in ("labelled", "unlabelled")}  # fmt: skip
    z_l, y_l = compute_embeddings(network.eval(), loader["labelled"], "cpu")
    z_u, _ = compute_embeddings(network, loader["unlabelled"], "cpu")
    labels, _ = LabelPropagation(2, class_prior="labelled").fit(z_l, y_l).predict(z_u)
    return labels.tolist()


@pytest.mark.parametrize("select", [True, False])
def test_rounds_propagate_with_the_best_validation_weights(dataset, tmp_path, select):
    """Selection on validation (``semi_select``, default on): every round labels the unlabelled images with the
    embeddings of the best-validation weights so far, and ``model.pt`` (the flow's conditioner) holds those weights;
    off, the round's last weights do both (the paper)."""
    out = tmp_path / "run"
    wf = _workflow(dataset, out, max_epochs=4, epochs_per_round=2, semi_select=select, lr=0.03)
    wf.run()
    wf.finalize()
    info, labels, weights = _outputs(out)
    best = load_checkpoint(out / "classifier" / "model_best_val.pt")  # MONAI saves a one-item save_dict bare
    best = best.get("network", best)
    last = load_checkpoint(next((out / "classifier").glob("state_*")))["network"]
    differs = any(not torch.equal(best[k], last[k]) for k in best)
    assert differs, "the best-validation epoch is the last one here: the test cannot tell the two apart"
    expected = best if select else last
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    presumptive = [e["label"] for e in labels if e["presumptive"]]
    assert presumptive == _presumptive_from(expected, dataset, tmp_path / "probe")
    assert [r["selection"] for r in info["rounds"]] == ["best validation" if select else "last"] * 2
    assert ("presumptive_accuracy_last" in info["rounds"][-1]) == select
