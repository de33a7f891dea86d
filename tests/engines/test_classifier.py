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
"""Tests of the classifier trainer: accuracy, checkpoints, TensorBoard, determinism, resume,
weights-only loading, atomic checkpoints."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_condflow.engines import (
    balanced_class_weights,
    compute_embeddings,
    create_classifier_trainer,
    lr_decay_for_label_fraction,
    train_classifier,
)
from monai_condflow.handlers.checkpoint import AtomicDiskSaver
from monai_condflow.networks.nets import PEPXNet
from monai_condflow.utils.distributed import create_loader
from monai_condflow.utils.io import MODEL_FILE

SIZE = 16


def square_dataset(n: int, seed: int, size: int = SIZE) -> Dataset:
    """Label 1: a bright centred square on noise; label 0: noise only. Images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        image = torch.rand(1, size, size, generator=g) * 0.5
        label = i % 2
        if label:
            image[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 0.5
        records.append({"image": image, "label": label})
    return Dataset(records)


def small_net(seed: int = 0) -> PEPXNet:
    torch.manual_seed(seed)
    return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)


def record_losses(trainer) -> list[float]:
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    return losses


def test_trains_to_high_accuracy_with_checkpoints_and_tensorboard(tmp_path):
    result = train_classifier(
        small_net(),
        square_dataset(256, seed=1),
        square_dataset(32, seed=2),
        device="cpu",
        max_epochs=2,
        batch_size=8,
        lr=1e-3,
        output_dir=tmp_path,
        iteration_log=False,
    )
    assert result["epochs"] == 2
    assert result["best_metrics"]["val_accuracy"] > 0.8
    assert result["best_metric"] == pytest.approx(result["best_metrics"]["val_macro_f1"])
    assert set(result["final_metrics"]) == {"val_macro_f1", "val_accuracy", "val_macro_precision", "val_macro_recall"}

    # best model: a plain state dict, loadable with weights_only=True, giving the best validation accuracy
    assert result["best_checkpoint"] == str(tmp_path / MODEL_FILE)
    state = torch.load(result["best_checkpoint"], weights_only=True)
    net = small_net(seed=5)
    net.load_state_dict(state)
    net.eval()
    val = square_dataset(32, seed=2)
    x = torch.stack([r["image"] for r in val.data])
    y = torch.tensor([r["label"] for r in val.data])
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(result["best_metrics"]["val_accuracy"])

    assert result["last_checkpoint"] == str(tmp_path / "state_checkpoint_epoch=2.pt")  # the bundle's names
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["model.pt", "state_checkpoint_epoch=2.pt"]
    last = torch.load(result["last_checkpoint"], weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best", "best_saver"} <= set(last)
    assert last["trainer"]["iteration"] == 2 * 32 and last["trainer"]["max_epochs"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp")]  # no leftover temporary files

    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train_loss", "lr", "train_accuracy", "val_accuracy", "val_macro_f1", "val_macro_precision"}
    assert expected | {"val_macro_recall"} <= tags
    assert [e.step for e in acc.Scalars("val_macro_f1")] == [1, 2]
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)
    assert acc.Scalars("lr")[1].value == pytest.approx(1e-3 * 0.99)


def _tiny_run(max_epochs: int, output_dir: Path | None = None, resume_from: Path | None = None, net_seed: int = 0):
    net = small_net(net_seed)
    train_loader = create_loader(square_dataset(24, seed=3), batch_size=8, shuffle=True, seed=7)
    val_loader = create_loader(square_dataset(8, seed=4), batch_size=8, shuffle=False, seed=7)
    trainer, evaluator = create_classifier_trainer(
        net,
        train_loader,
        val_loader,
        device="cpu",
        max_epochs=max_epochs,
        lr=1e-3,
        lr_decay=0.9,
        output_dir=output_dir,
        resume_from=resume_from,
        seed=11,
        iteration_log=False,
    )
    losses = record_losses(trainer)
    trainer.run()
    return net, trainer, evaluator, losses


def test_seeded_runs_give_identical_losses():
    _, _, _, first = _tiny_run(2)
    _, _, _, second = _tiny_run(2)
    assert len(first) == 6
    assert first == second


def test_resume_matches_uninterrupted_run(tmp_path):
    full_net, full_trainer, full_eval, full_losses = _tiny_run(2, output_dir=tmp_path / "full")
    _, _, _, first_losses = _tiny_run(1, output_dir=tmp_path / "part")
    # a different initialisation: everything must come from the checkpoint
    resumed_net, resumed_trainer, resumed_eval, resumed_losses = _tiny_run(
        2, output_dir=tmp_path / "part", resume_from=tmp_path / "part", net_seed=123
    )
    assert resumed_trainer.state.epoch == 2
    assert first_losses + resumed_losses == pytest.approx(full_losses, abs=1e-6)
    full_state, resumed_state = full_net.state_dict(), resumed_net.state_dict()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, atol=1e-6, rtol=0, msg=key)
    assert resumed_trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        full_trainer.optimizer.param_groups[0]["lr"]
    )
    # the best-metric tracking is restored too (not restarted at the resumed epoch)
    assert resumed_eval.state.best_metric_epoch == full_eval.state.best_metric_epoch
    assert resumed_eval.state.best_metric == pytest.approx(full_eval.state.best_metric)


def test_resume_from_a_state_file_or_its_folder(tmp_path):
    """``resume_from`` takes a training-state file (the bundle's name) or its folder (the newest complete one)."""
    _tiny_run(1, output_dir=tmp_path / "run")
    state = tmp_path / "run" / "state_checkpoint_epoch=1.pt"
    assert state.is_file()
    _, from_file, _, _ = _tiny_run(2, resume_from=state)
    _, from_folder, _, _ = _tiny_run(2, resume_from=tmp_path / "run")
    assert from_file.state.epoch == from_folder.state.epoch == 2
    assert from_file.state.iteration == from_folder.state.iteration == 2 * 3  # epoch 1 came from the checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"resume_from: no checkpoint at .*state_\*\.pt"):
        _tiny_run(2, resume_from=tmp_path / "empty")


def test_every_checkpoint_of_the_python_api_is_written_atomically(tmp_path, monkeypatch):
    """Each ``.pt`` file of ``create_classifier_trainer`` (``model.pt``, ``state_checkpoint_epoch=N.pt``) gets its
    name only by ``os.replace`` of a complete temporary file from the same folder, so at no instant is a partial
    file visible under a checkpoint name; a write interrupted mid-save leaves the previous files as they were and no
    temporary file."""
    out = tmp_path / "run"
    replaced: list[str] = []
    real_replace = os.replace

    def _checked_replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if dst.parent == out:
            assert src.parent == out and src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp"), src
            torch.load(src, weights_only=True)  # complete before it takes the name
            for visible in out.glob("*.pt"):  # and every file already under a checkpoint name is complete
                torch.load(visible, weights_only=True)
            replaced.append(dst.name)
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", _checked_replace)
    _tiny_run(2, output_dir=out)
    monkeypatch.undo()
    saved = sorted(p.name for p in out.glob("*.pt"))
    assert saved == ["model.pt", "state_checkpoint_epoch=2.pt"]
    assert set(saved) <= set(replaced) and "state_checkpoint_epoch=1.pt" in replaced  # every save went through it
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}

    real_fsync = os.fsync

    def _interrupted_fsync(fd):
        if any(p.name.endswith(".tmp") for p in out.iterdir()):  # a checkpoint's temporary file is being written
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", _interrupted_fsync)
    with pytest.raises(OSError, match="disk full"):
        _tiny_run(3, output_dir=out, resume_from=out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("tmp")]


class _Sentinel:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_pickled_code(tmp_path):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"network": _Sentinel(str(sentinel))}, f, protocol=2)
    train_loader = create_loader(square_dataset(8, seed=3), batch_size=8, shuffle=True, seed=0)
    trainer, _ = create_classifier_trainer(small_net(), train_loader, device="cpu", max_epochs=1, resume_from=bad)
    with pytest.raises(pickle.UnpicklingError):
        trainer.run()
    assert not sentinel.exists()


def test_atomic_saver_keeps_previous_file_on_failure(tmp_path):
    saver = AtomicDiskSaver(str(tmp_path), filename="ckpt.pt")
    saver({"w": torch.ones(3)}, "ignored_name.pt")
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled: the save fails midway
        saver({"w": torch.zeros(3), "bad": lambda: None}, "ignored_name.pt")
    saver.remove("ignored_name.pt")  # no-op for a fixed name: the next save replaces it atomically
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    torch.testing.assert_close(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.ones(3))


def test_no_validation_and_balanced_weights(tmp_path):
    dataset = Dataset([{"image": torch.rand(1, SIZE, SIZE), "label": int(i < 6)} for i in range(8)])
    loader = create_loader(dataset, batch_size=4, shuffle=True, seed=0)
    trainer, evaluator = create_classifier_trainer(
        small_net(), loader, device="cpu", max_epochs=1, class_weights="balanced", output_dir=tmp_path
    )
    assert evaluator is None
    torch.testing.assert_close(trainer.loss_function.weight, torch.tensor([8 / (2 * 2), 8 / (2 * 6)]))
    trainer.run()
    assert (tmp_path / "state_checkpoint_epoch=1.pt").is_file() and not (tmp_path / MODEL_FILE).exists()
    with pytest.raises(ValueError, match="class_weights"):
        create_classifier_trainer(small_net(), loader, device="cpu", max_epochs=1, class_weights="uniform")
    with pytest.raises(ValueError, match="max_epochs"):
        create_classifier_trainer(small_net(), loader, device="cpu", max_epochs=0)
    with pytest.raises(ValueError, match="resume_from"):
        create_classifier_trainer(small_net(), loader, device="cpu", max_epochs=1, resume_from=tmp_path / "none")


def test_balanced_class_weights():
    torch.testing.assert_close(balanced_class_weights([0, 0, 0, 1], 3), torch.tensor([4 / 9, 4 / 3, 0.0]))


@pytest.mark.parametrize(
    "value, total, expected",
    [
        (1.0, None, 0.99),
        (0.05, None, 0.998),
        (0.01, None, 0.999),
        (0.005, None, 0.999),
        (20, None, 0.9998),
        (50, 10_000, 0.9998),
        (500, 10_000, 0.998),
        (100, 10_000, 0.999),
        (40, 40, 0.99),
    ],
)
def test_lr_decay_for_label_fraction(value, total, expected):
    assert lr_decay_for_label_fraction(value, total) == expected


def test_lr_decay_errors():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            lr_decay_for_label_fraction(bad)
    with pytest.raises(ValueError, match="total"):
        lr_decay_for_label_fraction(500)
    with pytest.raises(TypeError):
        lr_decay_for_label_fraction(True)


def test_compute_embeddings():
    net = small_net()
    net.train()
    loader = create_loader(square_dataset(10, seed=0), batch_size=4, shuffle=False, seed=0)
    z, labels = compute_embeddings(net, loader, "cpu")
    assert z.shape == (10, 32) and labels.tolist() == [i % 2 for i in range(10)]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))
    assert net.training and not z.requires_grad
