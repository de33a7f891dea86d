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
"""DP-SGD flow training through create_flow_trainer(dp=...): accounting, checkpoints, resume, no data init."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

import monai_condflow.privacy.dp as dp_module
from monai_condflow.engines.flow import FlowBitsPerDim, FlowTrainer
from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.handlers.checkpoint import load_checkpoint
from monai_condflow.networks.blocks.actnorm import ActNorm
from monai_condflow.utils.distributed import create_loader

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

DP = {"target_epsilon": 8.0, "target_delta": 1e-3, "max_grad_norm": 1.0, "accountant": "rdp"}
# Opacus' RDP noise search with subsampling (q < 1) takes ~10 s on 2 busy CPU cores, GDP is closed-form: the RDP run
# uses full Poisson batches (q = 1), the other tests GDP with 2 Poisson batches per epoch (q = 0.5).
DP_FAST = {**DP, "accountant": "gdp"}


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and the accountant's defaults
        yield


def _build(out: Path, *, max_epochs: int = 2, dp=DP_FAST, val: bool = True, batch_size: int = 8, **kwargs):
    """The tiny flow on 16 images with conditions in the batches (no classifier)."""
    train = create_loader(W.make_flow_data(16, 0), batch_size, shuffle=True, seed=3)
    val_loader = create_loader(W.make_flow_data(8, 1), 8, shuffle=False, seed=3) if val else None
    flow = W.make_flow(1)
    args = {"device": "cpu", "max_epochs": max_epochs, "output_dir": out, "warmup_epochs": 0, "lr": 1e-3, "seed": 5,
            "tensorboard": False, "dp": dp, **kwargs}  # fmt: skip
    trainer, evaluator = create_flow_trainer(flow, None, train, val_loader, **args)
    return flow, trainer, evaluator


def _actnorms(flow) -> list[ActNorm]:
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert norms
    return norms


def _steps(accountant_state: dict) -> int:
    return sum(int(h[2]) for h in accountant_state["history"])


def _privacy(out: Path) -> dict:
    return json.loads((out / "privacy.json").read_text(encoding="utf-8"))


def test_dp_training_accounts_checkpoints_and_skips_data_init(tmp_path):
    flow, trainer, evaluator = _build(tmp_path, dp=DP, batch_size=16)
    # no data-dependent ActNorm initialisation: identity parameters, flagged as initialised
    assert flow.is_initialized
    assert all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in _actnorms(flow))
    assert all(torch.equal(n.log_scale, torch.zeros_like(n.log_scale)) for n in _actnorms(flow))
    assert trainer.state.epsilon == 0.0
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    epsilons = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epsilons.append(e.state.epsilon))
    trainer.run()

    assert trainer.state.epoch == 2 and trainer.state.skipped_steps == 0
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]
    info = _privacy(tmp_path)
    assert 0 < info["epsilon"] <= 8.0 * 1.05 and info["epsilon"] == pytest.approx(epsilons[-1])
    assert info["steps"] == 2 and info["epoch"] == 2  # 2 epochs x len(loader) = 1 Poisson step
    assert info["delta"] == 1e-3 and info["target_epsilon"] == 8.0 and info["accountant"] == "rdp"
    assert info["max_grad_norm"] == 1.0 and info["noise_multiplier"] > 0
    assert info["covered_parameters"] == [n for n, _ in flow.named_parameters()]
    assert math.isfinite(evaluator.state.metrics["val_bpd"])  # validation still runs ...
    names = sorted(os.listdir(tmp_path))
    assert "model.pt" not in names  # ... but selects no epoch (not covered by DP)
    assert "state_checkpoint_epoch=2.pt" in names
    ckpt = load_checkpoint(tmp_path / "state_checkpoint_epoch=2.pt")
    assert "privacy_accountant" in ckpt and "best_checkpoint" not in ckpt
    assert ckpt["privacy_accountant"]["mechanism"] == "rdp" and _steps(ckpt["privacy_accountant"]) == 2
    after = flow.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert any(not torch.equal(n.bias, torch.zeros_like(n.bias)) for n in _actnorms(flow))  # trained privately


def test_poisson_batches_make_the_epoch_length(tmp_path):
    _, trainer, _ = _build(tmp_path, val=False)
    trainer.run()
    info = _privacy(tmp_path)
    assert trainer.state.iteration == 4 and info["steps"] == 4  # 2 epochs x 2 Poisson batches (q = 8 / 16)
    assert info["accountant"] == "gdp" and info["expected_batch_size"] == 8
    assert 0 < info["epsilon"] <= 8.0 * 1.05


def test_without_dp_the_flow_is_data_initialised(tmp_path):
    """The contrast to the test above: the same set-up without ``dp`` moves ActNorm off the identity."""
    flow, _, _ = _build(tmp_path, dp=None, val=False)
    assert flow.is_initialized
    assert any(not torch.equal(n.bias, torch.zeros_like(n.bias)) for n in _actnorms(flow))


def test_resume_after_a_kill_continues_the_accounting(tmp_path):
    _, first, _ = _build(tmp_path, max_epochs=3, val=False)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())  # killed after epoch 2
    first.run()
    eps2 = _privacy(tmp_path)
    assert eps2["steps"] == 4 and eps2["epoch"] == 2
    flow, resumed, _ = _build(tmp_path, max_epochs=3, val=False, resume_from=tmp_path)
    assert resumed.state.epoch == 2 and not resumed.resume_completed
    assert all(not torch.equal(n.bias, torch.zeros_like(n.bias)) for n in _actnorms(flow))  # weights reloaded
    resumed.run()
    eps3 = _privacy(tmp_path)
    assert resumed.state.epoch == 3 and eps3["epoch"] == 3
    assert eps3["steps"] == eps2["steps"] + 2  # the 4 earlier steps are still counted
    assert eps3["epsilon"] > eps2["epsilon"] > 0 and eps3["epsilon"] <= 8.0 * 1.05
    assert eps3["noise_multiplier"] == eps2["noise_multiplier"]
    assert _steps(load_checkpoint(tmp_path / "state_checkpoint_epoch=3.pt")["privacy_accountant"]) == 6


def test_extending_a_finished_dp_run_keeps_the_target_or_is_refused(tmp_path):
    _, first, _ = _build(tmp_path, max_epochs=2, val=False)
    first.run()
    try:
        _, resumed, _ = _build(tmp_path, max_epochs=3, val=False, resume_from=tmp_path)
    except ValueError as err:  # refusing up front, naming the setting, is an acceptable fix
        assert "max_epochs" in str(err)
        return
    resumed.run()
    info = _privacy(tmp_path)
    assert info["steps"] == 6 and info["epsilon"] <= info["target_epsilon"] * 1.05


def test_dp_resume_from_a_non_dp_checkpoint_is_refused(tmp_path):
    _, trainer, _ = _build(tmp_path, max_epochs=1, dp=None, val=False)
    trainer.run()
    assert "privacy_accountant" not in load_checkpoint(tmp_path / "state_checkpoint_epoch=1.pt")
    with pytest.raises(ValueError, match="privacy accountant"):
        _build(tmp_path, max_epochs=2, val=False, resume_from=tmp_path)
    assert not (tmp_path / "privacy.json").exists()


def test_bad_dp_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="target_epsilon"):
        _build(tmp_path, dp={"target_epsilon": -1, "target_delta": 1e-5})
    with pytest.raises(ValueError, match="unknown DP setting"):
        _build(tmp_path, dp={"target_epsilon": 1, "target_delta": 1e-5, "epochs": 3})
    assert not os.listdir(tmp_path)


def test_compiled_flow_steps_are_refused_under_dp_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="DP-SGD flow training runs eagerly.*'compile' false"):
        _build(tmp_path, compile=True)
    assert not os.listdir(tmp_path)
    # the bundle's DP overlay builds the trainer itself: FlowTrainer refuses a network with compiled steps
    flow = W.make_flow(1)
    net = FlowBitsPerDim(flow, compile=True)
    with pytest.raises(ValueError, match="runs eagerly"):
        FlowTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=net,
                    optimizer=torch.optim.SGD(flow.parameters(), lr=0.1), dp_module=flow)  # fmt: skip
    # ... and a flow compiled by hand, passed with compile false
    flow = W.make_flow(1).compile_steps()
    with pytest.raises(ValueError, match="runs eagerly"):
        FlowTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=FlowBitsPerDim(flow),
                    optimizer=torch.optim.SGD(flow.parameters(), lr=0.1), dp_module=flow)  # fmt: skip


def test_non_finite_per_example_loss_is_dropped_but_the_step_is_noised_and_accounted(tmp_path, monkeypatch):
    """a NaN example contributes a zero gradient; the step itself still happens (clip, noise, accounting), so
    whether a step happens never depends on private data."""
    real = dp_module.per_sample_gradients
    calls = []

    def poisoned(module, loss_fn, *batch, **kwargs):
        grads, losses = real(module, loss_fn, *batch, **kwargs)
        calls.append(losses.numel())
        if len(calls) == 2:
            losses = torch.cat([torch.tensor([float("nan")]), losses[1:]])
            for g in grads.values():
                g[0] = float("nan")
        return grads, losses

    monkeypatch.setattr(dp_module, "per_sample_gradients", poisoned)  # _dp_iteration imports it at call time
    flow, trainer, _ = _build(tmp_path, max_epochs=1, val=False)
    skipped, dropped, losses, states = [], [], [], []

    def record(engine):
        skipped.append(engine.state.output["skipped"])
        dropped.append(engine.state.output["nonfinite_examples"])
        losses.append(float(engine.state.output["loss"]))
        states.append({k: v.clone() for k, v in flow.state_dict().items()})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    trainer.run()
    assert len(calls) == 2 and calls[1] > 0
    assert skipped == [False, False] and dropped == [0, 1] and trainer.state.skipped_steps == 0
    assert all(math.isfinite(v) for v in losses)  # the loss logged is over the finite examples
    # the step with the NaN example moved the (finite) parameters and counted in the accounting
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0] if states[0][k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in states[1].values() if v.is_floating_point())
    assert any(not torch.equal(before[k], states[0][k]) for k in before if before[k].is_floating_point())
    assert _privacy(tmp_path)["steps"] == 2


def test_dp_noise_does_not_follow_the_public_seed(tmp_path):
    """two DP runs with the same seed, data and settings end with different weights (OS-entropy noise), and
    privacy.json says where the noise came from."""
    weights = []
    for name in ("a", "b"):
        flow, trainer, _ = _build(tmp_path / name, max_epochs=1, val=False)
        trainer.run()
        weights.append({k: v.clone() for k, v in flow.state_dict().items()})
    floats = [k for k in weights[0] if weights[0][k].is_floating_point()]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in floats)
    for name in ("a", "b"):
        info = _privacy(tmp_path / name)
        assert "operating system" in info["noise_source"] and "public seed" in info["noise_source"]
    # the OS-seeded generators are not in the checkpoint: nothing there replays the noise
    ckpt = load_checkpoint(tmp_path / "a" / "state_checkpoint_epoch=1.pt")
    assert set(ckpt) <= {"flow", "optimizer", "lr_scheduler", "trainer", "rng", "privacy_accountant", "dp_plan",
                         "checkpointer"}  # fmt: skip


def test_public_init_fine_tunes_a_pretrained_flow_privately(tmp_path):
    """A flow initialised on public data keeps its weights as the starting point; without the flag it is refused."""
    public = W.make_flow(1)
    batch = W.make_flow_data(8, 7)
    public.initialize(torch.stack([b["image"] for b in batch]), torch.stack([b["condition"] for b in batch]))
    start = {k: v.clone() for k, v in public.state_dict().items()}
    assert any(not torch.equal(n.bias, torch.zeros_like(n.bias)) for n in _actnorms(public))
    train = create_loader(W.make_flow_data(16, 0), 8, shuffle=True, seed=3)
    args = {"device": "cpu", "max_epochs": 1, "warmup_epochs": 0, "lr": 1e-3, "seed": 5, "tensorboard": False,
            "dp": DP_FAST}  # fmt: skip
    with pytest.raises(ValueError, match="public_init=True"):
        create_flow_trainer(public, None, train, None, output_dir=tmp_path / "refused", **args)
    trainer, _ = create_flow_trainer(public, None, train, None, output_dir=tmp_path / "ok", public_init=True, **args)
    # not re-initialised: neither to the identity (DP default) nor on the private batch
    assert all(torch.equal(v, start[k]) for k, v in public.state_dict().items())
    trainer.run()
    info = _privacy(tmp_path / "ok")
    assert info["steps"] == 2 and 0 < info["epsilon"] <= 8.0 * 1.05
    moved = [k for k, v in public.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved  # fine-tuned under DP-SGD


def test_dp_fine_tuning_of_a_parameter_subset_leaves_the_rest_untouched(tmp_path):
    from monai_condflow.privacy.public import select_trainable

    flow = select_trainable(W.make_flow(1), "affine")
    start = {k: v.clone() for k, v in flow.state_dict().items()}
    trainable = {n for n, p in flow.named_parameters() if p.requires_grad}
    train = create_loader(W.make_flow_data(16, 0), 8, shuffle=True, seed=3)
    trainer, _ = create_flow_trainer(flow, None, train, None, device="cpu", max_epochs=1, output_dir=tmp_path,
                                     warmup_epochs=0, lr=1e-2, seed=5, tensorboard=False, dp=DP_FAST)  # fmt: skip
    trainer.run()
    after = flow.state_dict()
    for name, _ in flow.named_parameters():
        assert torch.equal(after[name], start[name]) != (name in trainable), name  # trained iff selected
    info = _privacy(tmp_path)
    assert set(info["covered_parameters"]) == trainable and 0 < info["epsilon"] <= 8.0 * 1.05
