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
"""
Flow trainer (single process): step, NaN skip, ActNorm init once, checkpoints, resume,
determinism, prepare-batch for conditions, bad settings.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.utils import CommonKeys as Keys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_condflow.engines.flow import FlowBitsPerDim, FlowTrainer, warmup_exponential_lambda
from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch, attach_conditions, cache_embeddings
from monai_condflow.handlers.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from monai_condflow.networks.nets.pepx_net import PEPXNet
from monai_condflow.utils.distributed import create_loader
from monai_condflow.utils.io import MODEL_FILE
from tests.benchmarks.script import load_benchmark
from tests.engines.state_diff import max_state_diff

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _train(out: Path, *, max_epochs=2, flow_seed=1, stop_after=None, record=None, **kwargs):
    """create_flow_trainer on the tiny flow; ``stop_after`` terminates (like a kill) after that epoch's checkpoint."""
    train = create_loader(W.make_flow_data(16, 0), 8, shuffle=True, seed=3)
    val = create_loader(W.make_flow_data(8, 1), 8, shuffle=False, seed=3)
    args = {"device": "cpu", "max_epochs": max_epochs, "output_dir": out, "warmup_epochs": 1, "lr": 1e-3, "seed": 5,
            "tensorboard": False, **kwargs}  # fmt: skip
    trainer, evaluator = create_flow_trainer(W.make_flow(flow_seed), None, train, val, **args)
    losses = [] if record is None else record
    trainer.add_event_handler(
        IterationEvents.MODEL_COMPLETED, lambda e: losses.append(e.state.output[Keys.LOSS].item())
    )
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    trainer.run()
    return trainer, evaluator, losses


def _state(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.network.flow.state_dict().items()}


def test_warmup_then_exponential_decay():
    f = warmup_exponential_lambda(epoch_length=4, warmup_epochs=2, gamma=0.5)
    assert [f(i) for i in range(8)] == [i / 8 for i in range(1, 9)]
    assert [f(i) for i in (8, 11, 12, 16)] == [1.0, 1.0, 0.5, 0.25]
    assert warmup_exponential_lambda(3, 0, 0.9)(0) == 1.0
    with pytest.raises(ValueError):
        warmup_exponential_lambda(0, 1, 0.9)


def test_training_logs_checkpoints_and_samples(tmp_path):
    trainer, evaluator, losses = _train(tmp_path, tensorboard=True, sample_every=1)
    assert trainer.state.epoch == 2 and trainer.state.skipped_steps == 0 and len(losses) == 4
    assert all(math.isfinite(v) for v in losses)
    out = trainer.state.output
    assert out[Keys.LOSS].item() == pytest.approx(out[Keys.PRED].mean().item())
    assert math.isfinite(evaluator.state.metrics["val_bpd"]) and 6 < evaluator.state.metrics["val_bpd"] < 10
    names = {p.name for p in tmp_path.iterdir()}
    assert {"state_checkpoint_epoch=1.pt", "state_checkpoint_epoch=2.pt", "tensorboard", "samples"} <= names
    assert {p.name for p in tmp_path.glob("*.pt")} == {MODEL_FILE, "state_checkpoint_epoch=1.pt",
                                                       "state_checkpoint_epoch=2.pt"}  # fmt: skip
    assert not [n for n in names if "tmp" in n]
    ckpt = load_checkpoint(tmp_path / "state_checkpoint_epoch=2.pt")
    assert {"flow", "optimizer", "lr_scheduler", "trainer", "rng", "checkpointer", "best_checkpoint"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["skipped_steps"] == 0
    best = load_checkpoint(tmp_path / MODEL_FILE)
    assert set(best) == {"network"}  # the best epoch's flow state dict, as the stages load it
    assert set(best["network"]) == set(trainer.network.flow.state_dict())
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"train_bpd", "lr", "skipped_steps", "val_bpd"} <= set(events.Tags()["scalars"])
    assert len(list((tmp_path / "samples").glob("samples_epoch0002_class*.png"))) == 2


def test_two_seeded_runs_are_identical(tmp_path):
    """Two runs with the same seed give the same losses, metrics and weights."""
    t1, e1, l1 = _train(tmp_path / "a")
    t2, e2, l2 = _train(tmp_path / "b")
    assert l1 == l2 and e1.state.metrics == e2.state.metrics
    assert max_state_diff(_state(t1), _state(t2)) == 0.0


def test_resume_after_a_kill_at_an_epoch_boundary_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """A resumed run continues the random streams exactly (and a reloaded flow is not re-initialised)."""
    full, _, full_losses = _train(tmp_path / "full", max_epochs=3)
    _, _, first = _train(tmp_path / "cut", max_epochs=3, stop_after=2)
    assert len(first) == 4
    calls = []
    monkeypatch.setattr(type(W.make_flow()), "initialize", lambda self, *a, **k: calls.append(1))
    resumed, _, rest = _train(tmp_path / "cut", max_epochs=3, flow_seed=99, resume_from=tmp_path / "cut")
    assert calls == []  # ActNorm state came from the checkpoint
    assert resumed.state.epoch == 3 and len(rest) == 2
    assert first + rest == full_losses
    assert max_state_diff(_state(full), _state(resumed)) <= 1e-6


def test_resume_skips_partial_corrupt_and_unknown_files(tmp_path):
    """a truncated newest checkpoint and temp files are ignored; the newest valid checkpoint is used."""
    _train(tmp_path, max_epochs=2)
    good = (tmp_path / "state_checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "state_checkpoint_epoch=7.pt").write_bytes(good[: len(good) // 2])  # killed mid-copy
    (tmp_path / ".state_checkpoint_epoch=8.pt.x1y2.tmp").write_bytes(good[:100])  # our temp file
    (tmp_path / "tmpa1b2c3").write_bytes(good[:100])  # Ignite DiskSaver's temp file
    path, ckpt = find_latest_checkpoint(tmp_path)
    assert path.name == "state_checkpoint_epoch=2.pt" and ckpt["trainer"]["iteration"] == 4
    trainer, _, losses = _train(tmp_path, max_epochs=3, resume_from=tmp_path)
    assert trainer.state.epoch == 3 and len(losses) == 2
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    _train(tmp_path, max_epochs=1)
    trainer, _, losses = _train(tmp_path, max_epochs=1, resume_from=tmp_path)
    assert losses == [] and trainer.resume_completed


class _Sentinel:
    """Unpickling this object would create a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    """every load path refuses it and the sentinel file never appears."""
    sentinel = tmp_path / "pwned.txt"
    _train(tmp_path / "run", max_epochs=1)
    evil = tmp_path / "run" / "state_checkpoint_epoch=5.pt"
    torch.save({"flow": {"w": torch.zeros(1)}, "payload": _Sentinel(sentinel)}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        _train(tmp_path / "other", resume_from=evil)
    path, _ = find_latest_checkpoint(tmp_path / "run")  # skips it, takes the valid epoch-1 file
    assert path.name == "state_checkpoint_epoch=1.pt"
    flow = W.make_flow()
    loader = CheckpointLoader(load_path=str(evil), load_dict={"flow": flow})
    with pytest.raises(pickle.UnpicklingError):  # MONAI's loader uses torch.load(weights_only=True) too
        loader(None)
    assert not sentinel.exists()


def test_nonfinite_loss_or_gradient_skips_the_step():
    """In one process: the parameters do not move at the bad iterations, and training goes on."""
    flow, data = _initialized_flow()
    net = FlowBitsPerDim(flow)
    trainer = FlowTrainer("cpu", 2, create_loader(data, 4, shuffle=True, seed=0), net,
                          torch.optim.AdamW(flow.parameters(), lr=1e-3), max_grad_norm=1.0)  # fmt: skip
    snapshots = {}

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def _bad_loss(engine):
        snapshots[engine.state.iteration] = [p.detach().clone() for p in flow.parameters()]
        if engine.state.iteration == 2:
            engine.state.output[Keys.LOSS] = engine.state.output[Keys.LOSS] * float("nan")

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _bad_grad(engine):
        if engine.state.iteration == 5:
            next(p for p in flow.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    norms = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: norms.append(e.state.output["grad_norm"]))
    trainer.run()
    after = {k: [p.detach().clone() for p in flow.parameters()] for k in (1,)}
    assert trainer.state.skipped_steps == 2 and trainer.state.iteration == 8
    for it in (2, 5):  # parameters before iteration it == before iteration it + 1
        assert all(torch.equal(a, b) for a, b in zip(snapshots[it], snapshots[it + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert all(torch.isfinite(p).all() for p in after[1])
    finite = [n for i, n in enumerate(norms) if i + 1 not in (2, 5)]
    assert all(math.isfinite(n) for n in finite)


def _initialized_flow():
    """The tiny flow, its ActNorms initialised on the first 8 of 16 records, and the records."""
    flow = W.make_flow()
    data = W.make_flow_data(16, 0)
    flow.initialize(torch.stack([d["image"] for d in data[:8]]), torch.stack([d["condition"] for d in data[:8]]))
    return flow, data


def _count_train_calls(module) -> list:
    """Wrap ``module.train`` so that each call's mode is appended to the returned list."""
    calls, original = [], module.train

    def counting_train(mode=True):
        calls.append(mode)
        return original(mode)

    module.train = counting_train
    return calls


def test_a_step_reads_the_device_once_and_the_handlers_read_a_host_copy(tmp_path):
    """The step copies the loss and the gradient norm to the host in one read (before: four ``.item()`` calls, one
    between the forward and the backward pass); the loss that the stats and TensorBoard handlers read afterwards is
    a host copy, so they do not wait for the optimiser step queued behind it."""
    flow, data = _initialized_flow()
    trainer = FlowTrainer("cpu", 1, create_loader(data, 4, shuffle=False, seed=0), FlowBitsPerDim(flow),
                          torch.optim.SGD(flow.parameters(), lr=1e-3), max_grad_norm=1.0)  # fmt: skip
    from monai.handlers import StatsHandler, TensorBoardStatsHandler, from_engine
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    loss_of = from_engine(["loss"], first=True)
    TensorBoardStatsHandler(summary_writer=writer, tag_name="bpd", output_transform=loss_of).attach(trainer)
    StatsHandler(tag_name="bpd", output_transform=loss_of, iteration_log=True).attach(trainer)
    counter, step_reads, all_reads, checks = load_benchmark("bench_trainer_host").HostCopies(), [], [], []

    def start(engine):
        counter.on, counter.device_reads = True, 0

    def step_done(engine):
        step_reads.append(counter.device_reads)
        counter.on = False  # this check's own reads do not count
        loss = engine.state.output[Keys.LOSS]
        pred = engine.state.output[Keys.PRED].detach()
        checks.append((loss.device.type, loss.requires_grad, float(loss), float(pred.mean())))
        counter.on = True

    def iteration_done(engine):
        all_reads.append(counter.device_reads)
        counter.on = False

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, step_done)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_done)  # after the stats and TensorBoard ones
    with counter:
        trainer.run()
    writer.close()
    assert step_reads == [1, 1, 1, 1] and all_reads == [1, 1, 1, 1]
    for device, requires_grad, loss, mean_pred in checks:
        assert device == "cpu" and not requires_grad and loss == pytest.approx(mean_pred, rel=1e-6)
    assert trainer.state.output["grad_norm"] > 0 and not trainer.state.output["skipped"]
    logged = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("bpd")
    assert [round(e.value, 4) for e in logged] == [round(c[2], 4) for c in checks]


class _StaticGradient(torch.autograd.Function):
    """``x @ w`` whose backward writes ``w``'s gradient into one persistent buffer and returns a detached view of
    it, as the backward graph of ``torch.cuda.make_graphed_callables`` (``cuda_graphs``) does."""

    @staticmethod
    def forward(ctx, x, w, buffer):
        ctx.save_for_backward(x)
        ctx.buffer = buffer
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.buffer.copy_(grad @ x)
        return None, ctx.buffer.detach(), None


class _GraphLikeLoss(torch.nn.Module):
    """Per-sample loss ``<x_b, w>`` with the gradient delivered like a replayed CUDA graph's."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(size))
        self.buffer = torch.zeros(size)  # the graph's static gradient, reused by every replay

    def forward(self, x, condition=None):
        return _StaticGradient.apply(x.flatten(1), self.w, self.buffer)


def test_the_gradient_of_a_graph_replay_is_not_added_to_the_previous_one():
    """A replayed backward writes the gradient into the graph's static buffer, which autograd then keeps as ``.grad``
    (no copy). Zeroing that ``.grad`` in place before the next step (MONAI's default ``optim_set_to_none=False``)
    made the next replay's gradient land in it and then be added to itself: every step after the first had twice
    the gradient (seen in review). The flow trainer sets gradients to ``None`` instead."""
    data = W.make_flow_data(8, 0)
    net = _GraphLikeLoss(data[0]["image"].numel())
    trainer = FlowTrainer("cpu", 2, create_loader(data, 4, shuffle=False, seed=0), net,
                          torch.optim.SGD(net.parameters(), lr=0.0), max_grad_norm=None)  # fmt: skip
    norms = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: norms.append(e.state.output["grad_norm"]))
    trainer.run()
    images = torch.stack([d["image"].flatten() for d in data])
    expected = [float(images[i : i + 4].mean(0).norm()) for i in (0, 4, 0, 4)]  # d mean_b <x_b, w> / dw
    assert norms == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="optim_set_to_none"):
        graphed = FlowBitsPerDim(W.make_flow(), cuda_graphs=True)
        FlowTrainer("cpu", 1, create_loader(data, 4, shuffle=False, seed=0), graphed,
                    torch.optim.SGD(graphed.parameters(), lr=0.0), optim_set_to_none=False)  # fmt: skip


def test_the_step_trains_in_train_mode_after_the_flow_was_put_in_eval_mode():
    """The step switches the network to train mode when any of its modules is not (an evaluator sharing the flow
    puts it in eval mode between epochs; a user may switch one submodule), and leaves it alone otherwise."""
    flow, data = _initialized_flow()
    net = FlowBitsPerDim(flow)
    trainer = FlowTrainer("cpu", 2, create_loader(data, 4, shuffle=False, seed=0), net,
                          torch.optim.SGD(flow.parameters(), lr=1e-3))  # fmt: skip
    modes, train_calls = [], _count_train_calls(net)
    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED,
                              lambda e: modes.append(all(m.training for m in net.modules())))  # fmt: skip
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: flow.eval())  # as a sharing evaluator does
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: flow.levels[0].eval())
    trainer.run()
    assert modes == [True] * 8
    assert train_calls == [True, True]  # after the epoch's eval() and after the submodule's eval(); not otherwise


def test_gradient_clipping_bounds_the_update_norm():
    flow = W.make_flow()
    data = W.make_flow_data(8, 0)
    flow.initialize(torch.stack([d["image"] for d in data]), torch.stack([d["condition"] for d in data]))
    params = list(flow.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    trainer = FlowTrainer("cpu", 1, create_loader(data, 8, shuffle=False, seed=0), FlowBitsPerDim(flow), optimizer,
                          max_grad_norm=1e-3)  # fmt: skip
    before = [p.detach().clone() for p in params]
    trainer.run()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert trainer.state.output["grad_norm"] > 1e-3 and step.item() == pytest.approx(1e-3, rel=1e-3)


def test_bits_per_dim_wrapper_for_a_flow_without_the_method():
    flow = W.make_flow()
    data = W.make_flow_data(4, 0)
    x, z = torch.stack([d["image"] for d in data]), torch.stack([d["condition"] for d in data])
    flow.initialize(x, z)

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, condition):
            return self.inner(x, condition)

    assert torch.allclose(FlowBitsPerDim(Plain(flow))(x, z), FlowBitsPerDim(flow)(x, z), atol=1e-5)


def test_condition_from_batch_or_frozen_classifier():
    torch.manual_seed(0)
    clf = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    clf.train()
    data = W.make_flow_data(6, 0)
    batch = {"image": torch.stack([d["image"] for d in data]), "label": torch.tensor([d["label"] for d in data]),
             "condition": torch.stack([d["condition"] for d in data])}  # fmt: skip
    x, y, (z,), kw = ConditionPrepareBatch()(batch, "cpu")
    assert torch.equal(z, batch["condition"]) and torch.equal(y, batch["label"]) and kw == {}
    x, _, (z,), _ = ConditionPrepareBatch(clf, prefer_batch_condition=False)(batch, "cpu")
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    assert torch.allclose(z, clf.embed(x)) and not z.requires_grad
    assert torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-5)
    no_cond = {"image": batch["image"]}
    assert torch.allclose(ConditionPrepareBatch(clf)(no_cond)[2][0], z)
    with pytest.raises(KeyError, match="condition"):
        ConditionPrepareBatch()(no_cond)
    # cached embeddings, in data order, put into the records
    cached = cache_embeddings(clf, [{"image": d["image"]} for d in data], batch_size=4)
    assert cached.shape == (6, 32) and torch.allclose(cached, z, atol=1e-5)
    records = attach_conditions([{"image": "a.png", "label": 0}] * 6, cached)
    assert records[2]["condition"].shape == (32,) and records[2]["image"] == "a.png"
    with pytest.raises(ValueError):
        attach_conditions(records[:2], cached)


def test_the_frozen_classifier_is_not_switched_per_batch_unless_a_module_trains():
    """A classifier in eval mode everywhere embeds without any train() / eval() walk (milliseconds of host time per
    batch for the paper PEPXNet); one with a module in training mode embeds in eval mode and gets its mode back."""
    torch.manual_seed(0)
    clf = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    prepare = ConditionPrepareBatch(clf)  # puts it in eval mode
    original_train = clf.train
    switches, seen = _count_train_calls(clf), []
    block = next(m for m in clf.modules() if isinstance(m, torch.nn.BatchNorm2d))
    block.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    x = torch.rand(3, 1, 32, 32)
    for _ in range(3):
        z = prepare({"image": x}, "cpu")[2][0]
    assert switches == [] and seen == [False] * 3
    assert torch.allclose(z, original_train(False).embed(x))
    seen.clear()
    block.train()  # one module in training mode: switched for the embedding, the classifier's mode restored after
    z2 = prepare({"image": x}, "cpu")[2][0]
    assert seen == [False] and switches == [False, False] and not block.training
    assert torch.equal(z2, z)


def test_the_classifier_embedding_graph_option_dispatches_and_falls_back(monkeypatch, caplog):
    """``cuda_graphs``: the CPU runs eagerly (same values); the replay serves only the recorded shape; a failed
    recording is reported once and the embedding runs eagerly from then on; a bad value names the config id."""
    import monai_condflow.utils.cuda_graphs as cg

    torch.manual_seed(0)
    clf = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    x = torch.rand(3, 1, 32, 32)
    graphed = ConditionPrepareBatch(clf, cuda_graphs=True)
    assert torch.equal(graphed({"image": x}, "cpu")[2][0], ConditionPrepareBatch(clf)({"image": x}, "cpu")[2][0])
    assert graphed._graphed is None  # nothing recorded on the CPU
    with pytest.raises(ValueError, match="'cuda_graphs' must be true or false"):
        ConditionPrepareBatch(clf, cuda_graphs="yes")

    recorded = []

    class FakeGraph:  # stands in for the CUDA graph: records its signature, "replays" by a marked result
        def __init__(self, fn, *args, name=""):
            recorded.append([list(a.shape) for a in args])
            self.sig = cg.signature(*args)

        def __call__(self, *args):
            return torch.full((args[0].shape[0], 32), 7.0)

    monkeypatch.setattr(cg, "GraphedCall", FakeGraph)
    prepare = ConditionPrepareBatch(clf, cuda_graphs=True)
    assert torch.equal(prepare._graphed_embedding(x), torch.full((3, 32), 7.0))
    assert prepare._graphed_embedding(x) is not None and recorded == [[[3, 1, 32, 32]]]  # recorded once
    assert prepare._graphed_embedding(torch.rand(2, 1, 32, 32)) is None  # another shape: eager
    for _ in range(3):  # the weights moved (the recording holds them, so their memory is not reused)
        clf.load_state_dict({k: v.clone() for k, v in clf.state_dict().items()}, assign=True)
        assert prepare._graphed_embedding(x) is not None  # recorded again, for the new weights
    assert len(recorded) == 4 and prepare._graphed_embedding(x) is not None and len(recorded) == 4
    # only the last weight replaced (a check of the first weight alone, used before, missed it)
    last = [n for n, _ in clf.named_parameters()][-1]
    clf.load_state_dict({last: clf.state_dict()[last].clone()}, strict=False, assign=True)
    assert prepare._graphed_embedding(x) is not None and len(recorded) == 5
    assert prepare._graphed_embedding(x) is not None and len(recorded) == 5
    # other numerics (the graph replays the kernels chosen at recording): autocast on, then TF32 switched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepare._graphed_embedding(x) is not None and len(recorded) == 6
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not before
        assert prepare._graphed_embedding(x) is not None and len(recorded) == 7
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert prepare._graphed_embedding(x) is not None and len(recorded) == 8
    assert prepare._graphed_embedding(x) is not None and len(recorded) == 8

    def failing(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg, "GraphedCall", failing)
    broken = ConditionPrepareBatch(clf, cuda_graphs=True)
    with caplog.at_level("WARNING"):
        assert broken._graphed_embedding(x) is None and broken._graphed_embedding(x) is None
    warnings = [r for r in caplog.records if "could not record the classifier's embedding" in r.getMessage()]
    assert len(warnings) == 1 and "not permitted" in warnings[0].getMessage()


def test_training_with_the_classifier_computing_z_on_the_fly(tmp_path):
    torch.manual_seed(0)
    clf = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    frozen = {k: v.clone() for k, v in clf.state_dict().items()}
    data = [{"image": d["image"], "label": d["label"]} for d in W.make_flow_data(8, 0)]
    trainer, _ = create_flow_trainer(W.make_flow(), clf, create_loader(data, 8, shuffle=True, seed=0), device="cpu",
                                     max_epochs=1, output_dir=tmp_path, tensorboard=False)  # fmt: skip
    trainer.run()
    assert math.isfinite(trainer.state.output[Keys.LOSS].item())
    assert all(torch.equal(frozen[k], v) for k, v in clf.state_dict().items())  # BN stats too: eval mode


@pytest.mark.parametrize(
    "kwargs",
    [{"max_epochs": 0}, {"lr": 0.0}, {"lr_decay": 1.5}, {"sample_temperature": 0.0}, {"val_interval": 0},
     {"max_grad_norm": -1.0}, {"warmup_epochs": -1}, {"tensorboard": True, "max_grad_norm": 0.0}],
)  # fmt: skip
def test_bad_settings_are_refused(tmp_path, kwargs):
    data = W.make_flow_data(8, 0)
    args = {"device": "cpu", "max_epochs": 1, "output_dir": tmp_path, "tensorboard": False, **kwargs}
    with pytest.raises(ValueError):
        create_flow_trainer(W.make_flow(), None, create_loader(data, 8, shuffle=True, seed=0), **args)
    assert not os.listdir(tmp_path)
