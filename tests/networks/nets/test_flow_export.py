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
"""Issue 16: the flow's ``sample`` and ``log_prob`` as single-output modules, exported with ``torch.export``."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets import ConditionalGlow, FlowDecoder, FlowLogProb

S = 16


@pytest.fixture(scope="module")
def flow() -> ConditionalGlow:
    torch.manual_seed(0)
    f = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1), hidden_channels=8
    )
    x = torch.rand(6, 1, S, S)
    f.initialize(x, torch.nn.functional.normalize(torch.randn(6, 32), dim=1))
    return f.eval()


def _z(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_sampler_is_flow_sample_with_the_noise_given(flow):
    z = _z(3, 1)
    expected = flow.sample(z, temperature=0.7, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(3, flow.latent_dim((S, S)), generator=torch.Generator().manual_seed(5)).reshape(3, 1, S, S)
    with torch.no_grad():
        got = FlowDecoder(flow, temperature=0.7)(noise, z)
    assert got.shape == (3, 1, S, S)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="temperature"):
        FlowDecoder(flow, temperature=-1.0)


def test_sampler_draws_the_fitted_sampling_prior_like_flow_sample():
    torch.manual_seed(0)
    f = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1), hidden_channels=8
    )
    x, z = torch.rand(40, 1, S, S), _z(40, 2)
    f.initialize(x, z)
    f.eval().fit_sampling_prior([(x, z)], shrinkage=0.2)
    expected = f.sample(z[:3], temperature=0.7, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(3, f.latent_dim((S, S)), generator=torch.Generator().manual_seed(5)).reshape(3, 1, S, S)
    with torch.no_grad():
        got = FlowDecoder(f, temperature=0.7)(noise, z[:3])
    assert torch.allclose(got, expected, atol=1e-6)
    standard = f.sample(z[:3], temperature=0.7, generator=torch.Generator().manual_seed(5), prior="standard")
    assert not torch.allclose(got, standard, atol=1e-3)


def test_log_prob_module_is_flow_log_prob(flow):
    x, z = torch.rand(3, 1, S, S), _z(3, 2)
    with torch.no_grad():
        assert torch.equal(FlowLogProb(flow)(x, z)[:, 0], flow.log_prob(x, z))


def _check_export(flow: ConditionalGlow) -> None:
    """torch.export of the flow's decoder and log-density gives the eager values on other inputs than traced."""
    sampler, log_prob = FlowDecoder(flow, 0.9).eval(), FlowLogProb(flow).eval()
    noise, x, z = torch.randn(2, 1, S, S), torch.rand(2, 1, S, S), _z(2, 3)
    exported_sampler = torch.export.export(sampler, (noise, z)).module()
    exported_log_prob = torch.export.export(log_prob, (x, z)).module()
    # other values than the ones traced with: the graph computes, it does not replay
    noise2, x2, z2 = torch.randn(2, 1, S, S), torch.rand(2, 1, S, S), _z(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(exported_sampler(noise2, z2), sampler(noise2, z2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported_log_prob(x2, z2), log_prob(x2, z2), rtol=1e-5, atol=1e-3)
        assert not torch.allclose(exported_log_prob(x2, z2), exported_log_prob(x, z))


def test_torch_export_of_sample_and_log_prob_gives_the_eager_values(flow):
    _check_export(flow)


def test_torch_export_of_a_haar_squeeze_flow_gives_the_eager_values():
    torch.manual_seed(0)
    f = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1), hidden_channels=8, squeeze="haar"
    )
    f.initialize(torch.rand(6, 1, S, S), _z(6, 0))
    _check_export(f.eval())
