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
"""ConditionalGlow.fit_sampling_prior: what sample() draws, what it leaves alone (density), checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

TINY = {"num_levels": 3, "num_steps": 2, "num_blocks": (1, 1, 1), "hidden_channels": 8, "image_size": 16}


def _flow_and_data(n=48, noise_std=0.0, seed=0):
    torch.manual_seed(seed)
    flow = ConditionalGlow(condition_dim=6, noise_std=noise_std, **TINY)
    x = torch.rand(n, 1, 16, 16) * 0.8 + 0.1
    z = torch.nn.functional.normalize(torch.randn(n, 6), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "conv_out" in name or "proj" in name:
                p.normal_(0, 0.05)
    return flow.eval(), x, z


def test_samples_decode_draws_of_the_fitted_prior_and_the_density_is_unchanged():
    flow, x, z = _flow_and_data()
    with torch.no_grad():
        before = flow.log_prob(x, z)
    info = flow.fit_sampling_prior([(x[:20], z[:20]), (x[20:], z[20:])], shrinkage=0.3)
    assert info["count"] == 48 and flow.sampling_prior.fitted
    with torch.no_grad():
        assert torch.equal(flow.log_prob(x, z), before)  # only what sample() draws changes
    # the fitted prior is the encoded training set's: its mean is the mean of the encoded top latents
    with torch.no_grad():
        top = flow(x, z)[0][:, -flow.top_latent_dim :]
        mean_fit = flow.sampling_prior.draw(torch.zeros(48, flow.top_latent_dim), z).mean(0)
    assert torch.allclose(mean_fit, top.mean(0), atol=1e-4)
    # sample() decodes N(0, T^2) draws for the finer latents and the fitted prior's draw for the top latent
    temperature, d = 0.8, flow.top_latent_dim
    eps = torch.randn(4, flow.latent_dim(), generator=torch.Generator().manual_seed(3)) * temperature
    images = flow.sample(z[:4], temperature=temperature, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        nu = torch.cat([eps[:, :-d], flow.sampling_prior.draw(eps[:, -d:], z[:4])], dim=1)
        expected = flow.inverse(nu, z[:4])[0].clamp(0, 1)
        # and the draw is exact: encoding the decoded latents gives them back, whitened to T * eps
        decoded = flow.inverse(nu, z[:4])[0]
        back = flow(decoded, z[:4])[0]
    assert torch.allclose(images, expected, atol=1e-5)
    assert torch.allclose(flow.sampling_prior.whiten(back[:, -d:], z[:4]), eps[:, -d:], atol=2e-3)


def test_prior_argument_chooses_and_checks():
    flow, x, z = _flow_and_data()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    standard = flow.sample(z[:3], generator=gen())
    with pytest.raises(RuntimeError, match="no fitted sampling prior"):
        flow.sample(z[:3], generator=gen(), prior="fitted")
    with pytest.raises(ValueError, match="prior must be"):
        flow.sample(z[:3], prior="empirical")
    flow.fit_sampling_prior([(x, z)], shrinkage=0.2)
    fitted = flow.sample(z[:3], generator=gen())
    assert not torch.allclose(fitted, standard, atol=1e-3)
    assert torch.equal(flow.sample(z[:3], generator=gen(), prior="standard"), standard)
    assert torch.equal(flow.sample(z[:3], generator=gen(), prior="fitted"), fitted)
    with pytest.raises(ValueError, match=r"covers images of size \[16, 16\], not \[32, 32\]"):
        flow.sample(z[:3], spatial_size=(32, 32), prior="fitted")
    assert flow.sample(z[:3], spatial_size=(32, 32)).shape == (3, 1, 32, 32)  # auto: the standard prior there
    with pytest.raises(ValueError, match=r"needs images of size \[16, 16\]"):
        flow.fit_sampling_prior([(torch.rand(2, 1, 32, 32), z[:2])])


def test_a_fitted_flow_round_trips_through_a_checkpoint_and_old_checkpoints_load(tmp_path):
    flow, x, z = _flow_and_data(noise_std=0.02)
    unfitted = {k: v.clone() for k, v in flow.state_dict().items() if not k.startswith("sampling_prior.")}
    flow.fit_sampling_prior([(x, z)], shrinkage=0.5, noise_generator=torch.Generator().manual_seed(0))
    torch.save(flow.state_dict(), tmp_path / "model.pt")
    fresh = ConditionalGlow(condition_dim=6, noise_std=0.02, **TINY).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.allclose(fresh.sample(z[:4], generator=gen()), flow.sample(z[:4], generator=gen()), atol=1e-5)
    old = ConditionalGlow(condition_dim=6, noise_std=0.02, **TINY).eval()
    old.load_state_dict(unfitted)  # saved before the sampling prior existed
    assert not old.sampling_prior.fitted
    # the training noise enters the fit (noise_std > 0): another noise draw gives another fit
    again = ConditionalGlow(condition_dim=6, noise_std=0.02, **TINY).eval()
    again.load_state_dict(unfitted)
    again.fit_sampling_prior([(x, z)], shrinkage=0.5, noise_generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(again.sampling_prior.scale_tril, flow.sampling_prior.scale_tril)


def test_the_strict_loaders_accept_a_fitted_prior_and_pretraining_resets_it(tmp_path):
    from monai_condflow.handlers.checkpoint import CheckpointError, load_module_weights
    from monai_condflow.privacy.public import load_pretrained_weights

    flow, x, z = _flow_and_data()
    flow.fit_sampling_prior([(x, z)], shrinkage=0.3)
    torch.save({"network": flow.state_dict()}, tmp_path / "model.pt")
    loaded = load_module_weights(ConditionalGlow(condition_dim=6, **TINY), tmp_path / "model.pt")
    assert loaded.sampling_prior.fitted
    assert torch.equal(loaded.sampling_prior.scale_tril, flow.sampling_prior.scale_tril)
    # fine-tuning from it: the weights come, the prior fitted to the pretraining data does not
    tuned = load_pretrained_weights(ConditionalGlow(condition_dim=6, **TINY), tmp_path / "model.pt")
    assert not tuned.sampling_prior.fitted and float(tuned.sampling_prior.shrinkage) == -1.0
    key = "levels.0.layers.1.layers.2.net.conv_out.weight"  # perturbed away from its zero initialisation
    assert torch.equal(tuned.state_dict()[key], flow.state_dict()[key]) and flow.state_dict()[key].abs().sum() > 0
    # a prior of another size is still refused, by name
    other = ConditionalGlow(condition_dim=6, **{**TINY, "image_size": 32})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_module_weights(other, tmp_path / "model.pt")
