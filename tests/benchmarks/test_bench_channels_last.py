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
"""benchmarks/bench_channels_last.py: the critic passes of ours and the peer give the same image gradient, the
gradient-error figure measures something, and the run reports every figure."""

from __future__ import annotations

import json

import pytest
import torch

from monai_condflow.networks.nets import PEPXNet, ProjectionDiscriminator
from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_channels_last")


def test_critic_passes_give_the_same_image_gradient_and_leave_the_critic_trainable(bench):
    torch.manual_seed(0)
    ours = ProjectionDiscriminator(2, 1, 8, channels=(4, 8), high_pass=True)
    peer = ProjectionDiscriminator(2, 1, 8, channels=(4, 8), high_pass=True, channels_last=False)
    peer.load_state_dict(ours.state_dict())
    x, z = torch.rand(3, 1, 16, 16), torch.randn(3, 8)
    grads = []
    for disc, freeze in ((ours, True), (peer, False)):
        fake = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        bench.critic_passes(disc, x, fake, z, freeze)
        grads.append(fake.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in ours.parameters())
    # the frozen flow-side pass leaves the critic's gradients as its hinge step made them; the peer's accumulate the
    # flow-side pass on top, far beyond the layouts' rounding
    pairs = zip(ours.parameters(), peer.parameters())
    worst = max(float((a.grad - b.grad).abs().max() / b.grad.abs().max()) for a, b in pairs)
    assert worst > 1e-2


class _SkewedGradient(torch.autograd.Function):
    """Identity whose float32 backward is 5 % off (the float64 one is exact)."""

    @staticmethod
    def forward(ctx, t):
        ctx.skew = 1.05 if t.dtype == torch.float32 else 1.0
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.skew


def test_gradient_error_is_small_for_an_exact_net_and_large_for_a_skewed_one(bench):
    torch.manual_seed(0)
    net = PEPXNet(2, 1, 2, channels=(4, 8), blocks=(1, 1), stem_stride=1)
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    assert bench.gradient_error(net, x, y) < 1e-4

    class Skewed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return _SkewedGradient.apply(self.inner(t))

    assert bench.gradient_error(Skewed(net), x, y) > 1e-2


def test_the_benchmark_reports_every_figure(bench, capsys):
    out = bench.main(["--batch", "2", "--classifier-batch", "2", "--size", "16", "--reps", "2"])
    for name in ("classifier_step", "critic_passes", "adversarial_step"):
        assert out[name]["ours_ms"] > 0 and out[name]["peer_ms"] > 0 and out[name]["speedup"] > 0
    assert 0 <= out["classifier_step"]["ours_gradient_error"] < 1e-3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("BENCH_CHANNELS_LAST ") and json.loads(last.split(" ", 1)[1])["batch"] == 2
