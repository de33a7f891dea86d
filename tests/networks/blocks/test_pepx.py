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
"""Tests of the PEPX block."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_condflow.networks.blocks.pepx import PEPXBlock, make_norm_layer

CASES = [
    # spatial_dims, in, out, stride, norm, input spatial, expected spatial
    (2, 8, 16, 1, "batch", (9, 9), (9, 9)),
    (2, 8, 8, 2, None, (9, 9), (5, 5)),
    (2, 12, 6, 1, ("group", {"num_groups": 4}), (4, 6), (4, 6)),
    (3, 4, 8, 1, "instance", (4, 4, 4), (4, 4, 4)),
    (3, 4, 8, 2, "group", (5, 4, 6), (3, 2, 3)),
    (1, 4, 8, 1, "batch", (7,), (7,)),
]


@pytest.mark.parametrize("spatial_dims, c_in, c_out, stride, norm, size, expected", CASES)
def test_shape(spatial_dims, c_in, c_out, stride, norm, size, expected):
    block = PEPXBlock(spatial_dims, c_in, c_out, stride=stride, norm=norm)
    y = block(torch.randn(2, c_in, *size))
    assert y.shape == (2, c_out, *expected)
    assert torch.isfinite(y).all()


def test_layer_order_and_widths():
    block = PEPXBlock(2, 16, 24, projection_channels=6, expansion_channels=20)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (16, 6, (1, 1), 1),
        (6, 20, (1, 1), 1),
        (20, 20, (3, 3), 20),  # depth-wise
        (20, 6, (1, 1), 1),
        (6, 24, (1, 1), 1),
    ]
    # projections are linear bottlenecks; the other three units end with the activation
    assert not isinstance(block.projection1[-1], nn.ReLU)
    assert not isinstance(block.projection2[-1], nn.ReLU)
    assert all(isinstance(unit[-1], nn.ReLU) for unit in (block.expansion, block.depthwise, block.extension))
    assert all(c.bias is None for c in convs)  # bias is redundant before batch norm


@pytest.mark.parametrize("norm", [None, "group", ("group", {"num_groups": 2}), "instance"])
def test_no_batch_norm_for_dp_sgd(norm):
    block = PEPXBlock(2, 16, 16, norm=norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
    if norm is None:
        assert all(m.bias is not None for m in block.modules() if isinstance(m, nn.Conv2d))
    # per-sample independence: the output of a sample does not depend on the other samples of the batch
    block.train()
    x = torch.randn(3, 16, 5, 5)
    torch.testing.assert_close(block(x)[:1], block(x[:1]))


def test_group_rule():
    assert make_norm_layer("group", 2, 56).num_groups == 8
    assert make_norm_layer("group", 2, 42).num_groups == 7
    assert make_norm_layer(("group", {"num_groups": 4}), 3, 6).num_groups == 3
    assert make_norm_layer(("group", {"num_groups": 32, "affine": False}), 2, 5).num_groups == 5
    assert isinstance(make_norm_layer(None, 2, 4), nn.Identity)
    assert isinstance(make_norm_layer("batch", 3, 4), nn.BatchNorm3d)
    with pytest.raises(ValueError, match="num_groups"):
        make_norm_layer(("group", {"num_groups": 0}), 2, 4)


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 0}, {"out_channels": -1}, {"projection_channels": 0}, {"stride": 0}, {"stride": 1.5}]
)
def test_bad_args(kwargs):
    args = {"spatial_dims": 2, "in_channels": 4, "out_channels": 4, **kwargs}
    with pytest.raises(ValueError, match="positive integer"):
        PEPXBlock(**args)


def test_script_and_gradients():
    block = PEPXBlock(2, 4, 8, norm="group").eval()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    scripted = torch.jit.script(block)
    torch.testing.assert_close(scripted(x), block(x))
    block(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in block.parameters())
