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
"""Adversarial fine-tuning of the flow: the loss pieces, the trainer, the bundle step and its config checks."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ignite.engine import Events

from monai_condflow.engines.flow_adversarial import (
    LIKELIHOOD_MODEL_FILE,
    AdversarialFlowTrainer,
    average_gradients,
    check_adversarial,
    frozen_parameters,
    hinge_discriminator_loss,
    log_power_spectrum,
    random_translate,
    range_excess,
    run_adversarial_phase,
    spectral_distance,
)
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
from monai_condflow.networks.nets import ProjectionDiscriminator
from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.distributed import create_loader
from monai_condflow.utils.io import MODEL_FILE, atomic_torch_save

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def test_random_translate_is_a_replicated_shift_within_range():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    assert random_translate(x, 0) is x
    gen = torch.Generator().manual_seed(0)
    y = random_translate(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(2):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        matches = [c for c in crops if torch.equal(y[i], c)]
        assert matches, f"image {i} is not a shifted crop"
    # the offsets differ between images of a batch (with 25 choices each, 8 images never all share one)
    many = random_translate(x.repeat(4, 1, 1, 1), 2, torch.Generator().manual_seed(1))
    assert len({tuple(m.flatten().tolist()[:3]) for m in many}) > 1
    leaf = x.clone().requires_grad_(True)
    random_translate(leaf, 1, gen).sum().backward()
    assert leaf.grad is not None and leaf.grad.sum() == leaf.numel()  # each output pixel comes from one input pixel
    assert random_translate(torch.zeros(1, 1, 4, 4, 4), 1, gen).shape == (1, 1, 4, 4, 4)


def test_range_excess_and_hinge_by_hand():
    x = torch.tensor([[[[0.5, 1.5], [-0.25, 1.0]]], [[[0.0, 0.2], [0.3, 0.9]]]])
    assert torch.allclose(range_excess(x), torch.tensor([0.25 + 0.0625, 0.0]))
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5
    assert hinge_discriminator_loss(d_real, d_fake).item() == pytest.approx(0.75)
    assert hinge_discriminator_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2.0)


def test_projection_discriminator_uses_the_condition_and_checks_shapes():
    torch.manual_seed(0)
    disc = ProjectionDiscriminator(2, 1, 8, channels=(4, 8)).eval()  # eval: no power iteration per call
    x, z = torch.rand(3, 1, 8, 8), torch.randn(3, 8)
    out = disc(x, z)
    assert out.shape == (3,)
    # the projection term: another condition, another logit; the same image and condition, the same logit
    assert not torch.allclose(out, disc(x, -z))
    assert torch.allclose(out, disc(x, z))
    with pytest.raises(ValueError, match=r"condition of shape \[3, 8\]"):
        disc(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="divisible by 4"):
        disc(torch.rand(3, 1, 6, 6), z)
    plain = ProjectionDiscriminator(3, 2, 0, channels=(4,))
    assert plain(torch.rand(2, 2, 4, 4, 4)).shape == (2,)
    with pytest.raises(ValueError, match="spatial_dims"):
        ProjectionDiscriminator(1, 1, 8)


def test_projection_discriminator_channels_last_weights_same_logits():
    """2-D critics keep their convolution weights channels-last by default; the logits and the input gradient match
    a contiguous-layout critic with the same weights (``channels_last=False``)."""
    torch.manual_seed(0)
    fast = ProjectionDiscriminator(2, 1, 8, channels=(4, 8), high_pass=True).eval()
    plain = ProjectionDiscriminator(2, 1, 8, channels=(4, 8), high_pass=True, channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    stem = fast.features[0].parametrizations.weight.original
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert plain.features[0].parametrizations.weight.original.is_contiguous()
    x, z = torch.rand(3, 1, 8, 8, requires_grad=True), torch.randn(3, 8)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = fast(x, z), plain(x2, z)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_projection_discriminator_high_pass_channel_by_hand():
    """``high_pass``: the stem also reads ``x - mean_3x3(x)`` (borders average the pixels inside the image)."""
    disc = ProjectionDiscriminator(2, 1, 8, channels=(4, 8), high_pass=True).eval()
    assert disc.features[0].in_channels == 2
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0
    h = disc._input(x)
    assert torch.equal(h[:, :1], x)
    assert h[0, 1, 3, 4].item() == pytest.approx(1 - 1 / 9)
    assert h[0, 1, 2, 3].item() == pytest.approx(-1 / 9)  # a neighbour sees the bright pixel in its mean
    assert h[0, 1, 6, 6].item() == 0.0
    corner = torch.zeros(1, 1, 8, 8)
    corner[0, 0, 0, 0] = 1.0
    assert disc._input(corner)[0, 1, 0, 0].item() == pytest.approx(1 - 1 / 4)  # 4 pixels inside at a corner
    assert torch.allclose(disc._input(torch.full((1, 1, 8, 8), 0.3))[:, 1], torch.zeros(1, 8, 8), atol=1e-7)
    assert disc(torch.rand(2, 1, 8, 8), torch.randn(2, 8)).shape == (2,)
    assert ProjectionDiscriminator(2, 1, 8, channels=(4, 8)).features[0].in_channels == 1  # off by default


def _trainer(steps=4, seed=0, **kwargs):
    flow = W.make_flow(1)
    data = W.make_flow_data(16, 0)
    flow.initialize(torch.stack([d["image"] for d in data[:8]]), torch.stack([d["condition"] for d in data[:8]]))
    torch.manual_seed(seed)
    disc = ProjectionDiscriminator(2, 1, 32, channels=(8, 16))
    loader = create_loader(data, 8, shuffle=True, seed=3)
    trainer = AdversarialFlowTrainer(
        "cpu", steps, loader, flow, disc, torch.optim.Adam(flow.parameters(), 1e-3),
        torch.optim.Adam(disc.parameters(), 2e-4), prepare_batch=ConditionPrepareBatch(), consistency_weight=0.0,
        seed=seed, **kwargs,
    )  # fmt: skip
    return trainer, flow, disc, data


def test_trainer_updates_flow_and_discriminator_and_keeps_the_inverse_exact():
    trainer, flow, disc, data = _trainer(steps=5)
    before_flow = {k: v.clone() for k, v in flow.state_dict().items()}
    before_disc = [p.detach().clone() for p in disc.parameters()]
    trainer.run()
    assert trainer.state.iteration == 5  # one epoch of `steps` iterations, the 2-batch loader restarted
    out = trainer.state.output
    assert set(out.keys()) >= {"loss", "d_loss", "g_adversarial", "consistency", "excess", "grad_norm", "skipped"}
    assert out["skipped"] is False and trainer.state.skipped_steps == 0
    assert any(not torch.equal(before_flow[k], v) for k, v in flow.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(before_disc, disc.parameters()))
    flow.eval()
    x = torch.stack([d["image"] for d in data[:4]])
    z = torch.stack([d["condition"] for d in data[:4]])
    with torch.no_grad():
        nu, _ = flow(x, z)
        back, _ = flow.inverse(nu, z)
    assert torch.allclose(back, x, atol=1e-4)


def test_frozen_parameters_restores_exactly_the_trainable_ones_also_on_an_error():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net[1].bias.requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    with frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
        net(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in net.parameters())  # the input's gradient only
    with pytest.raises(RuntimeError, match="boom"), frozen_parameters(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]


def test_flow_step_freezes_the_critic_and_keeps_the_flow_gradient():
    """The flow's step reads dD/dx only: the critic's gradients after an iteration are those of its own step (the
    flow's pass adds nothing), a parameter the user froze stays frozen, and the flow's gradient equals the one
    computed with the critic's weights trainable."""
    trainer, flow, disc, _ = _trainer(steps=1)
    disc.head.parametrizations.weight.original.requires_grad_(False)  # frozen by the user
    d_grads, flow_grads = [], []
    d_step, f_step = trainer.d_optimizer.step, trainer.optimizer.step
    trainer.d_optimizer.step = lambda *a, **k: (
        d_grads.extend(p.grad.clone() for p in disc.parameters() if p.grad is not None),
        d_step(*a, **k),
    )
    trainer.optimizer.step = lambda *a, **k: (
        flow_grads.extend(p.grad.clone() for p in flow.parameters() if p.grad is not None),
        f_step(*a, **k),
    )
    trainer.run()
    after = [p.grad for p in disc.parameters() if p.grad is not None]
    assert len(after) == len(d_grads) > 0
    for a, b in zip(after, d_grads):
        assert torch.equal(a, b)
    assert not disc.head.parametrizations.weight.original.requires_grad
    assert all(p.requires_grad for n, p in disc.named_parameters() if not n.startswith("head."))

    class Unfreezable(torch.nn.Module):  # hides the critic's parameters from the trainer's freezing
        def __init__(self, inner):
            super().__init__()
            object.__setattr__(self, "inner", inner)

        def forward(self, x, cond=None):
            return self.inner(x, cond)

    ref, ref_flow, ref_disc, _ = _trainer(steps=1)
    ref_disc.head.parametrizations.weight.original.requires_grad_(False)
    ref.discriminator = Unfreezable(ref_disc)
    ref_grads, r_step = [], ref.optimizer.step
    ref.optimizer.step = lambda *a, **k: (
        ref_grads.extend(p.grad.clone() for p in ref_flow.parameters() if p.grad is not None),
        r_step(*a, **k),
    )
    ref.run()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in ref_disc.parameters())  # it did accumulate
    assert len(ref_grads) == len(flow_grads) > 0
    for a, b in zip(flow_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_range_term_pulls_overflowing_samples_back():
    """With only the range term weighted (adversarial weight 0), the decoded samples' excess falls."""

    def excess_of(flow):
        gen = torch.Generator().manual_seed(9)
        z = torch.nn.functional.normalize(torch.randn(32, 32, generator=gen), dim=1)
        with torch.no_grad():
            x, _ = flow.inverse(torch.randn(32, flow.latent_dim(), generator=gen) * 2.0, z)
        return float(range_excess(x).mean())

    trainer, flow, _, _ = _trainer(steps=20, adversarial_weight=0.0, range_weight=100.0, temperature=2.0)
    start = excess_of(flow)
    assert start > 0  # at T = 2 the tiny flow overflows
    trainer.run()
    assert excess_of(flow) < 0.5 * start


def test_likelihood_term_reads_the_first_images_of_the_batch_only():
    """``likelihood_batch_size`` k: the likelihood term is the bits/dim of the batch's first k images (its mean is the
    reported loss), while the discriminator still reads the whole batch."""
    trainer, flow, disc, _ = _trainer(steps=2, likelihood_batch_size=3)
    seen_nll, seen_disc, means = [], [], []
    real_nll, real_disc = trainer.nll, disc.forward

    def _nll(x, cond):
        seen_nll.append(x.shape[0])
        out = real_nll(x, cond)
        means.append(float(out.mean()))
        return out

    def _disc(x, cond=None):
        seen_disc.append(x.shape[0])
        return real_disc(x, cond)

    trainer.nll = _nll
    disc.forward = _disc
    trainer.run()
    assert seen_nll == [3, 3]  # batches of 8, likelihood on 3
    assert set(seen_disc) == {8}  # real, fake for D; fake for the flow's adversarial term
    assert trainer.state.output["loss"] == pytest.approx(means[-1])
    with pytest.raises(ValueError, match="likelihood_batch_size"):
        _trainer(likelihood_batch_size=0)


def test_likelihood_every_k_steps_counts_k_times():
    """``likelihood_every`` k: the likelihood's forward runs on steps 1, 1 + k, ... only, its gradient there is k times
    the every-step one (the time average is unchanged), and the skipped steps report the last computed bits/dim."""
    grads = {}
    for every in (1, 2):
        trainer, flow, _, _ = _trainer(
            steps=1, adversarial_weight=0.0, range_weight=0.0, max_grad_norm=None, likelihood_every=every
        )
        step = trainer.optimizer.step
        trainer.optimizer.step = lambda *a, _s=step, _e=every, _f=flow, **k: (
            grads.setdefault(_e, [p.grad.clone() for p in _f.parameters() if p.grad is not None]),
            _s(*a, **k),
        )
        trainer.run()
    assert len(grads[1]) == len(grads[2]) > 0
    assert any(g.abs().max() > 0 for g in grads[1])
    for g1, g2 in zip(grads[1], grads[2]):
        torch.testing.assert_close(g2, 2 * g1, rtol=1e-6, atol=0.0)

    trainer, _, _, _ = _trainer(steps=5, likelihood_every=2)
    real_nll, means, reported = trainer.nll, [], []

    def _nll(x, cond):
        out = real_nll(x, cond)
        means.append((trainer.state.iteration, float(out.mean())))
        return out

    trainer.nll = _nll
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: reported.append(e.state.output["loss"]))
    trainer.run()
    assert [i for i, _ in means] == [1, 3, 5]
    expected = [means[0][1], means[0][1], means[1][1], means[1][1], means[2][1]]
    assert reported == pytest.approx(expected)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="likelihood_every"):
            _trainer(likelihood_every=bad)


def test_trainer_refuses_bad_settings():
    flow = W.make_flow(1)
    disc = ProjectionDiscriminator(2, 1, 32, channels=(8,))
    opts = (torch.optim.Adam(flow.parameters()), torch.optim.Adam(disc.parameters()))
    with pytest.raises(ValueError, match="steps >= 1"):
        AdversarialFlowTrainer("cpu", 0, [], flow, disc, *opts)
    with pytest.raises(ValueError, match="needs a classifier"):
        AdversarialFlowTrainer(
            "cpu", 2, [], flow, disc, *opts, prepare_batch=ConditionPrepareBatch(), consistency_weight=1.0
        )
    with pytest.raises(ValueError, match="spectral_weight must be >= 0"):
        AdversarialFlowTrainer("cpu", 2, [], flow, disc, *opts, spectral_weight=-1.0)
    with pytest.raises(ValueError, match="spectral_decay must be in"):
        AdversarialFlowTrainer("cpu", 2, [], flow, disc, *opts, spectral_weight=1.0, spectral_decay=1.0)


class _Embed(torch.nn.Module):
    """A stand-in conditioning classifier: ``embed`` = a fixed random projection of the 16 x 16 image, normalised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(16 * 16, 32)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.proj(x.flatten(1)), dim=1)


def test_consistency_term_uses_the_classifier_and_reaches_the_flow():
    """With a classifier in prepare_batch and consistency_weight > 0 the step reports 1 - cos(embed(x_fake), z) in
    [0, 2], and that term alone moves the flow's weights (adversarial and range weights 0)."""
    trainer, flow, _, _ = _trainer(steps=1)
    embed = _Embed()
    trainer.classifier, trainer.consistency_weight = embed, 1.0
    trainer.adversarial_weight = trainer.range_weight = 0.0
    trainer.run()
    out = trainer.state.output
    assert 0.0 < out["consistency"] <= 2.0
    # the same step without the consistency term gives other weights: its gradient reached the flow
    other, flow2, _, _ = _trainer(steps=1)
    _Embed()  # the same global random state as the first run (the stand-in reseeds it)
    other.adversarial_weight = other.range_weight = 0.0
    other.run()
    assert any(not torch.equal(a, b) for a, b in zip(flow.state_dict().values(), flow2.state_dict().values()))


def test_log_power_spectrum_by_hand():
    x = torch.rand(3, 2, 8, 6, dtype=torch.float64)
    centred = x.numpy() - x.numpy().mean(axis=(-2, -1), keepdims=True)
    power = (abs(np.fft.rfft2(centred)) ** 2 / (8 * 6)).mean(axis=0)  # orthonormal FFT: |F|^2 / (H W)
    assert log_power_spectrum(x).shape == (2, 8, 4)
    np.testing.assert_allclose(log_power_spectrum(x).numpy(), np.log(power + 1e-6), rtol=1e-10)
    # a constant image has no power besides its removed mean: every bin is log(eps)
    assert torch.allclose(log_power_spectrum(torch.full((1, 1, 4, 4), 0.7)), torch.tensor(1e-6).log())


def _lattice(n: int = 16) -> torch.Tensor:
    """A dot every 4 pixels in both directions (the pattern two squeezes leave), zero mean."""
    pattern = torch.zeros(n, n)
    pattern[::4, ::4] = 1.0
    return pattern - pattern.mean()


def test_spectral_distance_sees_a_lattice_and_its_gradient_removes_it():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(8, 1, 20, 20, generator=gen), 5, stride=1)  # [8, 1, 16, 16]
    reference = log_power_spectrum(smooth)
    assert float(spectral_distance(smooth, reference)) == 0.0
    fake = (smooth + 0.1 * _lattice()).requires_grad_(True)
    start = float(spectral_distance(fake.detach(), reference))
    assert start > 0.3
    at_lattice = (4, 4)  # frequency 16 / 4 = 4 along both axes of the rfft2 grid [16, 9]
    power = log_power_spectrum(fake.detach())[0][at_lattice]
    assert power > reference[0][at_lattice] + 2  # e^2 = 7x the power of the smooth images at the lattice bin
    opt = torch.optim.Adam([fake], lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        spectral_distance(fake, reference).backward()
        opt.step()
    assert float(spectral_distance(fake.detach(), reference)) < 0.05 * start
    assert log_power_spectrum(fake.detach())[0][at_lattice] < power - 2


def test_spectral_term_is_off_by_default_and_reaches_the_flow_when_weighted():
    plain, flow_a, _, _ = _trainer(steps=3)
    zero, flow_b, _, _ = _trainer(steps=3, spectral_weight=0.0)
    plain.run()
    zero.run()
    assert all(torch.equal(a, b) for a, b in zip(flow_a.state_dict().values(), flow_b.state_dict().values()))
    assert zero.state.output["spectral"] == 0.0
    weighted, flow_c, _, _ = _trainer(steps=3, spectral_weight=5.0)
    weighted.run()
    assert weighted.state.output["spectral"] > 0
    assert any(not torch.equal(a, c) for a, c in zip(flow_a.state_dict().values(), flow_c.state_dict().values()))
    # only the spectral term weighted: it falls over the steps
    only, flow_d, _, _ = _trainer(steps=40, adversarial_weight=0.0, range_weight=0.0, spectral_weight=50.0)
    seen = []
    only.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["spectral"]))
    only.run()
    assert sum(seen[-5:]) < 0.8 * sum(seen[:5])


def test_run_adversarial_phase_settles_model_and_record_and_restarts_from_likelihood_weights(tmp_path):
    trainer, flow, _, _ = _trainer(steps=3)
    atomic_torch_save({"network": flow.state_dict()}, tmp_path / MODEL_FILE)
    (tmp_path / "flow.json").write_text(json.dumps({"preset": "small", "selected": "best validation epoch 2"}))
    likelihood = {k: v.clone() for k, v in flow.state_dict().items()}
    assert run_adversarial_phase(tmp_path, None) is None
    record = run_adversarial_phase(tmp_path, trainer, ema_decay=0.5)
    assert record["steps"] == 3 and record["skipped_steps"] == 0 and record["adversarial_weight"] == 1.0
    assert (record["consistency_weight"], record["range_weight"], record["likelihood_every"]) == (0.0, 0.5, 1)
    assert record["spectral_weight"] == 0.0 and "spectral" not in record["last"]
    kept = torch.load(tmp_path / LIKELIHOOD_MODEL_FILE, weights_only=True)["network"]
    assert all(torch.equal(kept[k], v) for k, v in likelihood.items())
    tuned = torch.load(tmp_path / MODEL_FILE, weights_only=True)["network"]
    assert any(not torch.equal(tuned[k], v) for k, v in likelihood.items())
    info = json.loads((tmp_path / "flow.json").read_text())
    assert info["selected"] == "best validation epoch 2 + adversarial fine-tuning (3 steps)"
    assert info["adversarial"]["steps"] == 3 and info["preset"] == "small"
    # a rerun (e.g. after a kill during the phase) starts again from the likelihood weights, not from model.pt
    trainer2, _, _, _ = _trainer(steps=3)
    run_adversarial_phase(tmp_path, trainer2, ema_decay=0.5)
    again = torch.load(tmp_path / MODEL_FILE, weights_only=True)["network"]
    assert all(torch.equal(again[k], v) for k, v in tuned.items())
    info = json.loads((tmp_path / "flow.json").read_text())
    assert info["selected"] == "best validation epoch 2 + adversarial fine-tuning (3 steps)"


@pytest.mark.parametrize(
    "args, key",
    [
        ((-1, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3), "adversarial_steps"),
        ((1.5, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3), "adversarial_steps"),
        ((10, -0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3), "adversarial_weight"),
        ((10, 0.5, float("nan"), 10.0, 0.9, 1e-4, 2e-4, 3), "consistency_weight"),
        ((10, 0.5, 1.0, "x", 0.9, 1e-4, 2e-4, 3), "range_weight"),
        ((10, 0.5, 1.0, 10.0, 0.0, 1e-4, 2e-4, 3), "adversarial_temperature"),
        ((10, 0.5, 1.0, 10.0, 0.9, 0.0, 2e-4, 3), "adversarial_lr"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, -1.0, 3), "discriminator_lr"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, -2), "adversarial_shift"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 16, "yes"), "discriminator_high_pass"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, 0.3), "sampling_prior_shrinkage"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 0), "adversarial_batch_size"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 8.0), "adversarial_batch_size"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 16, False, 0), "adversarial_likelihood_every"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 16, False, True), "adversarial_likelihood_every"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 16, False, 2, -1.0), "spectral_weight"),
        ((10, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, None, 16, False, 2, True), "spectral_weight"),
    ],
)
def test_config_checks_name_the_key(args, key):
    with pytest.raises(ConfigValueError, match=f"'{key}'"):
        check_adversarial(*args)


def test_config_checks_accept_defaults():
    assert check_adversarial(300, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3)
    assert check_adversarial(0, 0.5, 1.0, 10.0, 0.9, 1e-4, 2e-4, 3, 0.3)  # no phase: a fitted prior is fine
    assert check_adversarial(300, 1.0, 0.0, 0.5, 0.9, 1e-4, 2e-4, 3, None, 16)


def _average_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = torch.nn.Linear(3, 2)
        for p in net.parameters():
            p.grad = torch.full_like(p, float(rank + 1))
        net.bias.grad[0] = 10.0 * rank
        average_gradients(net)
        torch.save({"weight": net.weight.grad, "bias": net.bias.grad}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_average_gradients_over_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(grads["weight"], torch.full((2, 3), 1.5))
        assert torch.allclose(grads["bias"], torch.tensor([5.0, 1.5]))
    net = torch.nn.Linear(2, 1)
    net.weight.grad = torch.ones(1, 2)
    average_gradients(net)  # outside torch.distributed: unchanged
    assert torch.equal(net.weight.grad, torch.ones(1, 2))
