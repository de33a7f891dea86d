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
"""DP-SGD wiring: a tiny classifier and a tiny ConditionalGlow train privately for 2 steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
from monai_condflow.networks.nets.pepx_net import PEPXNet
from monai_condflow.privacy.dp import (
    covered_parameters,
    dp_flow_step,
    dp_summary,
    flow_nll,
    make_private,
    per_sample_gradients,
    prepare_module,
)

EPS, DELTA = 8.0, 1e-3
ACC = "rdp"  # the noise-multiplier search is ~2x faster than with PRV on 2 CPU cores


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and the accountant's defaults
        yield


def _tiny_flow() -> ConditionalGlow:
    return ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=1, num_blocks=1, hidden_channels=4, condition_dim=8
    )


def _tiny_classifier(norm: str | None = "group") -> PEPXNet:
    return PEPXNet(2, 1, 2, embedding_dim=8, channels=(4, 8), blocks=(1, 1), norm=norm)


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["loop", "auto"])
def test_flow_per_sample_gradients_match_one_example_backward(method):
    flow = _tiny_flow()
    flow.mark_initialized()
    x, z = _images(3), nn.functional.normalize(torch.randn(3, 8), dim=1)
    grads, losses = per_sample_gradients(flow, flow_nll, x, z, method=method, set_grad_sample=False)
    assert set(grads) == {n for n, _ in flow.named_parameters()}
    for i in range(3):
        flow.zero_grad()
        loss = flow_nll(flow, x[i : i + 1], z[i : i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in flow.named_parameters():
            expected = torch.zeros_like(p) if p.grad is None else p.grad  # unused by the loss (the null condition)
            assert torch.allclose(grads[name][i], expected, atol=1e-5, rtol=1e-4), name
    # the log-determinant terms reach ActNorm and the LU 1x1 conv: their gradients are not all zero
    assert grads["levels.0.layers.1.layers.0.log_scale"].abs().sum() > 0
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("log_abs_s"))


def test_haar_squeeze_flow_per_sample_gradients_run_under_vmap():
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=1, num_blocks=1, hidden_channels=4, condition_dim=8,
        squeeze="haar",
    )  # fmt: skip
    flow.mark_initialized()
    x, z = _images(3), nn.functional.normalize(torch.randn(3, 8), dim=1)
    vmapped, losses = per_sample_gradients(flow, flow_nll, x, z, method="vmap", set_grad_sample=False)
    looped, looped_losses = per_sample_gradients(flow, flow_nll, x, z, method="loop", set_grad_sample=False)
    torch.testing.assert_close(losses, looped_losses, rtol=1e-5, atol=1e-5)
    for name in looped:
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-4, atol=1e-5, msg=name)


def test_per_sample_gradients_through_convolutions_composed_together():
    """With the 1x1 convolutions composed in one batch per size (``compose_convs_together``) and the constant
    log-determinants summed per level (``batch_constant_logdets``), the GPU defaults, the vectorised per-example
    gradients equal the one-example loop's of the one-by-one, per-layer pass."""
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=2, num_blocks=1, hidden_channels=4, condition_dim=8
    )
    flow.mark_initialized()
    assert max(len(g) for g in flow._conv_groups) == 2
    x, z = _images(3), nn.functional.normalize(torch.randn(3, 8), dim=1)
    flow.compose_convs_together = flow.batch_constant_logdets = True
    together, losses = per_sample_gradients(flow, flow_nll, x, z, method="vmap", set_grad_sample=False)
    flow.compose_convs_together = flow.batch_constant_logdets = False
    alone, losses_alone = per_sample_gradients(flow, flow_nll, x, z, method="loop", set_grad_sample=False)
    torch.testing.assert_close(losses, losses_alone, rtol=1e-5, atol=1e-5)
    for name, g in alone.items():
        torch.testing.assert_close(together[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in together.items() if n.endswith("log_abs_s"))
    assert any(g.abs().sum() > 0 for n, g in together.items() if n.endswith("log_scale"))


def test_vmap_and_loop_agree_on_a_plain_network():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(5, 3), torch.randn(5, 1)

    def mse(model, xb, yb):
        return (model(xb) - yb).pow(2).mean()

    g_vmap, l_vmap = per_sample_gradients(net, mse, x, y, method="vmap", set_grad_sample=False)
    g_loop, l_loop = per_sample_gradients(net, mse, x, y, method="loop")
    assert torch.allclose(l_vmap, l_loop, atol=1e-6)
    for name, p in net.named_parameters():
        assert torch.allclose(g_vmap[name], g_loop[name], atol=1e-6) and p.grad_sample.shape == (5, *p.shape)
    # hand-computed: d/db2 of (w2.h + b2 - y)^2 = 2 (f(x) - y)
    assert torch.allclose(g_loop["2.bias"], 2 * (net(x) - y).detach(), atol=1e-6)


def test_dp_flow_trains_two_steps_within_budget():
    flow = _tiny_flow()  # fresh: make_private gives it the identity ActNorm init, no data touched
    clf = _tiny_classifier().eval()  # the frozen conditioning classifier (DP-trained or public in real use)
    x = _images(8)
    with torch.no_grad():
        z = clf.embed(x)
    loader = DataLoader(TensorDataset(x, z), batch_size=4)  # 2 steps per epoch
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in flow.named_parameters()}
    model, optimizer, loader, engine = make_private(
        flow, optimizer, loader, EPS, DELTA, epochs=1, max_grad_norm=1.0, accountant=ACC,
        noise_generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert flow.is_initialized and all(flow.levels[0].layers[1].layers[0].log_scale.flatten() == 0)
    assert optimizer.noise_multiplier > 0
    steps = 0
    for xb, zb in loader:  # the planned epochs: 1 epoch = 2 Poisson batches
        losses = dp_flow_step(model, optimizer, xb, zb)
        assert losses.shape == (xb.shape[0],) and torch.isfinite(losses).all()
        steps += 1
    assert steps == 2
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name  # noised, clipped gradient of every param
    assert any(not torch.equal(before[n], p) for n, p in flow.named_parameters())
    epsilon = engine.get_epsilon(DELTA)
    assert 0 < epsilon <= EPS * 1.001 and math.isfinite(epsilon)
    summary = dp_summary(engine, optimizer, model, DELTA)
    assert summary["epsilon"] == pytest.approx(epsilon) and summary["steps"] == 2
    assert summary["covered_parameters"] == [n for n, _ in flow.named_parameters()]
    assert "identity initialisation" in summary["covers"] and "does not cover" in summary["covers"]
    # an empty Poisson batch still takes a (noise-only) step and is accounted for
    losses = dp_flow_step(model, optimizer, torch.zeros(0, 1, 16, 16), torch.zeros(0, 8))
    assert losses.shape == (0,) and engine.get_epsilon(DELTA) > epsilon


def test_dp_classifier_gets_per_sample_gradients_for_every_parameter():
    clf = _tiny_classifier()
    x, y = _images(8), torch.tensor([0, 1] * 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    optimizer = torch.optim.SGD(clf.parameters(), lr=0.1)
    model, optimizer, loader, engine = make_private(
        clf, optimizer, loader, EPS, DELTA, epochs=1, max_grad_norm=1.0, accountant=ACC
    )
    seen = 0
    for xb, yb in loader:
        if xb.shape[0] == 0:
            continue
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        for name, p in clf.named_parameters():
            assert p.grad_sample is not None and p.grad_sample.shape == (xb.shape[0], *p.shape), name
        optimizer.step()
        seen += 1
    assert seen >= 1
    epsilon = engine.get_epsilon(DELTA)
    assert 0 < epsilon <= EPS * 1.001
    assert covered_parameters(model) == [n for n, _ in clf.named_parameters()]


def test_refusals_batchnorm_initialised_flow_and_layerwise_modes():
    loader = DataLoader(TensorDataset(_images(4), torch.tensor([0, 1, 0, 1])), batch_size=2)
    bn = _tiny_classifier(norm="batch")
    with pytest.raises(ValueError, match="prepare_module"):
        make_private(bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader, EPS, DELTA, 1, 1.0)
    fixed = prepare_module(bn)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules()) and not ModuleValidator.validate(fixed)
    flow = _tiny_flow()
    flow.initialize(_images(4), torch.randn(4, 8))  # data-dependent init: not covered by the accounting
    with pytest.raises(ValueError, match="already initialised"):
        make_private(flow, torch.optim.SGD(flow.parameters(), lr=0.1), loader, EPS, DELTA, 1, 1.0)
    with pytest.raises(ValueError, match="log-determinant"):
        make_private(_tiny_flow(), torch.optim.SGD(flow.parameters(), lr=0.1), loader, EPS, DELTA, 1, 1.0,
                     grad_sample_mode="functorch")  # fmt: skip
    with pytest.raises(ValueError, match="target_epsilon"):
        make_private(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1), loader, 0.0, DELTA, 1, 1.0)


def test_a_nan_example_in_a_dp_classifier_step_contributes_zero_and_the_step_is_accounted():
    """one non-finite example neither poisons the weights nor skips the (noised, accounted) step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    x[3] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.randint(0, 2, (8,))), batch_size=8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    model, optimizer, loader, engine = make_private(
        net, optimizer, loader, 4.0, 1e-3, epochs=1, max_grad_norm=1.0, accountant="gdp", poisson_sampling=False
    )
    before = [p.detach().clone() for p in net.parameters()]
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert optimizer.nonfinite_examples == 1 and sum(h[2] for h in engine.accountant.history) == 1
