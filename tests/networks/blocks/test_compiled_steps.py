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
"""Regional compilation of the flow steps (``ConditionalGlow.compile_steps``, bundle id ``compile``): inductor's
losses, gradients and samples against the eager ones, one compilation shared by the steps of a shape, only the
chosen calls compiled (training forward, no-grad inverse), and the eager fallback after a failed compilation."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

from monai_condflow.engines.flow import FlowBitsPerDim
from monai_condflow.networks.blocks.compiled_steps import compiled_steps
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

S = 8


def _flow(**overrides) -> tuple[ConditionalGlow, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = dict(num_levels=1, image_size=S, num_steps=3, num_blocks=(1,), hidden_channels=8, cond_dropout=0.0,
                  noise_std=0.0, pixel_spline_bins=0, pixel_norm=False)  # fmt: skip
    flow = ConditionalGlow.from_preset("small", **{**kwargs, **overrides})
    x = torch.rand(4, 1, S, S)
    z = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():  # no identity couplings: every step's network matters
        for name, p in flow.named_parameters():
            if "conv_out" in name:
                p.normal_(0, 0.05)
    return flow.train(), x, z


def _loss_and_grads(net, flow, x, z) -> tuple[torch.Tensor, torch.Tensor]:
    flow.zero_grad(set_to_none=True)
    loss = net(x, z).mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in flow.parameters() if p.grad is not None])


def monkeypatch_sum(left: list) -> pytest.MonkeyPatch:
    """Record the length of every list of deferred constant log-determinants the flow's pass sums."""
    import monai_condflow.networks.nets.conditional_glow as cg

    real = cg.sum_deferred_logdets
    patch = pytest.MonkeyPatch()
    patch.setattr(cg, "sum_deferred_logdets", lambda deferred: left.append(len(deferred)) or real(deferred))
    return patch


def _counting_backend():
    """An ``aot_eager``-free backend that runs the traced graph as it is and counts its compilations."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def test_one_compilation_serves_every_step_of_a_shape_and_only_training_calls_use_it():
    torch._dynamo.reset()
    flow, x, z = _flow(num_steps=4)
    backend, graphs = _counting_backend()
    eager_loss, eager_grads = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
    flow.compile_steps(backend=backend)
    assert flow.steps_compiled
    loss, grads = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
    compiler = compiled_steps(flow)
    # four steps of one shape: one graph for the first (its input needs no gradient), one for the other three
    assert compiler.calls == 4 and len(graphs) == 2
    assert torch.allclose(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads, eager_grads, rtol=1e-5, atol=1e-7)
    # the constant log-determinants summed per level (the GPU default): compiled steps keep their own sums (nothing
    # is left to the pass's block)
    flow.batch_constant_logdets = True
    left = []
    sums = monkeypatch_sum(left)
    try:
        loss_b, grads_b = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
    finally:
        sums.undo()
    assert left == [] and compiler.calls == 8 and len(graphs) == 2
    assert torch.allclose(loss_b, eager_loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads_b, eager_grads, rtol=1e-5, atol=1e-7)
    flow.batch_constant_logdets = None
    flow.eval()
    with torch.no_grad():
        flow.bits_per_dim(x, z)
        flow.sample(z, 0.9, generator=torch.Generator().manual_seed(0))
    flow.train()
    with torch.no_grad():
        flow.bits_per_dim(x, z)
    assert compiler.calls == 8 and len(graphs) == 2  # evaluation, sampling and no-grad calls ran eagerly
    flow.compile_steps(False)
    assert compiled_steps(flow) is None and not flow.steps_compiled
    flow.batch_constant_logdets = True  # eager steps do leave theirs to the pass: 4 steps x ActNorm and 1x1
    sums = monkeypatch_sum(left)
    try:
        _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
    finally:
        sums.undo()
    assert left == [8]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_steps_train_like_the_eager_ones_across_an_optimiser_step():
    torch._dynamo.reset()
    flow, x, z = _flow()
    twin, _, _ = _flow()
    net, twin_net = FlowBitsPerDim(flow, compile=True), FlowBitsPerDim(twin)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (flow, twin)]
    for step in range(2):  # the second pass runs the compiled code on the updated weights (no stale constants)
        loss, grads = _loss_and_grads(net, flow, x, z)
        ref_loss, ref_grads = _loss_and_grads(twin_net, twin, x, z)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5), step
        assert (grads - ref_grads).abs().max() <= 1e-4 * ref_grads.abs().max(), step
        for opt in opts:
            opt.step()
    assert compiled_steps(flow).calls == 6 and not compiled_steps(flow).failed
    # the model is still exactly invertible and its saved state holds no compiled code
    flow.eval()
    with torch.no_grad():
        nu, _ = flow(x, z)
        back, _ = flow.inverse(nu, z)
    assert (back - x).abs().max() < 1e-4
    assert all(isinstance(v, torch.Tensor) for v in flow.state_dict().values())


def test_sampling_compiles_the_no_grad_inverse_only():
    torch._dynamo.reset()
    flow, x, z = _flow(num_steps=4)
    backend, graphs = _counting_backend()
    flow.eval()
    eager = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(1))
    flow.compile_steps(training=False, sampling=True, backend=backend)
    again = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(1))
    compiler = compiled_steps(flow)
    assert compiler.calls == 4 and len(graphs) == 1  # one shape, one graph, every step's inverse through it
    assert torch.allclose(again, eager, atol=1e-6)
    flow.train()
    _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)  # training stays eager
    nu = torch.randn(4, flow.latent_dim()).requires_grad_()
    flow.inverse(nu, z)  # an inverse with autograd (counterfactuals, denoising) stays eager
    assert compiler.calls == 4
    with pytest.raises(ValueError, match="nothing to compile"):
        flow.compile_steps(training=False)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_decoder_samples_like_the_eager_one_after_the_weights_change():
    torch._dynamo.reset()
    flow, x, z = _flow()
    twin, _, _ = _flow()
    flow.compile_steps(training=False, sampling=True)
    for model in (flow, twin):
        model.eval()
    for round_ in range(2):
        a = flow.sample(z, 0.9, generator=torch.Generator().manual_seed(2))
        b = twin.sample(z, 0.9, generator=torch.Generator().manual_seed(2))
        assert (a - b).abs().max() < 1e-5, round_
        with torch.no_grad():  # the same change to both: the compiled decoder must read the new weights
            for p, q in zip(flow.parameters(), twin.parameters()):
                delta = 0.01 * torch.randn(p.shape, dtype=p.dtype, device=p.device)
                p.add_(delta)
                q.add_(delta)
    assert compiled_steps(flow).calls == 6 and not compiled_steps(flow).failed


def test_a_copy_has_no_compiler_and_logdet_maps_are_recorded_eagerly():
    torch._dynamo.reset()
    flow, x, z = _flow()
    backend, graphs = _counting_backend()
    eager_map = flow.log_prob_map(x, z)  # train mode, autograd on: the case the compiled path would take
    flow.compile_steps(backend=backend)
    twin = copy.deepcopy(flow)  # what the EMA does
    assert compiled_steps(twin) is None and compiled_steps(flow) is not None
    assert torch.allclose(flow.log_prob_map(x, z), eager_map, atol=1e-5)  # the maps need the eager steps
    assert compiled_steps(flow).calls == 0 and not graphs


def test_a_failed_compilation_is_reported_once_and_training_goes_on_eagerly(caplog):
    torch._dynamo.reset()
    flow, x, z = _flow()
    eager_loss, eager_grads = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    flow.compile_steps(backend=broken_backend)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            loss, grads = _loss_and_grads(FlowBitsPerDim(flow), flow, x, z)
            assert torch.equal(loss, eager_loss) and torch.equal(grads, eager_grads)
    failures = [r for r in caplog.records if "torch.compile of the flow steps failed" in r.getMessage()]
    assert len(failures) == 1 and "no compiler here" in failures[0].getMessage()
    assert compiled_steps(flow).failed and compiled_steps(flow).calls == 0 and not flow.steps_compiled


def test_compile_id_is_checked_and_needs_a_flow_with_compile_steps():
    flow, _, _ = _flow()
    with pytest.raises(ValueError, match="config id 'compile' must be true or false"):
        FlowBitsPerDim(flow, compile="yes")
    with pytest.raises(ValueError, match="has no compile_steps"):
        FlowBitsPerDim(torch.nn.Linear(2, 2), compile=True)
    assert compiled_steps(flow) is None
    FlowBitsPerDim(flow, compile=True)
    assert compiled_steps(flow) is not None and compiled_steps(flow).compiled_forward is not None
    # a flow already compiled for training keeps its compiler (and its options); one compiled for sampling only
    # gets a compiler for both
    own = flow.compile_steps(backend="eager") and compiled_steps(flow)
    FlowBitsPerDim(flow, compile=True)
    assert compiled_steps(flow) is own
    flow.compile_steps(training=False, sampling=True)
    FlowBitsPerDim(flow, compile=True)
    both = compiled_steps(flow)
    assert both.compiled_forward is not None and both.compiled_inverse is not None


def test_compile_steps_raises_the_recompile_limit_to_twice_the_steps():
    config = torch._dynamo.config
    old = config.recompile_limit
    try:
        config.recompile_limit = 2
        flow, _, _ = _flow(num_steps=5)
        flow.compile_steps(backend="eager")
        assert config.recompile_limit == 10
        config.recompile_limit = 50
        flow.compile_steps(backend="eager")
        assert config.recompile_limit == 50  # never lowered
    finally:
        config.recompile_limit = old


def test_a_compilation_that_fails_after_an_eager_part_leaves_each_constant_once(monkeypatch):
    """A compiled step whose eagerly run part left constants to the pass, then failed to compile: the eager rerun
    of the step leaves them again, so those of the failed attempt are taken back (no double count)."""
    import monai_condflow.networks.blocks.compiled_steps as cs
    from monai_condflow.networks.blocks.flow_sequential import defer_constant_logdet, deferring_constant_logdets

    flow, _, _ = _flow()
    flow.compile_steps(backend=_counting_backend()[0])
    compiler = compiled_steps(flow)
    p = torch.ones(3)
    monkeypatch.setattr(cs, "_compile_errors", lambda: (RuntimeError,))

    def compiled(*args):
        defer_constant_logdet(p, 4)  # a part that ran eagerly
        raise RuntimeError("backend failed on a later graph")

    def eager(*args):
        defer_constant_logdet(p, 4)
        return args

    with deferring_constant_logdets() as deferred:
        defer_constant_logdet(p, 2)  # an earlier layer's
        compiler._run(compiled, eager, 1)
    assert deferred == [(p, 2), (p, 4)] and compiler.failed
    flow.compile_steps(False)
