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
"""Bits/dim helper and Ignite metric."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from monai_condflow.metrics import BitsPerDim, bits_per_dim_from_latent
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow


def test_identity_flow_on_uniform_data_is_analytic():
    # nu = 0, logdet = 0: log p = -D/2 log(2 pi), bpd = log(2 pi) / (2 ln 2) + n_bits
    nu, logdet = torch.zeros(3, 10), torch.zeros(3)
    expected = math.log(2 * math.pi) / (2 * math.log(2)) + 8
    assert torch.allclose(bits_per_dim_from_latent(nu, logdet, 10), torch.full((3,), expected, dtype=torch.float32))
    # a volume-expanding map (logdet = D ln 2) lowers the cost by exactly one bit per dimension
    shifted = bits_per_dim_from_latent(nu, torch.full((3,), 10 * math.log(2)), 10, n_bits=0)
    assert torch.allclose(shifted, torch.full((3,), expected - 8 - 1))
    with pytest.raises(ValueError):
        bits_per_dim_from_latent(nu, logdet, 0)


def test_matches_conditional_glow_bits_per_dim():
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=8, num_steps=1, num_blocks=(1, 1), hidden_channels=4
    )
    x, z = torch.rand(4, 1, 8, 8), torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    flow.initialize(x, z)
    flow.eval()
    nu, logdet = flow(x, z)
    assert torch.allclose(bits_per_dim_from_latent(nu, logdet, 64), flow.bits_per_dim(x, z), atol=1e-5)


def test_metric_mean_over_batches_reset_and_nonfinite():
    metric = BitsPerDim()
    with pytest.raises(NotComputableError):
        metric.compute()
    metric.update(torch.tensor([1.0, 2.0]))
    metric.update((torch.tensor([3.0, 4.0, 5.0]), None))
    assert metric.compute() == pytest.approx(3.0)
    metric.reset()
    metric.update(torch.tensor([2.0, float("nan")]))
    assert metric.compute() == float("inf") and metric.num_nonfinite == 1


def test_metric_attached_to_an_engine():
    batches = [torch.tensor([1.0, 3.0]), torch.tensor([5.0])]
    engine = Engine(lambda e, b: b)
    BitsPerDim().attach(engine, "bpd")
    state = engine.run(batches, max_epochs=1)
    assert state.metrics["bpd"] == pytest.approx(3.0)
