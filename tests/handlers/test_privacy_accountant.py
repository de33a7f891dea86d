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
"""PrivacyAccountantHandler: epsilon per epoch in the engine state, a JSON file and TensorBoard."""

from __future__ import annotations

import json
import math

import pytest
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from monai_condflow.evaluation.report import read_tensorboard_scalars
from monai_condflow.handlers.privacy_accountant import PrivacyAccountantHandler

DELTA = 1e-3


class _Accountant:
    def __init__(self):
        self.history: list[tuple[float, float, int]] = []


class _FakePrivacyEngine:
    """``get_epsilon(delta)`` = sum over the history of ``steps * sample_rate / noise`` plus ``1000 * delta``.

    Like a real accountant it cannot answer before the first step (raises), and it records the deltas asked for.
    """

    def __init__(self):
        self.accountant = _Accountant()
        self.deltas: list[float] = []

    def get_epsilon(self, delta: float) -> float:
        if not self.accountant.history:
            raise RuntimeError("no steps yet")
        self.deltas.append(delta)
        return sum(s * q / sigma for sigma, q, s in self.accountant.history) + 1000 * delta


def _engine(privacy_engine: _FakePrivacyEngine, step: tuple[float, float, int] | None) -> Engine:
    """Each iteration appends ``step`` to the accountant's history (``None``: no noisy step)."""

    def process(engine, batch):
        if step is not None:
            privacy_engine.accountant.history.append(step)

    return Engine(process)


def test_epsilon_per_epoch_json_and_state(tmp_path):
    pe = _FakePrivacyEngine()
    engine = _engine(pe, (2.0, 0.5, 2))  # each iteration: 2 steps at q=0.5, sigma=2 -> +0.5 epsilon
    out = tmp_path / "sub" / "privacy.json"
    handler = PrivacyAccountantHandler(
        pe, DELTA, output_file=out, summary_fn=lambda: {"noise_multiplier": 2.0, "target_epsilon": 8.0}
    )
    handler.attach(engine)
    assert engine.state.epsilon == 0.0
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append((e.state.epoch, e.state.epsilon)))
    engine.run(range(3), max_epochs=2)  # 3 iterations per epoch
    # epoch 1: 6 steps, 3 * 0.5 + 1000 * 1e-3 = 2.5; epoch 2: 12 steps, 3.0 + 1.0 = 4.0
    assert seen == [(1, pytest.approx(2.5)), (2, pytest.approx(4.0))]
    assert engine.state.epsilon == pytest.approx(4.0)
    assert handler.steps() == 12 and set(pe.deltas) == {DELTA}
    expected = {"epsilon": 4.0, "delta": DELTA, "steps": 12, "noise_multiplier": 2.0, "target_epsilon": 8.0,
                "epoch": 2}  # fmt: skip
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == pytest.approx(expected) and list(data) == list(expected)
    assert [p.name for p in out.parent.iterdir()] == ["privacy.json"]  # atomic write: no temporary file left


def test_default_summary_and_json_rewritten_each_epoch(tmp_path):
    pe = _FakePrivacyEngine()
    engine = _engine(pe, (1.0, 0.25, 1))
    out = tmp_path / "privacy.json"
    contents = []
    PrivacyAccountantHandler(pe, 0.5, output_file=out).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: contents.append(json.loads(out.read_text())))
    engine.run(range(2), max_epochs=2)
    # epsilon = steps * 0.25 + 1000 * 0.5
    assert contents == [
        {"epsilon": 500.5, "delta": 0.5, "steps": 2, "epoch": 1},
        {"epsilon": 501.0, "delta": 0.5, "steps": 4, "epoch": 2},
    ]


def test_epsilon_is_zero_before_any_step(tmp_path):
    pe = _FakePrivacyEngine()
    engine = _engine(pe, None)  # no noisy step is ever taken: get_epsilon would raise
    out = tmp_path / "privacy.json"
    handler = PrivacyAccountantHandler(pe, DELTA, output_file=out)
    assert handler.epsilon() == 0.0 and handler.steps() == 0
    handler.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert engine.state.epsilon == 0.0 and pe.deltas == []
    assert json.loads(out.read_text()) == {"epsilon": 0.0, "delta": DELTA, "steps": 0, "epoch": 1}


def test_tensorboard_scalar_per_epoch(tmp_path):
    pe = _FakePrivacyEngine()
    engine = _engine(pe, (4.0, 1.0, 1))  # +0.25 per iteration
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    PrivacyAccountantHandler(pe, DELTA, summary_writer=writer, tag="dp/eps").attach(engine)
    engine.run(range(4), max_epochs=3)
    writer.close()
    scalars = read_tensorboard_scalars(tmp_path / "tb")["."]
    assert list(scalars) == ["dp/eps"]
    steps, values = scalars["dp/eps"]
    # exactly one point per epoch (1 + 1, 2 + 1, 3 + 1): COMPLETED does not repeat the last epoch
    assert steps == [1, 2, 3]
    assert values == pytest.approx([2.0, 3.0, 4.0])
    assert not (tmp_path / "privacy.json").exists()


def test_a_run_terminated_mid_epoch_records_its_last_epoch_once(tmp_path):
    """``COMPLETED`` after a termination mid-epoch (no ``EPOCH_COMPLETED`` for it) records that epoch, once."""
    pe = _FakePrivacyEngine()
    engine = _engine(pe, (4.0, 1.0, 1))  # +0.25 per iteration
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    out = tmp_path / "privacy.json"
    PrivacyAccountantHandler(pe, DELTA, summary_writer=writer, output_file=out).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())  # epoch 2, iteration 2
    engine.run(range(4), max_epochs=3)
    writer.close()
    steps, values = read_tensorboard_scalars(tmp_path / "tb")["."]["privacy/epsilon"]
    assert steps == [1, 2] and values == pytest.approx([2.0, 2.5])
    assert json.loads(out.read_text()) == {"epsilon": 2.5, "delta": DELTA, "steps": 6, "epoch": 2}


def test_log_dir_gives_the_handler_its_own_writer(tmp_path):
    """Without ``summary_writer``, ``log_dir`` opens a writer at the first write and closes it at ``COMPLETED``:
    the points are on disk when the run ends, one per epoch."""
    pe = _FakePrivacyEngine()
    engine = _engine(pe, (4.0, 1.0, 1))
    handler = PrivacyAccountantHandler(pe, DELTA, log_dir=tmp_path / "tb")
    handler.attach(engine)
    assert not (tmp_path / "tb").exists()  # nothing opened before the first epoch ends
    engine.run(range(4), max_epochs=2)
    assert handler._own_writer is None  # closed at COMPLETED
    steps, values = read_tensorboard_scalars(tmp_path / "tb")["."]["privacy/epsilon"]
    assert steps == [1, 2] and values == pytest.approx([2.0, 3.0])
    assert PrivacyAccountantHandler(pe, DELTA).writer() is None  # neither: no TensorBoard


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
def test_delta_outside_the_open_unit_interval_is_refused(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        PrivacyAccountantHandler(_FakePrivacyEngine(), delta)


def _dp_classifier_trainer(max_epochs: int, accountant_state: dict | None = None, epoch: int = 0):
    """A tiny DP-SGD classifier (MONAI SupervisedTrainer + make_private, GDP accountant) planned for ``max_epochs``,
    optionally resumed at ``epoch`` with a saved accountant (what the bundle's CheckpointLoader restores)."""
    import warnings

    import torch
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader, TensorDataset

    from monai_condflow.privacy.dp import make_private

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randn(20, 4), torch.randint(0, 2, (20,)))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader, engine = make_private(
            net, optimizer, DataLoader(data, batch_size=10), target_epsilon=2.0, target_delta=DELTA,
            epochs=max_epochs, max_grad_norm=1.0, accountant="gdp",
        )  # fmt: skip
    trainer = SupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=model,
                                optimizer=optimizer, loss_function=torch.nn.CrossEntropyLoss())  # fmt: skip
    if accountant_state is not None:
        engine.accountant.load_state_dict(accountant_state)
        trainer.load_state_dict({"epoch": epoch, "epoch_length": len(loader), "max_epochs": max_epochs})
    handler = PrivacyAccountantHandler(engine, DELTA, target_epsilon=2.0)
    handler.attach(trainer)
    return trainer, engine, handler


def test_dp_classifier_resume_that_would_overspend_is_refused():
    """a DP run planned for 2 epochs, resumed with max_epochs 6, would end above its target: refused before any
    step; resuming with the original plan continues and ends within the target."""
    trainer, engine, _ = _dp_classifier_trainer(2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())  # "killed" after epoch 1
    trainer.run()
    saved = engine.accountant.state_dict()
    assert sum(h[2] for h in saved["history"]) == 2

    longer, longer_engine, _ = _dp_classifier_trainer(6, saved, epoch=1)
    with pytest.raises(ValueError, match="target_epsilon"):
        longer.run()
    assert sum(h[2] for h in longer_engine.accountant.history) == 2  # no step was taken

    same, same_engine, handler = _dp_classifier_trainer(2, saved, epoch=1)
    same.run()
    assert same.state.epoch == 2 and 0 < handler.epsilon() <= 2.0 * 1.001


def test_projected_epsilon_composes_the_history_with_the_steps_to_come():
    from opacus.accountants import RDPAccountant

    from monai_condflow.privacy.dp import check_resume_budget, projected_epsilon

    planned = RDPAccountant()
    planned.history = [(1.0, 0.5, 12)]
    target = planned.get_epsilon(DELTA)
    done = RDPAccountant()
    done.history = [(1.0, 0.5, 4)]
    # the original plan projects exactly the uninterrupted run; a lower noise for the rest overspends
    assert projected_epsilon(done, 1.0, 0.5, 8, DELTA) == pytest.approx(target, rel=1e-12)
    assert check_resume_budget(done, 1.0, 0.5, 4, 12, target, DELTA) == pytest.approx(target, rel=1e-12)
    assert projected_epsilon(done, 0.8, 0.5, 8, DELTA) > target
    with pytest.raises(ValueError, match="max_epochs"):
        check_resume_budget(done, 0.8, 0.5, 4, 12, target, DELTA)
