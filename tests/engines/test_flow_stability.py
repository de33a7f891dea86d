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
"""The flow trainer's fidelity mechanisms: noise / condition dropout in the loss, EMA, the loss-spike guard."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from monai_condflow.engines.flow import FlowBitsPerDim, FlowDivergedError, FlowTrainer
from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.handlers.checkpoint import load_checkpoint
from monai_condflow.utils.distributed import create_loader

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _noisy_flow(cond_dropout=0.5, noise_std=0.05):
    from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

    torch.manual_seed(1)
    return ConditionalGlow(
        condition_dim=32, num_levels=2, num_steps=2, num_blocks=(1, 1), hidden_channels=8, image_size=16,
        cond_dropout=cond_dropout, noise_std=noise_std,
    )  # fmt: skip


def test_loss_module_adds_noise_and_drops_conditions_in_training_mode_only():
    flow = _noisy_flow()
    data = W.make_flow_data(8, 0)
    x = torch.stack([d["image"] for d in data])
    z = torch.stack([d["condition"] for d in data])
    flow.initialize(x, z)
    with torch.no_grad():  # couplings and priors away from their identity initialisation, so z matters
        for name, p in flow.named_parameters():
            if "conv_out" in name or "proj" in name:
                p.normal_(0, 0.05)
    loss = FlowBitsPerDim(flow)
    loss.eval()
    assert torch.equal(loss(x, z), loss(x, z))  # deterministic: clean data, true condition
    clean = loss(x, z)
    loss.train()
    torch.manual_seed(0)
    noisy = loss(x, z)
    assert not torch.allclose(noisy, clean)
    # with noise off and dropout on, exactly the dropped rows change
    flow.noise_std = 0.0
    torch.manual_seed(0)
    drop = torch.rand(8, 1) < flow.cond_dropout
    torch.manual_seed(0)
    mixed = loss(x, z)
    changed = (mixed - clean).abs() > 1e-6
    assert changed.tolist() == drop.reshape(-1).tolist() and 0 < int(drop.sum()) < 8


def test_ema_model_is_validated_checkpointed_and_resumed(tmp_path):
    train = create_loader(W.make_flow_data(16, 0), 8, shuffle=True, seed=3)
    val = create_loader(W.make_flow_data(8, 1), 8, shuffle=False, seed=3)
    args = {"device": "cpu", "output_dir": tmp_path, "warmup_epochs": 1, "lr": 1e-3, "seed": 5, "tensorboard": False,
            "ema_decay": 0.9}  # fmt: skip
    trainer, evaluator = create_flow_trainer(W.make_flow(1), None, train, val, max_epochs=2, **args)
    trainer.run()
    ema = trainer.ema
    assert ema is not None and ema.num_updates == 4
    raw = trainer.network.flow.state_dict()
    avg = ema.module.state_dict()
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    # the evaluator scores the average, and model.pt (the best epoch) holds it
    assert evaluator.network.flow is ema.module
    best = load_checkpoint(tmp_path / "model.pt")["network"]
    assert all(torch.equal(best[k], avg[k]) for k in avg)
    latest = load_checkpoint(tmp_path / "state_checkpoint_epoch=2.pt")
    assert latest["ema"]["num_updates"] == 4
    # resume: the average continues from the saved one, not from a copy of the raw weights
    trainer2, _ = create_flow_trainer(W.make_flow(1), None, train, val, max_epochs=3, resume_from=tmp_path, **args)
    assert trainer2.ema.num_updates == 4
    assert all(torch.equal(trainer2.ema.module.state_dict()[k], avg[k]) for k in avg)


class _ScriptedLoss(torch.nn.Module):
    """A one-parameter 'flow loss' whose per-sample loss is scripted per iteration (a spike where the script says)."""

    def __init__(self, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.script = list(script)
        self.calls = 0

    def forward(self, x, condition=None):
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return (value + 0.0 * self.w + self.w**2).expand(x.shape[0])


def _scripted_trainer(script, epochs, **kwargs):
    net = _ScriptedLoss(script)
    data = [{"image": torch.zeros(1, 4, 4), "condition": torch.zeros(2)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = FlowTrainer("cpu", epochs, loader, net, opt, spike_threshold=1.0, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    trainer.lr_scheduler = sched
    return trainer, net, opt, sched


def test_a_loss_spike_skips_the_step_and_a_persistent_one_restores_the_last_good_epoch():
    # epoch 1: 5, 4.9 (good); epoch 2: 4.8, then 3 spikes (> running mean + 1) -> restore after 3, then calm
    trainer, net, opt, sched = _scripted_trainer([5.0, 4.9, 4.8, 9.0, 9.0, 9.0, 4.7, 4.7], 4, spike_patience=3)
    trainer.run()
    assert trainer.state.spike_steps == 3
    assert trainer.state.spike_restores == 1
    assert sched.base_lrs == [pytest.approx(0.05)]  # halved after the restore
    assert trainer.state.skipped_steps == 0  # spikes are counted apart from non-finite skips


def test_spikes_that_persist_after_the_allowed_restores_stop_the_run_with_a_clear_error():
    trainer, *_ = _scripted_trainer([5.0, 4.9] + [50.0] * 40, 20, spike_patience=2, max_restores=1)
    with pytest.raises(FlowDivergedError, match="diverged .* Lower the learning rate"):
        trainer.run()
    assert trainer.state.spike_restores == 1


def test_spike_guard_settings_are_checked():
    with pytest.raises(ValueError, match="spike_threshold"):
        _scripted_trainer([1.0], 1, spike_patience=1)[0].__class__(
            "cpu", 1, [], _ScriptedLoss([1.0]), torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], 0.1),
            spike_threshold=-1.0,
        )  # fmt: skip
