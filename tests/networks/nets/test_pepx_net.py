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
"""Tests of PEPXNet: shapes, presets, embedding, drop-in use in MONAI engines, TorchScript / export, state dicts."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader

from monai_condflow.networks.nets.pepx_net import PEPXNet

TINY = {"channels": (4, 8), "blocks": (1, 2), "stem_channels": 4, "embedding_dim": 6}

SHAPE_CASES = [
    # spatial_dims, in, out, kwargs, input spatial
    (2, 1, 2, {}, (64, 64)),
    (2, 3, 5, {"norm": "group", "dropout": 0.2}, (32, 48)),
    (2, 1, 3, {"norm": None, "act": "prelu"}, (16, 16)),
    (3, 1, 2, {}, (16, 16, 16)),
    (3, 2, 4, {"norm": "group"}, (16, 20, 16)),
    (1, 1, 2, {}, (64,)),
]


@pytest.mark.parametrize("spatial_dims, c_in, c_out, kwargs, size", SHAPE_CASES)
def test_shapes_small(spatial_dims, c_in, c_out, kwargs, size):
    net = PEPXNet.from_preset("small", spatial_dims, c_in, c_out, **kwargs).eval()
    x = torch.rand(2, c_in, *size)
    with torch.no_grad():
        logits, z, g = net(x), net.embed(x), net.features(x)
    assert logits.shape == (2, c_out)
    assert z.shape == (2, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(logits, net.head(g))  # logits are h(g(x))
    torch.testing.assert_close(z, F.normalize(g, dim=1))  # z = g(x) / |g(x)|


def test_embed_unit_norm_batch():
    net = PEPXNet.from_preset("small").eval()
    with torch.no_grad():
        z = net.embed(torch.rand(5, 1, 64, 64))
    assert z.shape == (5, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_paper_preset_and_parameter_counts():
    small, paper = PEPXNet.from_preset("small"), PEPXNet.from_preset("paper")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # reported in docs/networks.md; a change of the architecture must update the docs
    assert count(small) == 28_350  # 3x3 stride-1 stem (was 28,990 with COVIDNet's 7x7 stride-2 stem)
    assert count(paper) == 1_725_086
    assert (small.stem[0].kernel_size, small.stem[0].stride) == ((3, 3), (1, 1))
    assert (paper.stem[0].kernel_size, paper.stem[0].stride) == ((7, 7), (2, 2))
    covidnet_stem = PEPXNet.from_preset("small", stem_kernel_size=7, stem_stride=2)
    assert count(covidnet_stem) == 28_990
    with pytest.raises(ValueError, match="stem_stride"):
        PEPXNet.from_preset("small", stem_stride=0)
    assert [stage.projection[0].out_channels for stage in paper.stages if hasattr(stage, "projection")] == [
        56,
        112,
        216,
        424,
    ]
    assert [len(stage.blocks) for stage in paper.stages if hasattr(stage, "blocks")] == [3, 4, 6, 3]
    with torch.no_grad():
        assert paper.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_preset_overrides():
    net = PEPXNet.from_preset("small", out_channels=3, embedding_dim=16, norm=None)
    assert net.head.out_features == 3 and net.embedding.out_features == 16
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert set(PEPXNet.preset_names()) == {"small", "paper"}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: PEPXNet.from_preset("huge"), "valid presets: paper, small"),
        (lambda: PEPXNet(4, 1, 2, **TINY), "spatial_dims must be 1, 2 or 3"),
        (lambda: PEPXNet(0, 1, 2, **TINY), "spatial_dims"),
        (lambda: PEPXNet(2, 1, 2, channels=(4, 8), blocks=(1,)), "equal length"),
        (lambda: PEPXNet(2, 1, 2, channels=(), blocks=()), "non-empty"),
        (lambda: PEPXNet(2, 1, 0, **TINY), "out_channels"),
        (lambda: PEPXNet(2, 1, 2, channels=(4, 0), blocks=(1, 1)), "channels"),
        (lambda: PEPXNet(2, 1, 2, dropout=1.0, **TINY), "dropout"),
    ],
)
def test_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_supervised_trainer_drop_in():
    """PEPXNet as the ``network`` of a plain MONAI SupervisedTrainer, no plugin code."""
    net = PEPXNet(2, 1, 2, **TINY)
    data = [{"image": torch.rand(1, 32, 32), "label": torch.tensor(i % 2)} for i in range(8)]
    loader = DataLoader(data, batch_size=8, shuffle=False)  # one fixed batch, seen twice
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        loss_function=nn.CrossEntropyLoss(),
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"]))
    trainer.run()
    assert trainer.state.iteration == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.as_tensor(v)) for v in losses)
    assert losses[1] < losses[0]
    after = net.state_dict()
    assert not torch.equal(before["embedding.weight"], after["embedding.weight"])
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_script_and_trace():
    net = PEPXNet.from_preset("small", norm="group").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected, expected_z = net(x), net.embed(x)
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(scripted.embed(x), expected_z, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), expected, rtol=0, atol=0)
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
        other = torch.rand(3, 1, 64, 64)  # another batch size through the same trace
        torch.testing.assert_close(traced(other), net(other), rtol=0, atol=0)


def test_torch_export():
    net = PEPXNet(2, 1, 2, **TINY).eval()
    x = torch.rand(2, 1, 32, 32)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x))


def test_state_dict_round_trip():
    net = PEPXNet.from_preset("small")
    # move the batch-norm statistics away from their defaults so the buffers matter
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 1, 64, 64))
    net.eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    clone = PEPXNet.from_preset("small")
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
        torch.testing.assert_close(clone.embed(x), net.embed(x), rtol=0, atol=0)


def test_channels_last_weights_same_outputs_and_gradients():
    """2-D nets keep their convolution weights channels-last by default (oneDNN's NHWC kernels); outputs and
    gradients match a float64 copy of the same net; ``channels_last=False`` keeps the default layout; 3-D nets are
    left alone."""
    torch.manual_seed(0)
    fast = PEPXNet.from_preset("small")
    plain = PEPXNet.from_preset("small", channels_last=False)
    plain.load_state_dict(fast.state_dict())
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # the stem and the depth-wise kernels have one input channel, so is_contiguous() holds in both layouts: the
    # channel stride tells them apart (1 in channels-last, kernel height x width in the default layout)
    spatial = [w for w in convs if w.shape[2] * w.shape[3] > 1]
    assert spatial and all(w.stride(1) == 1 for w in spatial)
    plain_spatial = [m.weight for m in plain.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[2] > 1]
    assert all(w.is_contiguous() and w.stride(1) == w.shape[2] * w.shape[3] for w in plain_spatial)
    x, y = torch.rand(4, 1, 64, 64), torch.tensor([0, 1, 1, 0])
    # float64, both layouts: the same function and gradients to float64 rounding (PyTorch's own channels-last kernels:
    # oneDNN has no float64; its NHWC kernels are the float32 check below)
    fast64, reference = copy.deepcopy(fast).double(), plain.double()
    assert all(m.weight.stride(1) == 1 for m in fast64.modules() if isinstance(m, torch.nn.Conv2d))
    out64, out_ref = fast64(x.double()), reference(x.double())
    torch.testing.assert_close(out64, out_ref, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out64, y).backward()
    F.cross_entropy(out_ref, y).backward()
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    for (name, a), b in zip(fast64.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10 * scale, msg=name)
    # float32 channels-last (oneDNN's NHWC kernels) against float64: outputs to float32 rounding; gradients loosely,
    # because a ReLU input within float32 rounding of 0 can take the other side in the two runs and move a few
    # weight gradients by ~1 % of the largest (seen with one thread); a layout error would move them by ~100 %
    out = fast(x)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out, y).backward()
    for (name, a), b in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=5e-2 * scale, msg=name)
    volume = PEPXNet(3, 1, 2, **TINY)
    assert all(m.weight.is_contiguous() for m in volume.modules() if isinstance(m, torch.nn.Conv3d))


def test_3d_tiny_volume_backward():
    net = PEPXNet(3, 1, 2, **TINY)
    x = torch.rand(2, 1, 8, 8, 8)
    loss = F.cross_entropy(net(x), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.embed(x).shape == (2, 6)
