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
"""Tests of ConditionalGlow: round trips (R10), log-likelihood (R11), ActNorm init persistence (R12), sampling (R13)."""

from __future__ import annotations

import copy
import io
import math
import shutil

import pytest
import torch
from torch import nn

from monai_condflow.networks.blocks import ActNorm, InvertibleConv1x1
from monai_condflow.networks.blocks.flow_sequential import deferring_constant_logdets
from monai_condflow.networks.blocks.squeeze import conv_weights_to
from monai_condflow.networks.nets import ConditionalGlow
from tests.benchmarks.script import load_benchmark

COND = 4


@torch.no_grad()
def perturb(module: nn.Module, scale: float) -> nn.Module:
    """Add noise of std ``scale / sqrt(fan_in)`` to every parameter (zero-initialised convs included).

    Fan-in scaling keeps the noise comparable across widths (24 ... 512); at ``scale = 0.05`` the paper preset maps
    images to latents of magnitude 12-23 (far from the identity; six seeds), at ``scale = 0.1`` to 60 for some
    draws and 1e4-1e6 for others, and at ``scale >= 1`` a 64-step flow overflows in fp32.
    """
    for p in module.parameters():
        fan_in = p[0].numel() if p.ndim >= 2 else 1
        p.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device) * scale / fan_in**0.5)
    return module


def tiny(**overrides) -> ConditionalGlow:
    kwargs = dict(num_levels=3, image_size=8, num_steps=1, num_blocks=(1, 1, 1), hidden_channels=8, condition_dim=COND)
    return ConditionalGlow(**{**kwargs, **overrides})


def images(batch: int, size: int, channels: int = 1) -> torch.Tensor:
    """Smooth-ish images in [0, 1] (not pure noise, so ActNorm statistics are realistic)."""
    x = torch.rand(batch, channels, size // 4, size // 4)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(batch, channels, size, size)).clamp(0, 1)


def conditions(batch: int, dim: int = COND) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(batch, dim), dim=1)


@pytest.mark.parametrize("squeeze", ["pixel", "haar"])
def test_log_prob_matches_change_of_variables(squeeze):
    model = tiny(squeeze=squeeze).double()
    x, z = images(2, 8).double(), conditions(2).double()
    model.initialize(x, z)
    perturb(model, 0.3)
    nu, logdet = model(x, z)
    log_prob = model.log_prob(x, z)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: model(v.view(1, 1, 8, 8), z[b : b + 1])[0][0], x[b])
        brute_logdet = torch.linalg.slogdet(jac.reshape(64, 64))[1]
        torch.testing.assert_close(logdet[b], brute_logdet, atol=1e-8, rtol=1e-8)
        log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(nu[b]).sum()
        torch.testing.assert_close(log_prob[b], log_normal + brute_logdet, atol=1e-8, rtol=1e-8)
    bpd = model.bits_per_dim(x, z, n_bits=8)
    torch.testing.assert_close(bpd, -log_prob / (64 * math.log(2)) + 8)


# the perturbation per preset: far from the identity (latents of magnitude ~10-20) and still a flow that fp32 inverts
# whatever the seed; at 0.1 the 64-step paper preset maps some draws to latents of 1e4-1e6 and overflows on the way
# back (3 of 6 seeds), a broken model rather than a test of the inverse
@pytest.mark.parametrize("preset,scale", [("small", 0.1), ("paper", 0.05)])
def test_round_trip_fp32_with_perturbed_weights(preset, scale):
    model = ConditionalGlow.from_preset(preset)
    x, z = images(2, 64), conditions(2, 32)
    model.initialize(x, z)
    perturb(model, scale)
    nu, logdet = model(x, z)
    assert nu.shape == (2, 64 * 64) and logdet.shape == (2,)
    with torch.no_grad():
        x_rec, logdet_inv = model.inverse(nu, z)
        lat = model.encode(x, z)
        x_dec = model.decode(lat, z)
    err = (x_rec - x).abs().max().item()
    assert err < 1e-4, err
    assert (x_dec - x).abs().max().item() < 1e-4
    torch.testing.assert_close(torch.cat([t.flatten(1) for t in lat], 1), nu.detach())
    torch.testing.assert_close(logdet_inv, -logdet.detach(), rtol=1e-4, atol=1e-2)
    # the perturbation really made the flow far from the identity
    assert (nu.detach() - (x - 0.5).flatten(1)).abs().max() > 5.0


def test_paper_preset_layout():
    model = ConditionalGlow.from_preset("paper")
    with torch.no_grad():  # uninitialised: evaluation only
        shapes = [tuple(t.shape[1:]) for t in model.encode(images(1, 64), conditions(1, 32))]
    assert shapes == [(4, 16, 16)] * 3 + [(4, 8, 8)] * 3 + [(16, 4, 4)]
    n_steps = sum(isinstance(m, ActNorm) for m in model.modules())
    assert n_steps == 8 + 3 * 8 + 3 * 8 + 8
    assert model.config["hidden_channels"] == [24, 512, 512, 512]


def test_state_dict_round_trip_keeps_init():
    model = tiny()
    x, z = images(4, 8), conditions(4)
    assert not model.is_initialized
    assert model.initialize(x, z) is True
    assert model.is_initialized
    perturb(model, 0.3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh = tiny()
    assert not fresh.is_initialized
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.is_initialized
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert fresh.initialize(images(4, 8) * 0.3, z) is False  # not re-run after a reload
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    torch.testing.assert_close(fresh(x, z), model(x, z), rtol=0, atol=0)
    fresh.train()
    fresh.log_prob(x, z).mean().backward()  # training is allowed
    assert fresh.initialize(x, z, force=True) is True


def test_uninitialised_training_is_refused_but_eval_works():
    model = tiny()
    x, z = images(2, 8), conditions(2)
    with pytest.raises(RuntimeError, match="initialize"):
        model.log_prob(x, z)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(x, z)).all()
        assert model.sample(z).shape == (2, 1, 8, 8)
    model.eval()
    model(x, z)
    model.train()
    model.mark_initialized()
    assert model.is_initialized
    model.log_prob(x, z).sum().backward()
    # loading an uninitialised state dict makes the model refuse training again
    model.load_state_dict(tiny().state_dict())
    with pytest.raises(RuntimeError, match="initialize"):
        model(x, z)


def test_condition_changes_decode_and_sample():
    model = tiny()
    x, z = images(2, 8), conditions(2)
    model.initialize(x, z)
    perturb(model, 0.3)
    nu = torch.randn(1, 64).expand(2, 64)
    with torch.no_grad():
        out = model.inverse(nu, z)[0]
        assert (out[0] - out[1]).abs().max() > 1e-3
        z_same = z[:1].expand(2, COND)
        same = model.inverse(nu, z_same)[0]
        torch.testing.assert_close(same[0], same[1])
    s1 = model.sample(z, generator=torch.Generator().manual_seed(0), temperature=0.0)
    assert (s1[0] - s1[1]).abs().max() > 1e-3


@pytest.mark.parametrize("strength", [0.0, 0.1, 3.0])
def test_sampling_finite_and_in_range(strength):
    model = ConditionalGlow.from_preset("small")
    x, z = images(4, 64), conditions(4, 32)
    model.initialize(x, z)
    perturb(model, strength)
    for temperature in (0.0, 0.7, 1.0):
        s = model.sample(z, temperature=temperature, generator=torch.Generator().manual_seed(1))
        assert s.shape == (4, 1, 64, 64) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    a = model.sample(z, generator=torch.Generator().manual_seed(7))
    b = model.sample(z, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_cached_inverse_invalidated_by_optimizer_step():
    model = tiny()
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.no_grad():  # fills the 1x1 convs' inverse caches
            nu = model(x, z)[0]
            assert (model.inverse(nu, z)[0] - x).abs().max() < 1e-5
        opt.zero_grad()
        (-model.log_prob(x, z).mean()).backward()
        opt.step()
    nu = model(x, z)[0]
    with torch.no_grad():
        assert (model.inverse(nu, z)[0] - x).abs().max() < 1e-5


def test_sample_returns_ordinary_tensor_and_inference_cache_does_not_leak_into_training():
    """``sample`` decodes under inference mode; its output and the 1x1 convs' cached inverses must not break a
    later no-grad forward, a training step, or an in-place edit of the samples."""
    model = tiny()
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    s = model.sample(z, generator=torch.Generator().manual_seed(0))
    assert not s.is_inference()
    s.mul_(1.0)  # in-place on the output is allowed outside inference mode
    with torch.no_grad():  # reuses the caches filled inside inference mode
        nu = model(x, z)[0]
        assert (model.inverse(nu, z)[0] - x).abs().max() < 1e-5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (-model.log_prob(x, z).mean()).backward()
    opt.step()
    nu = model(x, z)[0]
    with torch.no_grad():
        assert (model.inverse(nu, z)[0] - x).abs().max() < 1e-5
    with torch.inference_mode():
        assert model.sample(z).is_inference()


def test_memory_format_of_input_does_not_change_results():
    """The flow runs channels-last internally; a channels-last or contiguous input gives the same latents."""
    model = tiny(hidden_channels=16)
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    with torch.no_grad():
        nu, ld = model(x, z)
        nu_cl, ld_cl = model(x.contiguous(memory_format=torch.channels_last), z)
        assert torch.allclose(nu, nu_cl, atol=1e-6) and torch.allclose(ld, ld_cl, atol=1e-4)
        assert nu.is_contiguous()
        back = model.inverse(nu, z)[0]
    assert back.shape == x.shape and back.is_contiguous()
    assert (back - x).abs().max() < 1e-4


def test_convolution_weights_are_channels_last_and_change_no_value():
    """2-D flows keep their convolution weights in the activations' (channels-last) layout: the same loss and
    gradients bit for bit as contiguous weights, gradients in the weights' layout (no copy back), the layout kept
    through a dtype move and a state dict from contiguous weights, and 3-D flows untouched."""
    model = tiny(hidden_channels=16)
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[2:].numel() > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(m.weight.is_contiguous() for m in convs)

    def loss_and_grads(module):
        module.zero_grad(set_to_none=True)
        loss = module.bits_per_dim(x, z).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}

    loss_cl, grads_cl = loss_and_grads(model)
    assert all(m.weight.grad.is_contiguous(memory_format=torch.channels_last) for m in convs)
    contiguous = tiny(hidden_channels=16)
    assert conv_weights_to(contiguous, torch.contiguous_format) == len(convs)
    contiguous.load_state_dict(model.state_dict())
    loss_c, grads_c = loss_and_grads(contiguous)
    assert torch.equal(loss_cl, loss_c)
    assert all(torch.equal(grads_cl[n], grads_c[n]) for n in grads_cl)
    # a state dict saved from contiguous weights (an older checkpoint) loads into the channels-last layout
    fresh = tiny(hidden_channels=16)
    fresh.load_state_dict({k: v.contiguous() for k, v in contiguous.state_dict().items()})
    fresh_convs = [m for m in fresh.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[2:].numel() > 1]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in fresh_convs)
    assert torch.equal(fresh.bits_per_dim(x, z), model.bits_per_dim(x, z))
    double = tiny(hidden_channels=16).double()
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in double.modules()
        if isinstance(m, nn.Conv2d) and m.weight.shape[2:].numel() > 1
    )
    volume = ConditionalGlow(
        spatial_dims=3, condition_dim=COND, num_levels=2, image_size=4, num_steps=1, hidden_channels=4
    )
    conv3d = [m for m in volume.modules() if isinstance(m, nn.Conv3d)]
    assert conv3d and all(m.weight.is_contiguous() for m in conv3d)


def test_gradients_reach_every_parameter():
    model = tiny()
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    model.bits_per_dim(x, z).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("squeeze", ["pixel", "haar"])
def test_three_dimensional_round_trip(squeeze):
    model = ConditionalGlow(
        spatial_dims=3, in_channels=1, condition_dim=COND, num_levels=2, image_size=4, num_steps=1, hidden_channels=4,
        squeeze=squeeze,
    )  # fmt: skip
    x, z = torch.rand(2, 1, 4, 4, 4), conditions(2)
    model.initialize(x, z)
    perturb(model, 0.3)
    nu, _ = model(x, z)
    with torch.no_grad():
        assert (model.inverse(nu, z)[0] - x).abs().max() < 1e-4
    assert model.sample(z).shape == (2, 1, 4, 4, 4)


def test_clear_errors():
    model = tiny()
    z = conditions(2)
    with pytest.raises(ValueError, match=r"\[12, 12\].*2\*\*num_levels = 8"):
        model(torch.rand(2, 1, 12, 12), z)
    with pytest.raises(ValueError, match=r"\[B, 1, \*spatial\].*\[2, 3, 8, 8\]"):
        model(torch.rand(2, 3, 8, 8), z)
    with pytest.raises(ValueError, match=r"\[2, 4\].*\[2, 5\]"):
        model(torch.rand(2, 1, 8, 8), conditions(2, 5))
    with pytest.raises(ValueError, match=r"\[2, 4\].*\[3, 4\]"):
        model(torch.rand(2, 1, 8, 8), conditions(3))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), z)
    with pytest.raises(ValueError, match=r"\[B, 64\].*\[2, 63\]"):
        model.inverse(torch.randn(2, 63), z)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(z, temperature=-1.0)
    with pytest.raises(ValueError, match="unknown ConditionalGlow preset 'huge'"):
        ConditionalGlow.from_preset("huge")
    with pytest.raises(ValueError, match=r"image_size \[60, 60\].*16"):
        ConditionalGlow.from_preset("paper", image_size=60)
    with pytest.raises(ValueError, match="one value per level"):
        tiny(hidden_channels=(8, 8))
    with pytest.raises(ValueError, match="at least one"):
        tiny(num_blocks=(1, 4, 1))
    with pytest.raises(ValueError, match=r"squeeze must be one of \['haar', 'pixel'\], got 'wavelet'"):
        tiny(squeeze="wavelet")


def test_haar_squeeze_option_changes_the_bijection_and_is_persisted():
    torch.manual_seed(0)
    x, z = images(3, 8), conditions(3)
    pixel, haar = tiny(), tiny(squeeze="haar")
    haar.load_state_dict(pixel.state_dict())  # same weights: only the squeezes differ (they hold no state)
    for m in (pixel, haar):
        m.initialize(x, z)
    # level 0 sees the block mean and three details instead of four interleaved copies of the image
    assert not torch.allclose(haar(x, z)[0], pixel(x, z)[0], atol=1e-3)
    rebuilt = ConditionalGlow(**haar.config)
    rebuilt.load_state_dict(haar.state_dict())
    assert haar.config["squeeze"] == "haar" and "signs" not in haar.state_dict()
    torch.testing.assert_close(rebuilt.log_prob(x, z), haar.log_prob(x, z))


def test_pixel_norm_option_is_exact_and_persisted():
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=2, num_blocks=1, hidden_channels=8, pixel_norm=True
    ).double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.randn(6, 32, dtype=torch.float64), dim=1)
    assert not flow.is_initialized
    flow.initialize(x, z)
    assert flow.is_initialized and bool(flow.pixel_norm.initialized)
    nu, logdet = flow(x, z)
    back, inv_logdet = flow.inverse(nu, z)
    assert torch.allclose(back, x, atol=1e-10) and torch.allclose(inv_logdet, -logdet, atol=1e-8)
    # the per-pixel statistics contribute their log-det: removing them changes log_prob by exactly that amount
    pn_logdet = -flow.pixel_norm.log_std.sum()
    assert torch.allclose(logdet - flow.pixel_norm(x - 0.5)[1], logdet - pn_logdet)
    other = ConditionalGlow(**flow.config).double()
    other.load_state_dict(flow.state_dict())
    assert other.is_initialized and torch.equal(other(x, z)[0], nu)
    with pytest.raises(ValueError, match="PixelNorm|PixelSpline"):
        flow.sample(z, spatial_size=(32, 32))


def test_pixel_spline_option_is_exact_learnable_and_persisted():
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset(
        "small", image_size=16, num_levels=2, num_steps=2, num_blocks=1, hidden_channels=8, pixel_spline_bins=4
    ).double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.randn(6, 32, dtype=torch.float64), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        for p in flow.pixel_spline.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device))
    nu, logdet = flow(x, z)
    back, inv_logdet = flow.inverse(nu, z)
    assert torch.allclose(back, x, atol=1e-9) and torch.allclose(inv_logdet, -logdet, atol=1e-7)
    # the spline's log-det is part of log p(x | z): dropping the layer changes the log-det by exactly its share
    h = flow.pixel_norm(x - 0.5)[0]
    assert not torch.allclose(flow.pixel_spline(h, z)[1], torch.zeros(6, dtype=torch.float64))
    flow.log_prob(x, z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.pixel_spline.parameters())
    other = ConditionalGlow(**flow.config).double()
    other.load_state_dict(flow.state_dict())
    assert other.config["pixel_spline_bins"] == 4 and torch.equal(other(x, z)[0], nu)
    with pytest.raises(ValueError, match="pixel_spline_bins"):
        ConditionalGlow.from_preset("small", pixel_spline_bins=1)


def test_sample_equals_decode_of_the_same_latents():
    """``sample`` (no-grad inverse, inference mode) returns exactly the decode of the latents it draws."""
    model = tiny()
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    s = model.sample(z, temperature=0.8, generator=torch.Generator().manual_seed(3))
    nu = torch.randn(4, model.latent_dim(), generator=torch.Generator().manual_seed(3)) * 0.8
    decoded = model.inverse(nu, z)[0]  # autograd on: the other code path
    assert (s - decoded.detach().clamp(0.0, 1.0)).abs().max() < 1e-5


def test_bf16_autocast_sampling_then_full_precision_is_unchanged():
    """Mixed precision is opt-in per call: sampling under bf16 autocast must not change later fp32 results
    (the 1x1 convs' cached matrices are composed in fp32 even under autocast)."""
    model = tiny()
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    perturb(model, 0.3)
    model.eval()
    with torch.no_grad():
        reference = model.log_prob(x, z)
        model.load_state_dict(model.state_dict())  # new parameter tensors: the caches refill below
        with torch.autocast("cpu", dtype=torch.bfloat16):
            samples = model.sample(z, temperature=0.9)
            nu, _ = model(x, z)
            x_rec, _ = model.inverse(nu, z)
        assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
        assert (x_rec.float() - x).abs().max() < 0.2  # bf16 round trip: coarse but not broken
        after = model.log_prob(x, z)
    torch.testing.assert_close(after, reference, atol=1e-4, rtol=1e-6)


def test_sample_latents_follow_the_generator_device():
    """A seeded CPU generator gives the same latents whatever the model's device (evaluation seeds a CPU one)."""
    model = tiny()
    model.initialize(images(2, 8), conditions(2))
    model.eval()
    z = conditions(3)
    a = model.sample(z, 0.9, generator=torch.Generator().manual_seed(7))
    b = model.sample(z, 0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    if torch.cuda.is_available():  # the device path itself (CI has no GPU; run on one to check it)
        on_gpu = model.to("cuda").sample(z.cuda(), 0.9, generator=torch.Generator().manual_seed(7))
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), a, atol=1e-4, rtol=0)


def test_compile_sampling_is_opt_in_and_matches_eager():
    """``compile_sampling`` (off by default) decodes with torch.compile; same samples as eager up to fp32 rounding,
    and still right after an optimiser step (the compiled code reads the current weights)."""
    pytest.importorskip("torch._inductor")
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    model = ConditionalGlow(num_levels=2, image_size=8, num_steps=1, num_blocks=(1, 1), hidden_channels=8,
                            condition_dim=COND)  # fmt: skip
    x, z = images(2, 8), conditions(2)
    model.initialize(x, z)
    perturb(model, 0.3)
    assert model._compiled_inverse is None
    eager = model.sample(z, generator=torch.Generator().manual_seed(5))
    compiled = model.compile_sampling().sample(z, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(eager, model.sample(z, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (-model.log_prob(x, z).mean()).backward()
    opt.step()
    before = compiled
    compiled = model.sample(z, generator=torch.Generator().manual_seed(5))
    assert (compiled - before).abs().max() > 1e-4  # the step changed the weights, and the compiled code saw it
    eager = model.compile_sampling(False).sample(z, generator=torch.Generator().manual_seed(5))
    assert model._compiled_inverse is None
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_spatial_top_prior_flow_is_exact_and_fixes_the_image_size():
    """``spatial_top_prior``: brute-force log-det and round trip hold, the prior has one mean per top-latent entry
    (16 px, 3 levels: a 48 x 2 x 2 top latent), and other sizes are refused."""
    model = tiny(image_size=16, spatial_top_prior=True).double()
    top = model.levels[-1][-1]
    assert top.spatial_shape == (2, 2) and top.proj.out_features == 2 * 48 * 4
    x, z = images(2, 16).double(), conditions(2).double()
    model.initialize(x, z)
    perturb(model, 0.3)
    nu, logdet = model(x, z)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 16, 16), z[:1])[0][0], x[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac.reshape(256, 256))[1], atol=1e-8, rtol=1e-8)
    back, inv_logdet = model.inverse(nu, z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-8, rtol=1e-8)
    assert model.config["spatial_top_prior"] is True
    with pytest.raises(ValueError, match="spatial size"):
        model(images(2, 32).double(), z)


def _training_pass(model: ConditionalGlow, together, x, z) -> tuple[int, torch.Tensor, list]:
    """Operations of one training pass (forward and backward), the loss and the gradients."""
    model.compose_convs_together = together
    model.zero_grad(set_to_none=True)
    counter = load_benchmark("bench_step_ops").OpCounter()
    with counter:
        loss = -model.log_prob(x, z).mean()
        loss.backward()
    return counter.count, loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_composing_the_convolutions_together_gives_the_same_pass_with_fewer_operations(monkeypatch):
    """``compose_convs_together``: the training pass composes the 1x1 convolutions' weights in one batch per size
    (on a GPU by default): same loss and gradients (to float32 rounding), ~10 operations fewer per convolution
    beyond the first of its size, forward and backward together. On the CPU the default composes them one by one
    (bit for bit as before), and compiled steps compose their own."""
    torch.manual_seed(0)
    model = perturb(tiny(num_steps=3, hidden_channels=8), 0.3)
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    n_convs = sum(len(g) for g in model._conv_groups)
    assert n_convs == 9 and len(model._conv_groups) == 3  # three levels of 4, 16 and 48 channels
    alone, loss_alone, grads_alone = _training_pass(model, False, x, z)
    together, loss_together, grads_together = _training_pass(model, True, x, z)
    torch.testing.assert_close(loss_together, loss_alone, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_together, grads_alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert alone - together >= 10 * (n_convs - len(model._conv_groups))
    default, loss_default, _ = _training_pass(model, None, x, z)
    assert default == alone and torch.equal(loss_default, loss_alone)  # CPU default: one by one, bit for bit
    monkeypatch.setattr("monai_condflow.networks.nets.conditional_glow.compiles_training", lambda step: True)
    assert _training_pass(model, True, x, z)[0] == alone  # compiled steps compose their own


def test_batching_the_constant_logdets_gives_the_same_pass_with_fewer_operations():
    """``batch_constant_logdets``: the pass sums ActNorm's and the 1x1 convolutions' log-determinants once per level
    (on a GPU by default): the loss to float32 summation order, the same gradients, >= 4 operations fewer per such
    layer, forward and backward. The exact log-det still matches a brute-force Jacobian (float64); the per-pixel map
    still sums to log p; the ActNorm initialisation is unchanged; the CPU default is per layer, bit for bit."""
    torch.manual_seed(0)
    model = perturb(tiny(num_steps=3, hidden_channels=8), 0.3)
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    layers = sum(isinstance(m, (ActNorm, InvertibleConv1x1)) for m in model.modules())
    assert layers == 2 * 9
    counts, losses, grads = {}, {}, {}
    for batched in (False, True, None):
        model.batch_constant_logdets = batched
        counts[batched], losses[batched], grads[batched] = _training_pass(model, False, x, z)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert counts[False] - counts[True] >= 4 * layers
    assert counts[None] == counts[False] and torch.equal(losses[None], losses[False])  # CPU default: per layer
    model.batch_constant_logdets = True
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob_map(x, z).flatten(1).sum(1), model.log_prob(x, z), rtol=1e-5,
                                   atol=1e-3)  # fmt: skip
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.initialize(x, z, force=True)
        reference = copy.deepcopy(model)
        reference.load_state_dict(state)
        reference.batch_constant_logdets = False
        reference.initialize(x, z, force=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    # a pass traced whole by torch.compile (one graph: no context entered while tracing) keeps the layers' own sums
    torch._dynamo.reset()
    traced = torch.compile(model.log_prob, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(x, z), model.log_prob(x, z), rtol=1e-5, atol=1e-3)
    double = model.double()
    xd, zd = x[:1].double(), z[:1].double()
    nu, logdet = double(xd, zd)
    jac = torch.autograd.functional.jacobian(lambda v: double(v.view(1, 1, 8, 8), zd)[0][0], xd[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac.reshape(64, 64))[1], atol=1e-8, rtol=1e-8)


def test_a_pass_that_does_not_batch_its_constant_logdets_shields_them_from_a_callers_block():
    """A caller's deferring_constant_logdets block around a pass (or an initialisation, or level_log_probs) that
    does not add the deferred sum itself: its layers return their own log-determinants, so nothing leaks into the
    caller's list and log p is unchanged; a pass that batches uses its own list."""
    torch.manual_seed(0)
    model = perturb(tiny(num_steps=2, hidden_channels=8), 0.3)
    x, z = images(4, 8), conditions(4)
    model.initialize(x, z)
    with torch.no_grad():
        expected, levels = model.log_prob(x, z), model.level_log_probs(x, z)
        for batched in (False, True):
            model.batch_constant_logdets = batched
            with deferring_constant_logdets() as outer:
                got, got_levels = model.log_prob(x, z), model.level_log_probs(x, z)
                model.initialize(x, z, force=True)
            assert outer == [], batched
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
            torch.testing.assert_close(got_levels, levels, rtol=1e-6, atol=1e-4)
