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
"""benchmarks/proto_tarflow.py without training: the flow's exact inverse (plain and guided), its log-determinant
against a brute-force Jacobian, the causal mask and the patch tokens."""

from __future__ import annotations

import math

import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def proto():
    return load_benchmark("proto_tarflow")


def _random_flow(proto, seed: int = 0, **kwargs):
    """A tiny flow (1 x 8 x 8, patch 4: 4 tokens of 16 values) whose every weight is random, the zero-initialised
    output layers and the null condition included (an untrained flow is the identity and would prove nothing)."""
    torch.manual_seed(seed)
    config = {"size": 8, "patch": 4, "blocks": 4, "layers": 2, "width": 16, "heads": 2, "cond_dim": 32} | kwargs
    flow = proto.ConditionalTarFlow(**config).double().eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.2)
    return flow


def test_patch_tokens_round_trip(proto):
    x = torch.arange(2 * 8 * 8, dtype=torch.float).reshape(2, 1, 8, 8)
    tokens = proto.patchify(x, 4)
    assert tokens.shape == (2, 4, 16)
    assert torch.equal(tokens[0, 1], x[0, 0, :4, 4:].reshape(-1))  # raster order: the top-right patch second
    assert torch.equal(proto.unpatchify(tokens, 4, 1, 8), x)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_inverse_is_exact_for_plain_and_guided_flow(proto, w):
    flow = _random_flow(proto)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.double)
    z = torch.randn(5, 32, generator=g, dtype=torch.double)
    y, log_det = flow(x, z, w)
    assert y.shape == (5, 4, 16) and log_det.shape == (5,)
    assert not torch.allclose(y, proto.patchify(x, 4), atol=1e-2)  # the flow does something
    torch.testing.assert_close(flow.inverse(y, z, w), x, atol=1e-4, rtol=0)
    if w != 1.0:  # guidance changes the map, and the guided inverse is not the plain one
        assert not torch.allclose(flow(x, z, 1.0)[0], y, atol=1e-3)
        assert not torch.allclose(flow.inverse(y, z, 1.0), x, atol=1e-3)


def test_float32_default_size_round_trip(proto):
    torch.manual_seed(0)
    flow = proto.ConditionalTarFlow(size=16, patch=4, blocks=2, layers=1, width=32, heads=4).eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.05)
        x, z = torch.randn(3, 1, 16, 16), torch.randn(3, 32)
        y, _ = flow(x, z, 2.0)
        torch.testing.assert_close(flow.inverse(y, z, 2.0), x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_log_det_matches_brute_force_jacobian(proto, w):
    flow = _random_flow(proto, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.double)
    z = torch.randn(1, 32, generator=g, dtype=torch.double)
    with torch.no_grad():
        y, log_det = flow(x, z, w)
        log_prob = flow.log_prob(x, z, w)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 8, 8), z, w)[0].reshape(-1), x.reshape(-1))
    assert jac.shape == (64, 64)
    sign, brute = torch.linalg.slogdet(jac)
    assert float(sign) != 0.0
    assert abs(float(log_det[0]) - float(brute)) < 1e-8
    assert abs(float(brute)) > 0.1  # a non-trivial volume change
    # log_prob is the change of variables with an N(0, I) prior
    expected = -0.5 * float((y**2).sum()) - 32 * math.log(2 * math.pi) + float(brute)
    assert abs(float(log_prob[0]) - expected) < 1e-8


def test_causal_mask(proto):
    flow = _random_flow(proto, seed=5)
    block = flow.blocks[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, generator=g, dtype=torch.double)
    c = torch.randn(2, 32, generator=g, dtype=torch.double)
    mu, ls = block.params(x, c)
    for t in range(4):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 16, generator=g, dtype=torch.double)
        mu2, ls2 = block.params(x2, c)
        # the parameters of tokens <= t read x_<t only; token t's output changes only through x_t itself
        torch.testing.assert_close(mu2[:, : t + 1], mu[:, : t + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(ls2[:, : t + 1], ls[:, : t + 1], atol=1e-12, rtol=0)
        if t < 3:
            assert not torch.allclose(mu2[:, t + 1 :], mu[:, t + 1 :], atol=1e-6)
        y, _ = block(x, c, None, 1.0)
        y2, _ = block(x2, c, None, 1.0)
        torch.testing.assert_close(y2[:, :t], y[:, :t], atol=1e-12, rtol=0)
    # token 0 sees the condition only
    c2 = torch.randn(2, 32, generator=g, dtype=torch.double)
    assert not torch.allclose(block.params(x, c2)[0][:, 0], mu[:, 0], atol=1e-6)
    # alternate blocks read the reversed order: with one block a change of the last token stays in the last token,
    # with two the second block carries it back to the first
    x_last = x.clone()
    x_last[:, 3] += 1.0
    for blocks, first_changes in ((1, False), (2, True)):
        f = _random_flow(proto, seed=6, blocks=blocks)
        y, _ = f(proto.unpatchify(x, 4, 1, 8), c)
        y2, _ = f(proto.unpatchify(x_last, 4, 1, 8), c)
        assert not torch.allclose(y2[:, 0], y[:, 0], atol=1e-6) if first_changes else torch.equal(y2[:, :3], y[:, :3])


def test_condition_dropout_uses_the_null_vector(proto):
    flow = _random_flow(proto)
    flow.cond_dropout = 0.5
    z = torch.randn(2000, 32, dtype=torch.double)
    dropped = flow.drop_condition(z, torch.Generator().manual_seed(0))
    is_null = (dropped == flow.null).all(1)
    assert 0.45 < float(is_null.double().mean()) < 0.55
    assert torch.equal(dropped[~is_null], z[~is_null])
