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
"""benchmarks/proto_latent_flow.py: the sharp autoencoder's losses and noise, the latent probe and the latent
Gaussian against hand-computed values, the two-stage refiner's exactness, and tiny seeds end to end."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def proto():
    return load_benchmark("proto_latent_flow")


def test_gradient_l1_by_hand(proto):
    ramp = torch.arange(4.0).repeat(4, 1).view(1, 1, 4, 4)  # every row 0 1 2 3: dx = 1, dy = 0
    assert float(proto.gradient_l1(ramp, torch.zeros_like(ramp))) == pytest.approx(1.0)
    assert float(proto.gradient_l1(ramp, ramp + 5.0)) == 0.0  # an offset has the same gradients
    steep = 3.0 * ramp.transpose(-1, -2)  # dy = 3, dx = 0
    assert float(proto.gradient_l1(steep, ramp)) == pytest.approx(3.0 + 1.0)


def test_sharp_autoencoder_shapes_and_decoder_noise(proto):
    torch.manual_seed(0)
    ae = proto.SharpAutoencoder(latent_channels=4).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        latent = ae.encode(x)
        assert latent.shape == (3, 4, 16, 16)
        a = ae.decode(latent, torch.Generator().manual_seed(1))
        b = ae.decode(latent, torch.Generator().manual_seed(1))
        c = ae.decode(latent, torch.Generator().manual_seed(2))
    assert a.shape == (3, 1, 64, 64)
    torch.testing.assert_close(a, b)  # the texture noise comes from the generator given
    assert not torch.allclose(a, c)  # and the decoder uses it


@pytest.mark.parametrize("mean, log_var", [(0.0, 0.0), (0.5, -1.0), (-2.0, 1.5)])
def test_vae_kl_and_draws_by_hand(proto, mean, log_var):
    ae = proto.SharpAutoencoder(latent_channels=2, vae=True)
    head = ae.enc[-1]
    with torch.no_grad():  # a constant posterior: mean and log-variance come from the head's bias alone
        head.weight.zero_()
        head.bias.copy_(torch.tensor([mean, mean, log_var, log_var]))
    x = torch.rand(64, 1, 64, 64)
    with torch.no_grad():
        draw, kl = ae.encode_noisy(x, torch.Generator().manual_seed(0))
        torch.testing.assert_close(ae.encode(x), torch.full((64, 2, 16, 16), mean))
    expected = 0.5 * (mean**2 + torch.exp(torch.tensor(log_var)) - 1.0 - log_var)
    assert float(kl) == pytest.approx(float(expected), abs=1e-6)
    std = float(torch.exp(torch.tensor(0.5 * log_var)))
    assert float(draw.mean()) == pytest.approx(mean, abs=5 * std / draw.numel() ** 0.5)  # 5 standard errors
    assert float(draw.std()) == pytest.approx(std, rel=0.03)


def test_deterministic_autoencoder_adds_fixed_latent_noise(proto):
    torch.manual_seed(0)
    ae = proto.SharpAutoencoder(latent_channels=4)
    x = torch.rand(32, 1, 64, 64)
    with torch.no_grad():
        draw, reg = ae.encode_noisy(x, torch.Generator().manual_seed(0))
        clean = ae.encode(x)
    assert float((draw - clean).std()) == pytest.approx(0.1, rel=0.05)
    assert float(reg) == pytest.approx(float(clean.pow(2).mean()), rel=1e-5)


def test_latent_probe_stays_within_each_class(proto):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 50)
    direction = torch.randn(2 * 4 * 4, generator=g)
    direction /= direction.norm()
    coeff = torch.rand(90, 1, generator=g)  # class 0 on the segment [0, 1] x direction; class 1 shifted by 10
    latents = (coeff * direction + 10.0 * labels[:, None].float() * torch.ones(32) / 32**0.5).view(90, 2, 4, 4)
    probes = proto.probe_latents(latents, labels, torch.Generator().manual_seed(1))
    assert set(probes) == {"midpoint", "pca32"}
    for c in (0, 1):
        member = labels == c
        base = latents[member].flatten(1).mean(0)
        mid = probes["midpoint"][member].flatten(1)
        # a midpoint of two class members: on the class's segment, between its smallest and largest coefficient
        t = (mid - 10.0 * c * torch.ones(32) / 32**0.5) @ direction
        assert float(t.min()) >= float(coeff[member].min()) - 1e-5
        assert float(t.max()) <= float(coeff[member].max()) + 1e-5
        # the PCA draws stay on the class's one-dimensional span around its mean
        pca = probes["pca32"][member].flatten(1) - base
        off_span = pca - (pca @ direction)[:, None] * direction
        assert float(off_span.abs().max()) < 1e-4
        assert float((pca @ direction).std()) > 0.05  # and they do vary along it


def _tiny_pixel_flow(seed: int = 0):
    from monai_condflow.networks.nets import ConditionalGlow

    torch.manual_seed(seed)
    flow = ConditionalGlow(
        in_channels=1, condition_dim=32, num_levels=3, image_size=16, num_steps=2, hidden_channels=8, cond_dropout=0.1
    )
    x = torch.rand(8, 1, 16, 16)
    z = F.normalize(torch.randn(8, 32), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():  # move every layer off its identity initialisation
        for param in flow.parameters():
            param.add_(0.05 * torch.randn(param.shape, dtype=param.dtype, device=param.device))
    return flow.eval(), x, z


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_fine_refiner_keeping_every_latent_gives_the_slice_back(proto, guidance):
    flow, x, z = _tiny_pixel_flow()
    levels = len(flow.encode(x, z))
    refiner = proto.FineRefiner(flow, keep=levels, guidance=guidance)
    refined, overflow = refiner(x, z, torch.Generator().manual_seed(0))
    torch.testing.assert_close(refined, x, atol=1e-4, rtol=0)
    assert overflow.tolist() == [0] * len(x)
    if guidance != 1.0:  # the guided layers are really used: the same latents decode differently at w = 1
        latents = flow.encode(x, flow.guided(z, guidance))
        assert not torch.allclose(flow.decode(latents, z), x, atol=1e-3)
    with pytest.raises(ValueError, match=f"keep {levels + 1} > the flow's {levels} latents"):
        proto.FineRefiner(flow, keep=levels + 1)(x, z, torch.Generator())
    with pytest.raises(ValueError, match="keep must be >= 1"):
        proto.FineRefiner(flow, keep=0)


def test_fine_refiner_keeps_the_top_latent_and_redraws_the_rest(proto):
    flow, x, z = _tiny_pixel_flow()
    x = 0.4 + 0.2 * x  # mid-grey slices, so that the refined ones stay inside (0, 1) and nothing is clamped
    refiner = proto.FineRefiner(flow, keep=1, temperature=0.1)
    refined, overflow = refiner(x, z, torch.Generator().manual_seed(0))
    again, _ = refiner(x, z, torch.Generator().manual_seed(0))
    torch.testing.assert_close(refined, again)  # the generator fixes the redrawn latents
    assert 0 < float(refined.min()) and float(refined.max()) < 1 and int(overflow.sum()) == 0
    before, after = flow.encode(x, z), flow.encode(refined, z)
    torch.testing.assert_close(after[-1], before[-1], atol=1e-3, rtol=0)  # the top latent survives
    assert not torch.allclose(after[0], before[0], atol=1e-2)  # the finest latent was redrawn ...
    assert float(after[0].std()) == pytest.approx(0.1, rel=0.2)  # ... from N(0, T^2)


class _Conditioner(torch.nn.Module):
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1)[:, :32] + 0.1, dim=1)


def test_one_tiny_seed_end_to_end(proto, tmp_path):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.rand(n, 1, 64, 64, generator=g), torch.arange(n) % 2

    data = {"train": split(64), "val": split(40), "test": split(40)}
    judge = proto._factory().eval()
    args = argparse.Namespace(
        autoencoder="sharp", ae_steps=2, kl_weight=0.01, latent_channels=4, latent_probe=True, flow_epochs=2,
        select="val", noise=0.05, temperatures=[0.9], guidance=[1.0, 2.0], tstr=False, prior="glow",
    )  # fmt: skip
    result = proto.run_seed(data, judge, _Conditioner(), 0, args, tmp_path / "seed_0")
    assert set(result["latent_probe"]) == {"midpoint", "pca32"}
    assert result["latent_probe"]["midpoint"]["agreement_per_class"].keys() == {"0", "1"}
    assert result["selected_epoch"] in (1, 2)
    assert [c[0] for c in result["val_curve"]] == [1, 2]  # selection reads the validation NLL every epoch
    best = min(c[1] for c in result["val_curve"])
    assert result["val_curve"][result["selected_epoch"] - 1][1] == best
    assert [(r["T"], r["w"]) for r in result["rows"]] == [(0.9, 1.0), (0.9, 2.0)]
    assert all(0 <= r["images_with_overflow"] <= r["n_images"] == 64 for r in result["rows"])
    assert all(r["fid_over_floor"] > 0 and r["fid_over_floor_raw"] > 0 for r in result["rows"])
    assert all(r["sharpness_ratio"] > 0 for r in result["rows"])
    assert all(0 <= r["dcr_closer_auc"] <= 1 and 0 <= r["near_copy_fraction"] <= 1 for r in result["rows"])
    assert (tmp_path / "seed_0" / "probe_midpoint.png").is_file()
    assert (tmp_path / "seed_0" / "grid_T0.9_w2.0.png").is_file()


def _linear_gaussian_data(n: int = 4000, d: int = 12, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.double)
    a = torch.randn(k, d, generator=g, dtype=torch.double)
    b = torch.randn(d, generator=g, dtype=torch.double)
    directions = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.double))[0]
    noise = (
        torch.randn(n, 2, generator=g, dtype=torch.double) * torch.tensor([3.0, 1.5], dtype=torch.double)
    ) @ directions.T
    u = z @ a + b + noise + 0.1 * torch.randn(n, d, generator=g, dtype=torch.double)
    return u, z, a, b, directions


def test_latent_gaussian_fit_recovers_the_model(proto):
    u, z, a, b, directions = _linear_gaussian_data()
    model = proto.LatentGaussian.fit(u, z, rank=2, ridge=1e-6)
    torch.testing.assert_close(model.weight[:-1], a, atol=0.05, rtol=0)
    torch.testing.assert_close(model.weight[-1], b, atol=0.1, rtol=0)
    assert model.scales.tolist() == pytest.approx([3.0, 1.5], rel=0.05)
    # the fitted principal directions span the true ones
    torch.testing.assert_close(model.basis @ model.basis.T @ directions, directions, atol=0.02, rtol=0)
    assert float(model.sigma) == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="rank must be in"):
        proto.LatentGaussian.fit(u[:5], z[:5], rank=5)


def test_latent_gaussian_nll_equals_the_dense_gaussian(proto):
    u, z, *_ = _linear_gaussian_data(n=200)
    model = proto.LatentGaussian.fit(u, z, rank=3, ridge=1.0)
    mean = proto.LatentGaussian._design(z) @ model.weight
    dense = torch.distributions.MultivariateNormal(mean, covariance_matrix=model.covariance())
    torch.testing.assert_close(model.nll(u, z), -dense.log_prob(u) / u.shape[1], atol=1e-9, rtol=0)


def test_latent_gaussian_samples_the_principal_part_at_temperature(proto):
    u, z, *_ = _linear_gaussian_data()
    model = proto.LatentGaussian.fit(u, z, rank=2, ridge=1e-6)
    one = z[:1].repeat(20000, 1)
    draws = model.sample(one, 0.7, torch.Generator().manual_seed(3))
    mean = proto.LatentGaussian._design(z[:1]) @ model.weight
    torch.testing.assert_close(draws.mean(0, keepdim=True), mean, atol=0.05, rtol=0)
    centred = draws - mean
    off_span = centred - (centred @ model.basis) @ model.basis.T  # no isotropic part is drawn
    assert float(off_span.abs().max()) < 1e-9
    expected = 0.49 * model.basis @ torch.diag(model.scales**2) @ model.basis.T
    torch.testing.assert_close(centred.T @ centred / len(draws), expected, atol=0.1, rtol=0)


def test_one_tiny_seed_with_the_gaussian_prior(proto, tmp_path):
    g = torch.Generator().manual_seed(1)

    def split(n):
        return torch.rand(n, 1, 64, 64, generator=g), torch.arange(n) % 2

    data = {"train": split(64), "val": split(40), "test": split(40)}
    args = argparse.Namespace(
        autoencoder="sharp", ae_steps=2, kl_weight=0.01, latent_channels=4, latent_probe=False, flow_epochs=2,
        select="last", noise=0.05, temperatures=[0.5, 0.7], guidance=[1.0, 2.0], tstr=False, prior="gaussian",
        gaussian_rank=8, ridge=1.0,
    )  # fmt: skip
    flow, *_ = _tiny_pixel_flow()
    refiners = ({"a": proto.FineRefiner(flow), "b": proto.FineRefiner(flow, 2, 0.5)},
                F.normalize(torch.randn(64, 32, generator=g), dim=1))  # fmt: skip
    result = proto.run_seed(data, proto._factory().eval(), _Conditioner(), 0, args, tmp_path / "seed_0", refiners)
    assert [(r["T"], r["w"]) for r in result["rows"]] == [(0.5, 1.0), (0.7, 1.0)]  # no guidance without a flow
    for row in result["rows"]:  # every refiner's slices get every figure the decoded ones get
        own = row.keys() - {"T", "w"} - {k for k in row if k[:2] in ("a_", "b_")}
        assert {k for k in row if k.startswith("a_")} == {f"a_{k}" for k in own}
        assert {k for k in row if k.startswith("b_")} == {f"b_{k}" for k in own}
        assert 0 <= row["a_images_with_overflow"] <= 64 and row["b_fid_over_floor"] > 0
        assert row["a_fid_over_floor"] != row["b_fid_over_floor"]  # two refiners, two sets of slices
    assert 0.0 <= result["mia_auc"] <= 1.0 and result["val_curve"] == []
