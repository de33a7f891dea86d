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
"""CUDA graphs of the training step and the decoder: eager fallback on the CPU (what CI checks), and graph ==
eager on a GPU (run where one is present; ``benchmarks/gpu_check.py`` reports the same comparison)."""

from __future__ import annotations

import copy

import pytest
import torch

from monai_condflow.engines.flow import FlowBitsPerDim
from monai_condflow.networks.blocks.coupling import set_coupling_dtype
from monai_condflow.networks.blocks.invertible_conv import InvertibleConv1x1
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
from monai_condflow.utils.cuda_graphs import GraphedTraining, signature

S = 16
GPU = torch.cuda.is_available()


def _flow(device: str = "cpu") -> tuple[ConditionalGlow, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset("small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1),
                                       hidden_channels=8, cond_dropout=0.0, noise_std=0.0).to(device)  # fmt: skip
    x = torch.rand(4, 1, S, S, device=device)
    z = torch.nn.functional.normalize(torch.randn(4, 32, device=device), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "conv_out" in name:
                p.normal_(0, 0.05)
    return flow, x, z


def _loss_and_grads(net: torch.nn.Module, flow: torch.nn.Module, x, z) -> tuple[torch.Tensor, torch.Tensor]:
    flow.zero_grad(set_to_none=True)
    loss = net(x, z).mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in flow.parameters() if p.grad is not None])


def test_signature_covers_shape_dtype_device_and_grad():
    a = torch.zeros(2, 3)
    assert signature(a) == signature(torch.ones(2, 3))
    assert signature(a) != signature(torch.zeros(3, 3))
    assert signature(a) != signature(a.double())
    assert signature(a) != signature(a.clone().requires_grad_())


def test_graphed_training_on_cpu_tensors_runs_the_module_eagerly():
    flow, x, z = _flow()
    flow.train()
    graphed = GraphedTraining(FlowBitsPerDim(flow))
    loss_g, grads_g = _loss_and_grads(graphed, flow, x, z)
    loss_e, grads_e = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
    assert not graphed.recorded and graphed.replays == 0 and not graphed.failed
    assert torch.equal(loss_g, loss_e) and torch.equal(grads_g, grads_e)


def test_graphed_training_records_again_when_weights_move_or_numerics_change(monkeypatch):
    """The training graph's bookkeeping, on the CPU with a stand-in for the recording: an optimiser-like in-place
    write keeps the graphs (they read the weights where they are); a move, a replaced parameter (same memory: the
    graphs would hand its gradient to the old object), a frozen parameter, TF32, the flow's own switches
    (``graph_settings``) drop them, and they are recorded again at the next call of the old batch shape (a smaller
    batch in between runs eagerly); under autocast with its weight cache the step runs eagerly, records nothing and
    is recorded again after it."""
    flow, x, z = _flow()
    flow.train()
    graphed = GraphedTraining(FlowBitsPerDim(flow), settings=flow.graph_settings)
    recorded = []

    def record(args):  # what _record leaves behind, without CUDA
        recorded.append(signature(*args))
        graphed._graphed, graphed._sig = graphed.module, signature(*args)

    monkeypatch.setattr(graphed, "_eligible", lambda args: True)
    monkeypatch.setattr(graphed, "_record", record)
    graphed(x, z)
    graphed(x, z)
    assert len(recorded) == 1 and graphed.replays == 2
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1e-3)  # an optimiser step: same tensors, same memory
    graphed(x, z)
    assert len(recorded) == 1
    flow.load_state_dict({k: v.clone() for k, v in flow.state_dict().items()}, assign=True)  # moved
    graphed(x[:3], z[:3])  # a smaller last batch: eager, no recording for its shape
    assert len(recorded) == 1 and not graphed.recorded
    graphed(x, z)
    graphed(x, z)
    assert len(recorded) == 2 and recorded[-1] == recorded[0]
    conv = next(m for m in flow.modules() if isinstance(m, InvertibleConv1x1))
    conv.lower = torch.nn.Parameter(conv.lower.detach())  # another object on the same memory
    graphed(x, z)
    assert len(recorded) == 3
    conv.lower.requires_grad_(False)  # frozen: the recorded backward would still give it a gradient
    graphed(x, z)
    assert len(recorded) == 4
    set_coupling_dtype(flow, torch.bfloat16)  # the flow's own switch (graph_settings)
    graphed(x, z)
    assert len(recorded) == 5
    set_coupling_dtype(flow, None)
    graphed(x, z)
    assert len(recorded) == 6
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not before
        graphed(x, z)
        assert len(recorded) == 7
    finally:
        torch.backends.cudnn.allow_tf32 = before
    replays = graphed.replays
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache on (the default): eager, nothing recorded
        graphed(x, z)
        graphed(x, z)
    assert len(recorded) == 7 and graphed.replays == replays and not graphed.failed
    graphed(x, z)
    graphed(x, z)
    assert len(recorded) == 8 and graphed.replays == replays + 2


def test_graph_sampling_on_the_cpu_decodes_eagerly_with_the_same_samples():
    flow, _, z = _flow()
    flow.eval()
    eager = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3))
    flow.graph_sampling()
    again = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(eager, again) and flow.graph_sampling_enabled and flow.graph_sampling_recorded == 0  # CPU


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_graphed_training_step_equals_the_eager_one_on_a_gpu():
    flow, x, z = _flow("cuda")
    flow.train()
    eager, graphed = FlowBitsPerDim(flow), FlowBitsPerDim(flow, cuda_graphs=True)
    for batch in ((x, z), (torch.rand_like(x), z.flip(0))):  # the recorded batch, then new data in the same shape
        loss_e, grads_e = _loss_and_grads(eager, flow, *batch)
        loss_g, grads_g = _loss_and_grads(graphed, flow, *batch)
        assert torch.allclose(loss_g, loss_e, rtol=1e-5) and torch.allclose(grads_g, grads_e, rtol=1e-4, atol=1e-6)
    assert graphed.graphed.recorded and graphed.graphed.replays == 2
    _loss_and_grads(graphed, flow, x[:3], z[:3])  # another shape: eager, no new recording
    assert graphed.graphed.replays == 2


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_graphed_decoder_equals_eager_and_is_dropped_when_weights_change():
    flow, _, z = _flow("cuda")
    flow.eval()
    eager = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3))
    flow.graph_sampling()
    assert torch.allclose(flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3)), eager, atol=1e-6)
    assert flow.graph_sampling_recorded == 1
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "conv_out" in name:
                p.add_(0.05)
    graphed_new = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3))
    assert flow.graph_sampling_recorded == 1  # re-recorded for the new weights
    flow.graph_sampling(False)
    eager_new = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(graphed_new, eager_new, atol=1e-6) and not torch.allclose(eager_new, eager, atol=1e-3)


def test_weights_watch_sees_written_moved_and_replaced_weights():
    from monai_condflow.utils.cuda_graphs import WeightsWatch

    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    watch = WeightsWatch()
    assert watch.changed(module) and not watch.changed(module)  # the first call sets the reference
    with torch.no_grad():
        module[0].weight.add_(1.0)  # written in place (an optimiser step): a new version
    assert watch.changed(module) and not watch.changed(module)
    module[1].running_mean.add_(1.0)  # a buffer counts too
    assert watch.changed(module) and not watch.changed(module)
    module.to(memory_format=torch.channels_last)  # a move: a new address, the version of a fresh tensor
    assert watch.changed(module) and not watch.changed(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state, assign=True)  # replaced tensors
    assert watch.changed(module) and not watch.changed(module)
    module[0].weight = torch.nn.Parameter(module[0].weight.detach())  # another object, same memory and version
    assert watch.changed(module) and not watch.changed(module)
    assert not copy.deepcopy(watch)._held and copy.deepcopy(watch).changed(module)  # a copy starts empty
    with torch.inference_mode():
        module[1].register_buffer("made_in_inference", torch.zeros(2))  # no version counter: its address counts
    assert watch.changed(module) and not watch.changed(module)


def test_graphed_decoders_are_dropped_when_the_weights_move_or_change(monkeypatch):
    """The decoder graphs' bookkeeping, on the CPU with a stand-in for the recording: one recording per signature,
    kept while the weights stay, dropped after an in-place write, a replacement by load_state_dict(assign=True) or
    a buffer edit (which the sum of the parameters' version counters, used before, did not see)."""
    import monai_condflow.utils.cuda_graphs as cuda_graphs

    recorded = []

    class Recording:
        def __init__(self, fn, *args, name="decoder"):
            recorded.append(tuple(a.shape for a in args))

    monkeypatch.setattr(cuda_graphs, "GraphedCall", Recording)
    flow, _, z = _flow()
    flow.graph_sampling()
    nu = torch.zeros(z.shape[0], flow.latent_dim((S, S)))
    first = flow._graphed_decoder(nu, z, (S, S))
    assert isinstance(first, Recording) and flow._graphed_decoder(nu, z, (S, S)) is first and len(recorded) == 1
    with torch.no_grad():
        next(flow.parameters()).add_(0.0)
    assert flow._graphed_decoder(nu, z, (S, S)) is not first and len(recorded) == 2
    flow.load_state_dict({k: v.clone() for k, v in flow.state_dict().items()}, assign=True)
    assert flow._graphed_decoders == {} and flow._graphed_weights is None  # dropped at once, memory included
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 3
    next(b for b in flow.buffers() if b.is_floating_point()).add_(0.0)  # e.g. a 1x1 convolution's permutation
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 4
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 4 and flow.graph_sampling_recorded == 1
    flow.float()  # a move (here to the same dtype): the graphs and the held weights go, graph sampling stays on
    assert flow._graphed_decoders == {} and flow._graphed_weights is None and flow.graph_sampling_enabled
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 5
    # the numerics a graph bakes in: the couplings' precision (set_coupling_dtype), then autocast around the call
    assert set_coupling_dtype(flow, torch.bfloat16) > 0
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 6 and flow.graph_sampling_recorded == 1  # the fp32 graph dropped
    set_coupling_dtype(flow, None)
    flow._graphed_decoder(nu, z, (S, S))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flow._graphed_decoder(nu, z, (S, S))
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 9
    # decoding itself leaves the weights as they were (else every sample call would record anew)
    with torch.inference_mode():
        flow.inverse(torch.randn(z.shape[0], flow.latent_dim((S, S))), z, (S, S))
    flow._graphed_decoder(nu, z, (S, S))
    assert len(recorded) == 9
