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
"""Tests of the invertible flow layers: exact inverses, brute-force log-determinants, ActNorm."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from monai_condflow.networks.blocks import (
    ActNorm,
    ConditionalAffineCoupling,
    ConditionalFlowStep,
    ConditionalTopPrior,
    FineGrainedLevel,
    FineGrainedSplit,
    FlowSequential,
    HaarSqueeze,
    InvertibleConv1x1,
    Squeeze,
)
from monai_condflow.networks.blocks.flow_sequential import (
    deferring_constant_logdets,
    recording_logdet_maps,
    sum_deferred_logdets,
)
from monai_condflow.networks.blocks.invertible_conv import compose_weights, composed_together

COND = 3


@torch.no_grad()
def perturb(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers are no longer the identity."""
    for p in module.parameters():
        p.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device) * std)
    return module


def brute_force_logdet(layer: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """``log|det J|`` per sample from the full autograd Jacobian of the layer's forward map."""
    out = []
    for b in range(x.shape[0]):
        c = None if cond is None else cond[b : b + 1]

        def fn(v: torch.Tensor, c=c) -> torch.Tensor:
            return layer(v.view(1, *x.shape[1:]), c)[0].flatten()

        jac = torch.autograd.functional.jacobian(fn, x[b].flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _layers() -> dict[str, tuple[nn.Module, tuple[int, ...], bool]]:
    """name -> (layer, input shape [B, C, *S], uses condition)."""
    return {
        "actnorm": (ActNorm(2, 3), (2, 3, 4, 4), False),
        "invconv": (InvertibleConv1x1(2, 4), (2, 4, 4, 4), False),
        "invconv3d": (InvertibleConv1x1(3, 3), (2, 3, 2, 2, 2), False),
        "coupling": (ConditionalAffineCoupling(2, 4, COND, 8), (2, 4, 4, 4), True),
        "coupling_odd": (ConditionalAffineCoupling(2, 3, COND, 8), (2, 3, 4, 4), True),
        "coupling3d": (ConditionalAffineCoupling(3, 2, COND, 4), (2, 2, 2, 2, 2), True),
        "squeeze": (Squeeze(2), (2, 1, 4, 4), False),
        "squeeze3d": (Squeeze(3), (2, 1, 2, 2, 4), False),
        "haar": (HaarSqueeze(2), (2, 3, 4, 6), False),
        "haar3d": (HaarSqueeze(3), (2, 2, 2, 4, 2), False),
        "haar_sequential": (FlowSequential(HaarSqueeze(2), ConditionalFlowStep(2, 4, COND, 8)), (2, 1, 4, 4), True),
        "split": (FineGrainedSplit(2, 4, 1, COND, 8), (2, 4, 4, 4), True),
        "top_prior": (ConditionalTopPrior(2, 4, COND), (2, 4, 2, 2), True),
        "top_prior_uncond": (ConditionalTopPrior(2, 4, 0), (2, 4, 2, 2), False),
        "top_prior_spatial": (ConditionalTopPrior(2, 4, COND, spatial_shape=(2, 3)), (2, 4, 2, 3), True),
        "top_prior_spatial_uncond": (ConditionalTopPrior(2, 3, 0, spatial_shape=(3, 2)), (2, 3, 3, 2), False),
        "step": (ConditionalFlowStep(2, 4, COND, 8), (2, 4, 4, 4), True),
        "sequential": (FlowSequential(Squeeze(2), ConditionalFlowStep(2, 4, COND, 8)), (2, 1, 4, 4), True),
        "level": (FineGrainedLevel(2, 8, COND, num_blocks=2, num_steps=1, hidden_channels=8), (2, 8, 2, 2), True),
    }


LAYER_NAMES = list(_layers())


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    layer, shape, conditional = _layers()[name]
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    cond = torch.randn(shape[0], COND, dtype=torch.float64) if conditional else None
    if isinstance(layer, FlowSequential | FineGrainedLevel | ActNorm):
        layer.initialize(x * 2 + 1, cond)
    perturb(layer, 0.2)
    return layer, x, cond


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_logdet_matches_autograd_jacobian(name):
    layer, x, cond = _setup(name)
    y, logdet = layer(x, cond)
    assert y.shape[0] == x.shape[0] and y.numel() == x.numel()
    assert logdet.shape == (x.shape[0],) and logdet.dtype == x.dtype
    expected = brute_force_logdet(layer, x, cond)
    torch.testing.assert_close(logdet, expected, atol=1e-8, rtol=1e-8)
    if name not in ("squeeze", "squeeze3d", "haar", "haar3d"):
        assert logdet.abs().max() > 1e-3, "perturbed layer should not be volume preserving"


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_exact_inverse(name):
    layer, x, cond = _setup(name)
    y, logdet = layer(x, cond)
    assert not torch.allclose(y.reshape(x.shape), x), "perturbed layer should not be the identity"
    for grad in (True, False):  # fresh weights with autograd, cached inverses without
        with torch.set_grad_enabled(grad):
            x_rec, logdet_inv = layer.inverse(y, cond)
        torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=0)
        torch.testing.assert_close(logdet_inv, -logdet, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["coupling", "split", "top_prior", "top_prior_spatial", "step"])
def test_zero_init_is_identity_transform(name):
    layer, shape, conditional = _layers()[name]
    x = torch.randn(shape)
    cond = torch.randn(shape[0], COND) if conditional else None
    y, logdet = layer(x, cond)
    if name == "step":  # ActNorm identity + a rotation: volume preserving, coupling identity
        torch.testing.assert_close(logdet, torch.zeros(shape[0]), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(y, x)
        torch.testing.assert_close(logdet, torch.zeros(shape[0]))


def test_coupling_scale_bounded_and_inverse_finite():
    layer = ConditionalAffineCoupling(2, 4, COND, 16, scale_bound=2.0)
    perturb(layer, 50.0)  # absurd weights
    x, cond = torch.randn(2, 4, 4, 4) * 10, torch.randn(2, COND)
    y, logdet = layer(x, cond)
    n_transformed = 2 * 4 * 4
    assert torch.isfinite(y).all() and (logdet.abs() <= 2.0 * n_transformed).all()
    x_rec, logdet_inv = layer.inverse(y * 1e3, cond)  # far outside the training range: still finite
    assert torch.isfinite(x_rec).all() and (logdet_inv.abs() <= 2.0 * n_transformed).all()


def test_coupling_condition_errors():
    layer = ConditionalAffineCoupling(2, 4, COND, 8)
    with pytest.raises(ValueError, match="condition=None"):
        layer(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[2, 3\].*\[2, 5\]"):
        layer(torch.randn(2, 4, 4, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="in_channels >= 2"):
        ConditionalAffineCoupling(2, 1, COND, 8)


def test_squeeze_shapes_and_errors():
    y, logdet = Squeeze(2)(torch.randn(3, 1, 8, 6))
    assert y.shape == (3, 4, 4, 3) and torch.equal(logdet, torch.zeros(3))
    y3, _ = Squeeze(3)(torch.randn(1, 1, 2, 4, 6))
    assert y3.shape == (1, 8, 1, 2, 3)
    with pytest.raises(ValueError, match=r"divisible by 2.*\[1, 1, 8, 7\]"):
        Squeeze(2)(torch.randn(1, 1, 8, 7))


def test_squeeze_output_is_channels_last_pixel_unshuffle():
    x = torch.randn(3, 2, 8, 6)
    y, _ = Squeeze(2)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, nn.functional.pixel_unshuffle(x, 2))
    assert torch.equal(Squeeze(2).inverse(y)[0], x)


def test_haar_squeeze_hand_computed_block():
    a, b, c, d = 3.0, 1.0, 4.0, 2.0  # one 2 x 2 block [[a, b], [c, d]]
    y, logdet = HaarSqueeze(2)(torch.tensor([[[[a, b], [c, d]]]]))
    expected = torch.tensor([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d]) / 2
    torch.testing.assert_close(y.flatten(), expected)
    assert torch.equal(logdet, torch.zeros(1))


def test_haar_squeeze_is_orthonormal_mean_plus_details():
    x = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    y, _ = HaarSqueeze(2).double()(x)
    assert y.shape == (3, 8, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))  # norm kept: orthonormal
    # channel c * 4 is input channel c's 2 x 2 block mean times 2
    torch.testing.assert_close(y[:, ::4], nn.functional.avg_pool2d(x, 2) * 2)
    flat = torch.ones(1, 1, 2, 4, 6)  # a constant volume has no detail
    y3, _ = HaarSqueeze(3)(flat)
    torch.testing.assert_close(y3[:, 0], torch.full((1, 1, 2, 3), 8**0.5))
    assert torch.equal(y3[:, 1:], torch.zeros(1, 7, 1, 2, 3))
    with pytest.raises(ValueError, match=r"divisible by 2.*\[1, 1, 8, 7\]"):
        HaarSqueeze(2)(torch.randn(1, 1, 8, 7))


def test_level_layout_and_errors():
    level = FineGrainedLevel(2, 16, COND, num_blocks=3, num_steps=1, hidden_channels=4, granularity=4)
    assert (level.split_channels, level.keep_channels) == (4, 4)
    assert [b[0].layers[0].num_channels for b in level.blocks] == [16, 12, 8]
    with pytest.raises(ValueError, match="at least one"):
        FineGrainedLevel(2, 16, COND, num_blocks=4, num_steps=1, hidden_channels=4, granularity=4)
    with pytest.raises(ValueError, match="out_channels"):
        FineGrainedSplit(2, 4, 4, COND, 8)


# ---------------------------------------------------------------------------------------------------- ActNorm
def test_actnorm_initialize_normalises_and_is_explicit():
    layer = ActNorm(2, 3)
    x = torch.randn(8, 3, 5, 5) * torch.tensor([0.5, 2.0, 3.0]).view(1, 3, 1, 1) + 4.0
    y0, logdet0 = layer(x)  # uninitialised: runs as the identity, does not initialise
    torch.testing.assert_close(y0, x)
    torch.testing.assert_close(logdet0, torch.zeros(8))
    assert not bool(layer.initialized)
    layer.initialize(x)
    assert bool(layer.initialized)
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    params = [p.clone() for p in layer.parameters()]
    layer(x * 7 - 3)  # forward never re-initialises
    assert all(torch.equal(p, q) for p, q in zip(params, layer.parameters()))


def test_actnorm_constant_channel_is_safe():
    layer = ActNorm(2, 2)
    x = torch.randn(4, 2, 3, 3)
    x[:, 1] = 0.25
    y, logdet = layer.initialize(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert layer.log_scale.max() <= -torch.log(torch.tensor(layer.min_std)) + 1e-4


def test_actnorm_state_dict_round_trip():
    layer = ActNorm(2, 3)
    layer.initialize(torch.randn(4, 3, 4, 4) * 3)
    assert "initialized" in layer.state_dict()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm(2, 3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(fresh.initialized)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)


# -------------------------------------------------------------------------------------- LU 1x1 conv and its cache
def test_invconv_lu_structure():
    layer = InvertibleConv1x1(2, 6)
    perturb(layer, 0.5)
    with torch.no_grad():
        weight, inverse = layer.weights()
    torch.testing.assert_close(weight @ inverse, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.slogdet(weight)[1], layer.log_abs_s.sum().detach(), atol=1e-5, rtol=0)
    assert set(dict(layer.named_buffers())) >= {"permutation", "sign_s"}
    assert "permutation" in layer.state_dict() and "eye" not in layer.state_dict()


def test_invconv_cache_hit_and_invalidation_after_optimizer_step():
    layer = InvertibleConv1x1(2, 4)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        first = layer.weights()
        assert layer.weights() is first  # cached
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        y, logdet = layer(x)
        (y.pow(2).mean() - logdet.mean() / x[0].numel()).backward()
        opt.step()
        y, _ = layer(x)
        with torch.no_grad():
            x_rec, _ = layer.inverse(y)
        torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert layer.weights() is not first
        assert not torch.allclose(layer.weights()[1], first[1])


def test_invconv_cache_invalidated_by_load_state_dict_and_dtype():
    a, b = InvertibleConv1x1(2, 4), perturb(InvertibleConv1x1(2, 4), 0.3)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        a.inverse(x)  # fill a's cache
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a.inverse(b(x)[0])[0], x, atol=1e-5, rtol=0)
        a.double()
        x64 = x.double()
        torch.testing.assert_close(a.inverse(a(x64)[0])[0], x64, atol=1e-12, rtol=0)


def _reference_bound(raw: torch.Tensor, first: float, second: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-half formula the fused bound replaces: ``(first tanh(r / first), second tanh(u / second))``."""
    r, u = raw.chunk(2, dim=1)
    return first * torch.tanh(r / first), second * torch.tanh(u / second)


@pytest.mark.parametrize("kind", ["coupling", "split"])
@pytest.mark.parametrize("grad", [True, False])
def test_fused_soft_bound_is_bit_identical_to_per_half_formula(kind, grad):
    torch.manual_seed(0)
    if kind == "coupling":
        layer = perturb(ConditionalAffineCoupling(2, 5, COND, 8, scale_bound=2.0, shift_bound=5.0), 0.5)
        x_in, first, second, fused = torch.randn(3, 2, 6, 6), 2.0, 5.0, layer._scale_shift
    else:
        layer = perturb(FineGrainedSplit(2, 5, 2, COND, 8, scale_bound=2.0, shift_bound=5.0), 0.5)
        x_in, first, second, fused = torch.randn(3, 3, 6, 6), 5.0, 2.0, layer._prior
    x_in = (x_in * 3).contiguous(memory_format=torch.channels_last)
    cond = torch.randn(3, COND)
    with torch.set_grad_enabled(grad):
        got = fused(x_in, cond)
        expected = _reference_bound(layer.net(x_in, cond), first, second)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    if grad:  # same gradients through the in-place division / tanh
        w = layer.net.conv_out.weight
        g_got = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in got), w)[0]
        g_exp = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in expected), w)[0]
        torch.testing.assert_close(g_got, g_exp, atol=1e-6, rtol=1e-6)
    assert "_bound" not in layer.state_dict()  # a non-persistent buffer: checkpoints are unchanged


def test_exp_of_channels_last_slice_is_exact_and_differentiable():
    from monai_condflow.networks.blocks.coupling import _exp

    base = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    part = base[:, 1:3]  # a strided slice: copied to a dense tensor first
    out = _exp(part)
    torch.testing.assert_close(out, part.exp(), atol=0, rtol=0)
    out.sum().backward()
    expected = torch.zeros_like(base)
    expected[:, 1:3] = part.detach().exp()
    torch.testing.assert_close(base.grad, expected, atol=0, rtol=0)
    dense = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(_exp(dense), dense.exp(), atol=0, rtol=0)


def test_exp_copies_a_strided_slice_on_the_cpu_only():
    """The dense copy is a CPU measure: off the CPU (here the meta device, which runs no kernel but dispatches the
    same operations as a GPU would) ``exp`` reads the slice directly, one operation instead of two."""
    from monai_condflow.networks.blocks.coupling import _exp
    from tests.benchmarks.script import load_benchmark

    counter_cls = load_benchmark("bench_step_ops").OpCounter
    for device, expected in (("cpu", {"clone": 1, "exp_": 1}), ("meta", {"exp": 1})):
        part = torch.empty(2, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)[:, 1:3]
        counter = counter_cls()
        with counter:
            out = _exp(part)
        assert counter.by_name == expected, device
        assert out.shape == part.shape and out.device.type == device


def test_coupling_keeps_channels_last_gradients():
    layer = perturb(ConditionalAffineCoupling(2, 4, COND, 8), 0.3)
    leaf = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = leaf * 1.0  # a non-leaf: the hook sees the gradient as the coupling's backward produced it
    grads = []
    x.register_hook(grads.append)
    y, logdet = layer(x, torch.randn(2, COND))
    assert y.is_contiguous(memory_format=torch.channels_last)
    (y.square().sum() + logdet.sum()).backward()
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["actnorm", "invconv", "coupling", "coupling_odd", "coupling3d", "step"])
def test_inverse_without_autograd_is_bit_identical(name):
    """The no-grad inverse (sampling: ``-log s`` from the bounding pass, in-place products, triangular-solve
    ``W^{-1}``) gives exactly the values of the autograd path, channels-last (the model's layout) and contiguous."""
    layer, x, cond = _setup(name)
    layer = layer.float()
    x = x.float()
    cond = None if cond is None else cond.float()
    y = layer(x, cond)[0].detach()
    if y.ndim == 4:
        y = y.contiguous(memory_format=torch.channels_last)
    for inp in (y, y.contiguous()):
        x_grad, ld_grad = layer.inverse(inp, cond)
        with torch.no_grad():
            x_nograd, ld_nograd = layer.inverse(inp, cond)
        with torch.inference_mode():
            x_inf, ld_inf = layer.inverse(inp, cond)
        for got, ld in ((x_nograd, ld_nograd), (x_inf, ld_inf)):
            assert torch.equal(got, x_grad.detach()) and torch.equal(ld, ld_grad.detach())


def test_invconv_under_autocast_composes_in_full_precision_and_cache_stays_fp32():
    layer = perturb(InvertibleConv1x1(2, 8), 0.5)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        reference, _ = layer(x)  # fp32, fills the cache
        layer.load_state_dict(layer.state_dict())  # same values, new cache key
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16, _ = layer(x)  # fills the cache under autocast
            weight, inverse = layer.weights()
        assert weight.dtype == inverse.dtype == torch.float32
        torch.testing.assert_close(weight @ inverse, torch.eye(8), atol=1e-5, rtol=0)
        assert y_bf16.dtype == torch.bfloat16  # autocast still runs the convolution in bf16
        torch.testing.assert_close(y_bf16.float(), reference, atol=0.1, rtol=0.05)
        y, _ = layer(x)  # fp32 again, from the cache filled under autocast: exact
    assert y.dtype == torch.float32
    assert torch.equal(y, reference)


def test_invconv_triangular_inverse_matches_linalg_inv():
    layer = perturb(InvertibleConv1x1(2, 8), 0.5)
    with torch.no_grad():
        weight, inverse = layer.weights()
        reference = torch.linalg.inv(layer._compose(torch.float64)).float()
    torch.testing.assert_close(inverse, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weight @ inverse, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 8, 16])
def test_invconv_weights_composed_together_equal_their_own_with_the_same_gradients(channels):
    """compose_weights: one batched composition per size gives each convolution's own W (to float32 rounding of the
    batched products) and the same gradients of its LU parameters."""
    convs = [perturb(InvertibleConv1x1(2, channels), 0.3) for _ in range(4)]
    probes = [torch.randn(channels, channels) for _ in convs]
    together = compose_weights(convs)
    assert len(together) == 4 and all(w.shape == (channels, channels) for w in together)
    sum((w * r).sum() for w, r in zip(together, probes)).backward()
    grads = [[p.grad.clone() for p in c.parameters()] for c in convs]
    for c in convs:
        c.zero_grad(set_to_none=True)
    own = [c._compose() for c in convs]
    sum((w * r).sum() for w, r in zip(own, probes)).backward()
    for w, o, c, g in zip(together, own, convs, grads):
        torch.testing.assert_close(w, o, rtol=1e-6, atol=1e-6)
        for a, p in zip(g, c.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_invconv_forward_uses_the_weight_composed_together_only_with_autograd(monkeypatch):
    """Inside composed_together a training forward takes its group's W instead of composing its own (a group of one
    composes alone); without autograd the cached weights serve as before; outside, each composes its own."""
    convs = [perturb(InvertibleConv1x1(2, 4), 0.3) for _ in range(3)]
    alone = perturb(InvertibleConv1x1(2, 6), 0.3)
    x, x6 = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    reference = [c(x)[0] for c in convs]
    composed = []
    original = InvertibleConv1x1._compose
    monkeypatch.setattr(InvertibleConv1x1, "_compose", lambda self, *a: composed.append(self) or original(self, *a))
    with composed_together([convs, [alone]]):
        outputs = [c(x)[0] for c in convs]
        assert composed == []  # the three 4-channel convolutions took their group's weights
        alone(x6)
        assert composed == [alone]
        with torch.no_grad():
            for c in convs:
                c(x)
        assert composed[1:] == convs  # no autograd: each fills its cache (composed once), as outside the block
    for c in convs:
        c(x)
    assert composed[4:] == convs  # outside the block each composes its own again
    for y, r in zip(outputs, reference):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)


def test_spatial_top_prior_places_the_mean_per_entry_and_checks_the_size():
    """per-entry prior: the standardised latent of x = mu(z) is zero everywhere, though mu varies over space."""
    layer = ConditionalTopPrior(2, 2, COND, spatial_shape=(2, 3)).double()
    cond = torch.randn(3, COND, dtype=torch.float64)
    perturb(layer, 0.5)
    mean, log_std = layer._prior(torch.zeros(3, 2, 2, 3, dtype=torch.float64), cond)
    assert mean.shape == (3, 2, 2, 3) and mean.flatten(2).std(2).min() > 1e-3  # not constant over space
    eps, logdet = layer(mean, cond)
    assert eps.abs().max() < 1e-12
    torch.testing.assert_close(logdet, -log_std.flatten(1).sum(1))
    empty = layer(torch.zeros(0, 2, 2, 3, dtype=torch.float64), torch.zeros(0, COND, dtype=torch.float64))
    assert empty[0].shape == (0, 2, 2, 3) and empty[1].shape == (0,)  # an empty batch is not an error
    with pytest.raises(ValueError, match=r"spatial size \[2, 3\] got \[3, 2\]"):
        layer(torch.zeros(3, 2, 3, 2, dtype=torch.float64), cond)
    with pytest.raises(ValueError, match="spatial_shape needs 2 sizes"):
        ConditionalTopPrior(2, 2, COND, spatial_shape=(4,))


def test_sum_of_deferred_logdets_against_hand_values():
    """positions * sum(parameter), summed: (1 + 2 + 3) * 4 + 0.5 * 2 = 25, gradient = positions per entry."""
    a, b, c = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True), torch.tensor(
        [[0.5]], requires_grad=True
    )
    total = sum_deferred_logdets([(a, 4), (b, 4), (c, 2)])
    assert total.ndim == 0 and total.item() == 25.0
    total.backward()
    assert a.grad.tolist() == [4.0, 4.0] and b.grad.tolist() == [4.0] and c.grad.tolist() == [[2.0]]
    assert sum_deferred_logdets([]) is None


def test_constant_logdets_are_left_to_the_enclosing_pass_and_sum_to_the_same():
    """Inside deferring_constant_logdets, ActNorm and the 1x1 convolution return None and leave (parameter,
    positions): the chain's output is unchanged, its log-det holds only the data-dependent layers (here none: zeros),
    and the deferred sum equals their log-dets; outside, while recording per-position maps, and in the inverse,
    every layer returns its own."""
    chain = FlowSequential(perturb(ActNorm(2, 4), 0.3), perturb(InvertibleConv1x1(2, 4), 0.3))
    x = torch.randn(3, 4, 8, 6)
    y, logdet = chain(x)
    with deferring_constant_logdets() as deferred:
        y_d, logdet_d = chain(x)
        assert chain.layers[0](x)[1] is None and chain.layers[1](x)[1] is None
        with recording_logdet_maps():
            assert chain(x)[1].shape == (3,) and chain.layers[0](x)[1] is not None
        _, inv_logdet = chain.inverse(y)
    assert torch.equal(y_d, y) and torch.equal(logdet_d, torch.zeros(3))
    assert [(p is chain.layers[0].log_scale, n) for p, n in deferred[:2]] == [(True, 48), (False, 48)]
    assert deferred[1][0] is chain.layers[1].log_abs_s and len(deferred) == 4  # the chain and the two direct calls
    torch.testing.assert_close(sum_deferred_logdets(deferred[:2]).expand(3), logdet, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-6, atol=1e-6)
    # with a data-dependent layer in the chain, its log-det alone is returned
    step = perturb(ConditionalFlowStep(2, 4, COND, 8), 0.3)
    cond = torch.randn(3, COND)
    _, full = step(x, cond)
    with deferring_constant_logdets() as deferred:
        _, coupling_only = step(x, cond)
    torch.testing.assert_close(coupling_only + sum_deferred_logdets(deferred), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(coupling_only, full)
