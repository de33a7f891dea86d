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
    # one point per epoch (1 + 1, 2 + 1, 3 + 1), and the COMPLETED call again at the last epoch
    assert steps == [1, 2, 3, 3]
    assert values == pytest.approx([2.0, 3.0, 4.0, 4.0])
    assert not (tmp_path / "privacy.json").exists()


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
def test_delta_outside_the_open_unit_interval_is_refused(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        PrivacyAccountantHandler(_FakePrivacyEngine(), delta)
