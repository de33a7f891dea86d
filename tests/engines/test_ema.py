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
from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_condflow.engines.ema import ModelEMA


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_ema_follows_the_hand_computed_average_with_warm_up():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    expected = w0.clone()
    for t in range(1, 5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(t)
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model[0].weight.detach()
        assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
        assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_skips_steps_the_trainer_skipped_and_round_trips_its_state():
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    engine = Engine(lambda e, b: {"skipped": b})
    ema.attach(engine)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    engine.run([True, True], max_epochs=1)
    assert ema.num_updates == 0
    engine.run([False], max_epochs=1)
    assert ema.num_updates == 1
    state = ema.state_dict()
    other = ModelEMA(_model(), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 1 and torch.equal(other.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError):
        ModelEMA(model, decay=1.0)


def test_ema_follows_tensors_the_model_replaces_and_skips_none_buffers():
    """The average is looked up by slot at each update: a buffer (or parameter) the model replaces by a new tensor
    after the EMA was built is the one copied (averaged), not the stale one."""
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    model[1].running_mean = torch.tensor([3.0, -4.0])  # a new tensor in the buffer's slot
    model[0].bias = torch.nn.Parameter(torch.tensor([10.0, 20.0]))  # a new parameter in its slot
    before = ema.module[0].bias.detach().clone()
    ema.update()
    assert torch.equal(ema.module[1].running_mean, torch.tensor([3.0, -4.0]))
    d = min(0.5, 2 / 11)
    assert torch.allclose(ema.module[0].bias, d * before + (1 - d) * torch.tensor([10.0, 20.0]))
    model[1].running_var = None  # a buffer set to None is left alone
    ema.update()
    assert ema.module[1].running_var is not None and ema.num_updates == 2


def test_ema_of_tied_parameters_averages_each_tensor_once():
    torch.manual_seed(0)
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    ema = ModelEMA(model, decay=0.5)
    assert ema.module[0] is ema.module[2]  # the copy keeps the tie
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    d = min(0.5, 2 / 11)
    assert torch.allclose(ema.module[2].weight, d * w0 + (1 - d) * model[0].weight.detach(), atol=1e-6)
