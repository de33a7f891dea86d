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
The GPU check of ``docs/performance.md``: training and sampling speed, memory and numerical error of the flow in
each precision mode, eager and with CUDA graphs, and the synthetic-set writer, through the library's own code paths
(``FlowBitsPerDim`` with ``cuda_graphs``, ``precision_context`` and the coupling autocast of the trainer,
``ConditionalGlow.graph_sampling``, ``generate``). ``benchmarks/gpu_check.sh`` runs it (and a short end-to-end
bundle run); ``--cpu`` runs the same sections small on the CPU (the ``small`` preset cut to 2 levels of 2 steps,
unless ``--preset`` is given; the ``+compile`` modes with the ``aot_eager`` backend, which traces but generates no
code, unless ``--compile-backend`` is given; the CUDA-graph modes then report ``graphed:
false``), which is what the test suite does.

Sections (each prints its lines as it ends, a failed section prints its error and the others still run):

- ``train``: per batch size and mode (``fp32``, ``tf32``, ``bf16``, ``tf32+graphs``, ``bf16+graphs``,
  ``bf16+compile``, ``bf16+compile+graphs``, ``bf16+graphs+ld1``, ``bf16+graphs+cw``, ``bf16+graphs+lu1+cw+ld1``;
  any precision with ``+compile``, ``+graphs``, ``+lu1``, ``+cw`` and / or ``+ld1``: ``+lu1`` composes the 1x1
  convolutions' weights one by one instead of together, the CUDA default since the twenty-sixth session,
  ``ConditionalGlow.compose_convs_together``; ``+cw`` keeps the convolution weights contiguous instead of
  channels-last, the flow's layout since the twenty-seventh session; ``+ld1`` adds the data-independent
  log-determinants layer by layer instead of once per level, the CUDA default since the twenty-eighth session,
  ``ConditionalGlow.batch_constant_logdets``) a fresh model (same
  seed; every parameter perturbed by ``0.1 / sqrt(fan_in)`` before the ActNorm initialisation, so no layer is the
  identity), the trainer's step (zero_grad, per-sample bits/dim, backward, clipping at 50, one read of the device for
  the finiteness checks, AdamW), images/s over the timed steps, peak memory, the warm-up's wall time (with
  ``+compile`` it holds the compilation: ``ConditionalGlow.compile_steps``, the bundle id ``compile``), and after
  training: the round trip ``max |decode(encode(x)) - x|`` in the mode and ``max |bpd_mode - bpd_fp32|`` of the same
  weights.
- ``trainer``: the bundle's flow trainer (``create_flow_trainer``: EMA, TensorBoard, stats, the warm-up schedule,
  fused AdamW, the frozen PEPXNet embedding each batch) in ``--trainer-modes`` at the first batch size, images/s of
  its second epoch, next to the bare step of ``train`` in the same mode: what a user's run gets (the gap also holds
  the classifier's embedding, the EMA average and cuDNN's deterministic mode, which the bare step does not have).
- ``profile``: where an eager and a compiled step spend their time (``torch.profiler``, the first batch size,
  ``--profile-modes``, the mean of ``--profile-steps`` steps): per step the device events (kernels, copies, sets),
  the device's busy time against the wall time, and the operations / kernels with the most self time. The first
  ``+compile`` mode's warm-up holds the compilation; later modes reuse the compiled code (it is cached per step
  shape in the process, whatever the model).
- ``graphs_exact``: the graphed training step against the eager one on the same weights and batches (no noise, no
  condition dropout): loss and gradient differences, on the recorded batch and on a new one.
- ``sample``: ``sample()`` images/s (modes ``fp32``, ``tf32``, ``tf32+graphs``, ``bf16+graphs``,
  ``bf16+compile+graphs``: the decoder's steps compiled, ``compile_steps(sampling=True)``, the bundle id
  ``compile`` of ``generate.json``) at the sampling batch, the warm-up's wall time, peak memory, and the samples
  against the eager ones.
- ``write``: ``generate()`` of a synthetic set (``--write-formats``, default PNG and NIfTI as ``generate.json``)
  with ``--write-threads`` writer threads and with 1, images/s.

The measurements run in priority order (:func:`plan`: the target mode ``bf16+graphs``, then the bundle's trainer,
then the compiled and graphed mode, then the comparisons), each only if its estimated time fits in ``--budget-s``
(:class:`Budget`; a GPU run gets what ``gpu_check.sh``'s 470 s leave). The tables and the issue's targets, judged,
follow (:func:`summarize`); the last line is ``json=<every figure>``. ``--out DIR`` writes ``DIR/gpu_check.json``
before and after every measurement (a run stopped at its time limit keeps what it measured and names the measurement
it was in) and ``DIR/gpu_check.md``; ``--summarize FILE`` prints the tables of a saved ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # before the imports below (torch, the package): --budget-s counts from here

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_flow_gpu import make_batch, reset_peak, sync  # noqa: E402  (sibling script: benchmarks/ is on sys.path)
from bench_trainer_host import process_state, restore  # noqa: E402

from monai_condflow.engines.flow import FlowBitsPerDim  # noqa: E402
from monai_condflow.engines.generation import generate  # noqa: E402
from monai_condflow.networks.blocks.compiled_steps import compiled_steps  # noqa: E402
from monai_condflow.networks.blocks.coupling import set_coupling_dtype  # noqa: E402
from monai_condflow.networks.blocks.squeeze import conv_weights_to  # noqa: E402
from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402
from monai_condflow.utils.determinism import cudnn_flags  # noqa: E402
from monai_condflow.utils.io import atomic_write_json  # noqa: E402
from monai_condflow.utils.precision import coupling_dtype, precision_context  # noqa: E402

# "+lu1": the 1x1 convolutions' weights composed one by one (as before the twenty-sixth session) instead of
# together (ConditionalGlow.compose_convs_together, the CUDA default); "+cw": the convolution weights contiguous (as
# before the twenty-seventh session) instead of channels-last; "+ld1": the constant log-determinants per layer (as
# before the twenty-eighth session) instead of per level (ConditionalGlow.batch_constant_logdets, the CUDA default);
# "+tune": cuDNN autotunes its convolution algorithms (cudnn.benchmark on, what the bundle id ``deterministic`` false
# does; the other rows run with the process's flags: no autotuning, PyTorch's default).
# First among the comparisons, the A/B of the switches: "+tune" (twenty-ninth session), "+ld1" and "+cw" each alone,
# "+lu1+cw+ld1" all three (the FlowSequential and _exp changes stay in every mode)
TRAIN_MODES = ("bf16+graphs+tune", "bf16+graphs+ld1", "bf16+graphs+cw", "bf16+graphs+lu1+cw+ld1", "fp32", "tf32",
               "bf16", "tf32+graphs", "bf16+graphs", "bf16+compile", "bf16+compile+graphs")  # fmt: skip
# the modes that the targets are measured on (run first)
TARGET_MODES = ("bf16+graphs",)
CPU_FLOW = {"num_levels": 2, "num_steps": 2, "num_blocks": (1, 1), "hidden_channels": 16}
SAMPLE_MODES = ("fp32", "tf32", "tf32+graphs", "bf16+graphs", "bf16+compile+graphs", "bf16+graphs+cw",
                "bf16+graphs+tune")
PRECISIONS = ("fp32", "tf32", "bf16")


def parse_mode(mode: str) -> tuple[str, bool, bool]:
    """``"bf16+compile+graphs"`` -> ``("bf16", True, True)``: precision, compiled steps, CUDA graphs (the option
    ``"+lu1"``, the 1x1 convolutions composed one by one, is read by :func:`one_by_one`, ``"+cw"``, contiguous
    convolution weights, by :func:`contiguous_weights`, ``"+ld1"``, log-determinants per layer, by
    :func:`logdets_per_layer`, ``"+tune"``, cuDNN's autotuning, by :func:`autotuned`).

    Raises:
        ValueError: an unknown precision or option.
    """
    precision, *options = mode.split("+")
    known = {"compile", "graphs", "lu1", "cw", "ld1", "tune"}
    if precision not in PRECISIONS or not set(options) <= known or len(set(options)) < len(options):
        raise ValueError(
            f"unknown mode {mode!r}: one of {list(PRECISIONS)}, then '+compile', '+graphs', '+lu1', '+cw', '+ld1' "
            "and / or '+tune'"
        )
    return precision, "compile" in options, "graphs" in options


def _option(mode: str, name: str) -> bool:
    return name in mode.split("+")[1:]


def one_by_one(mode: str) -> bool:
    """Whether ``mode`` composes the 1x1 convolutions' weights one by one (``"+lu1"``)."""
    return _option(mode, "lu1")


def logdets_per_layer(mode: str) -> bool:
    """Whether ``mode`` adds the data-independent log-determinants layer by layer (``"+ld1"``)."""
    return _option(mode, "ld1")


def autotuned(mode: str) -> bool:
    """Whether ``mode`` lets cuDNN autotune its convolution algorithms (``"+tune"``)."""
    return _option(mode, "tune")


@contextmanager
def cudnn_for(mode: str) -> Iterator[None]:
    """Inside the block cuDNN autotunes (``benchmark`` on, ``deterministic`` off) if ``mode`` says ``"+tune"``;
    otherwise the process's flags stay as they are. Put back afterwards either way."""
    before = cudnn_flags()
    if autotuned(mode):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before["deterministic"]
        torch.backends.cudnn.benchmark = before["benchmark"]


def autotuning(device: torch.device) -> bool:
    """Whether cuDNN autotunes the convolutions on ``device`` now (``cudnn.benchmark`` on; the CPU has no cuDNN)."""
    return device.type == "cuda" and cudnn_flags()["benchmark"]


def set_pass_options(flow: ConditionalGlow, mode: str) -> None:
    """The training pass's switches of ``mode``: the 1x1 weights composed together and the constant log-determinants
    per level (``None``: on CUDA, the defaults) unless ``"+lu1"`` / ``"+ld1"``; the weights' layout (``"+cw"``)."""
    flow.compose_convs_together = False if one_by_one(mode) else None
    flow.batch_constant_logdets = False if logdets_per_layer(mode) else None
    set_weight_layout(flow, mode)


def contiguous_weights(mode: str) -> bool:
    """Whether ``mode`` keeps the flow's convolution weights contiguous (``"+cw"``) instead of channels-last."""
    return _option(mode, "cw")


def set_weight_layout(flow: ConditionalGlow, mode: str) -> None:
    """The flow's 2-D convolution weights channels-last (how ``ConditionalGlow`` builds them) or, with ``"+cw"``,
    contiguous (values unchanged)."""
    conv_weights_to(flow, torch.contiguous_format if contiguous_weights(mode) else torch.channels_last)


def weights_layout(flow: ConditionalGlow) -> str:
    """The layout of ``flow``'s convolution weights with kernels larger than 1x1 (for a 1x1 kernel both layouts
    are the same strides): ``"channels_last"``, ``"contiguous"`` or ``"mixed"``, read off the weights."""
    weights = [m.weight for m in flow.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[2:].numel() > 1]
    if all(w.is_contiguous(memory_format=torch.channels_last) for w in weights):
        return "channels_last"
    return "contiguous" if all(w.is_contiguous() for w in weights) else "mixed"


def convs_together(flow: ConditionalGlow, device: torch.device) -> bool:
    """Whether ``flow``'s training passes composed the 1x1 convolutions' weights together: on CUDA unless set off
    (``+lu1``), and not where compiled steps ran (they compose their own)."""
    compiler = compiled_steps(flow)
    compiled = compiler is not None and not compiler.failed and compiler.calls > 0
    together = flow.compose_convs_together
    return bool((device.type == "cuda" if together is None else together) and not compiled)


def logdets_batched(flow: ConditionalGlow, device: torch.device) -> bool:
    """Whether ``flow``'s training passes summed the constant log-determinants per level: on CUDA unless set off
    (``+ld1``), and not where compiled steps ran (they keep their own sums)."""
    compiler = compiled_steps(flow)
    compiled = compiler is not None and not compiler.failed and compiler.calls > 0
    batched = flow.batch_constant_logdets
    return bool((device.type == "cuda" if batched is None else batched) and not compiled)


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def build_flow(args: argparse.Namespace, device: torch.device, x: torch.Tensor, z: torch.Tensor, **overrides: Any):
    torch.manual_seed(args.seed)
    flow = ConditionalGlow.from_preset(args.preset, image_size=args.size, **{**args.flow_overrides, **overrides})
    flow = flow.to(device)
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed + 1)
        for p in flow.parameters():  # std 0.1 / sqrt(fan_in), zero-initialised convolutions included
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.add_(0.1 / fan_in**0.5 * torch.randn(p.shape, generator=g).to(device))
        flow.initialize(x, z)
    return flow


def train_step(net: FlowBitsPerDim, opt: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor, precision: str):
    """The flow trainer's step without the engine (``FlowTrainer._iteration``): one read of the device per step (the
    loss and the gradient norm together, after the backward pass; the eleventh session's figures had two, one between
    the forward and the backward pass)."""
    opt.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = net(x, z).mean()
        loss.backward()
    params = [p for p in net.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 50.0, error_if_nonfinite=False)
    loss_value, norm_value = torch.stack([loss.detach(), grad_norm.to(loss.dtype)]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        opt.step()
    return loss.detach()


def train_setup(args: argparse.Namespace, device: torch.device, batch: int, mode: str) -> tuple:
    """A fresh model in ``mode`` with its loss module, optimiser and three batches."""
    precision, compiled, graphs = parse_mode(mode)
    batches = [make_batch(batch, args.size, torch.Generator().manual_seed(args.seed + i), device) for i in range(3)]
    flow = build_flow(args, device, *batches[0])
    set_coupling_dtype(flow, coupling_dtype(precision))
    set_pass_options(flow, mode)
    net = FlowBitsPerDim(flow, cuda_graphs=graphs).train()
    if compiled:  # what the bundle id ``compile`` does (FlowBitsPerDim(compile=True)), with the chosen backend
        flow.compile_steps(backend=args.compile_backend)
    fused = {"fused": True} if args.fused_adam and device.type == "cuda" else {}
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-5, weight_decay=1e-6, betas=(0.5, 0.999), **fused)
    return precision, flow, net, opt, batches, bool(fused)


def bench_train(args: argparse.Namespace, device: torch.device, batch: int, mode: str) -> dict:
    with cudnn_for(mode):
        return _bench_train(args, device, batch, mode)


def _bench_train(args: argparse.Namespace, device: torch.device, batch: int, mode: str) -> dict:
    precision, flow, net, opt, batches, fused = train_setup(args, device, batch, mode)
    reset_peak(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(net, opt, *batches[i % 3], precision)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [train_step(net, opt, *batches[i % 3], precision) for i in range(args.steps)]
    sync(device)
    seconds = time.perf_counter() - t0
    out = {
        "batch": batch,
        "mode": mode,
        "train_img_s": round(batch * args.steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "peak_mib": peak_mib(device),
        "warmup_s": round(warmup_s, 2),
        "graphed": bool(net.graphed is not None and net.graphed.replays > 0),
        "compiled": bool(getattr(flow, "steps_compiled", False) and compiled_steps(flow).calls > 0),
        "fused_adam": fused,
        "convs_together": convs_together(flow, device),
        "logdets_batched": logdets_batched(flow, device),
        "conv_weights": weights_layout(flow),
        "cudnn_autotuned": autotuning(device),
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    flow.eval()
    x, z = batches[0]
    with torch.no_grad():
        with precision_context(precision):
            nu, _ = flow(x, z)
            x_back, _ = flow.inverse(nu, z)
            bpd_mode = flow.bits_per_dim(x, z)
        set_coupling_dtype(flow, None)
        with precision_context("fp32"):
            bpd_ref = flow.bits_per_dim(x, z)
    out["roundtrip_max_abs"] = float((x_back - x).abs().max())
    out["bpd_max_abs_diff_vs_fp32"] = float((bpd_mode - bpd_ref).abs().max())
    out["bpd_fp32_mean"] = round(float(bpd_ref.mean()), 4)
    return out


def bench_trainer(args: argparse.Namespace, device: torch.device, batch: int, mode: str, root: Path) -> dict:
    """The bundle's flow trainer in ``mode`` (what a user's run gets): :func:`create_flow_trainer` with the EMA,
    TensorBoard, the stats handler, the warm-up schedule, AdamW (fused on CUDA) and the frozen PEPXNet computing each
    batch's condition, on ``--trainer-iters`` batches of ``batch`` images per epoch for 2 epochs. The second epoch,
    from its start to the end of its last iteration (the data loading and every handler of the iterations included,
    the epoch's checkpoint not; the device synchronised only at the two ends), gives images/s. Set against the bare
    step of the ``train`` section in the same mode, the gap holds more than the engine's host work: the classifier's
    embedding and the EMA average are device work the bare step does not do, and the trainer runs with cuDNN
    deterministic (``set_determinism``, as every seeded run of the bundle; the bare step does not). The random
    generators and cuDNN flags are put back afterwards."""
    from ignite.engine import Events

    from monai_condflow.engines.flow_trainer import create_flow_trainer
    from monai_condflow.networks.nets.pepx_net import PEPXNet
    from monai_condflow.utils.distributed import create_loader

    # the trainer seeds every generator and makes cuDNN deterministic for the process (set_determinism, as a
    # user's run does), and this section seeds too: put all back afterwards, so that the sections after this one
    # run as they would without it
    state = process_state()
    precision, compiled, graphs = parse_mode(mode)
    iters = args.trainer_iters
    marks: list[float] = []
    flags: dict[str, bool] = {}

    def mark(engine: Any) -> None:  # the device is synchronised only here, not at every iteration
        sync(device)
        marks.append(time.perf_counter())
        flags.setdefault("cudnn_deterministic", bool(torch.backends.cudnn.deterministic))  # as the timed epoch ran
        flags.setdefault("cudnn_benchmark", bool(torch.backends.cudnn.benchmark))

    folder = Path(tempfile.mkdtemp(prefix="trainer_", dir=root))
    trainer = None
    t0 = time.perf_counter()
    try:
        x, _ = make_batch(batch * iters, args.size, torch.Generator().manual_seed(args.seed), torch.device("cpu"))
        records = [{"image": x[i], "label": i % 2} for i in range(len(x))]
        torch.manual_seed(args.seed)
        classifier = PEPXNet.from_preset(args.trainer_classifier, spatial_dims=2, in_channels=1, out_channels=2)
        classifier = classifier.to(device).eval()
        loader = create_loader(records, batch, shuffle=True, seed=args.seed, drop_last=True)
        init_x = x[:batch].to(device)
        with torch.no_grad():
            init_z = classifier.embed(init_x)
        flow = build_flow(args, device, init_x, init_z)
        set_pass_options(flow, mode)
        trainer, _ = create_flow_trainer(
            flow, classifier, loader, None, device=device, max_epochs=2, output_dir=folder, lr=1e-5, warmup_epochs=1,
            ema_decay=0.99, tensorboard=True, log_every=10, precision=precision, cuda_graphs=graphs, compile=compiled,
            seed=args.seed, deterministic=not autotuned(mode),
        )  # fmt: skip
        trainer.add_event_handler(Events.EPOCH_STARTED(once=2), mark)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2 * iters), mark)  # the second epoch's last one
        reset_peak(device)
        trainer.run()
    finally:
        if trainer is not None and trainer.output_lock is not None:  # released by run(); not if it never ran
            trainer.output_lock.release()
            trainer.output_lock = None
        shutil.rmtree(folder, ignore_errors=True)
        restore(state)
    total_s = time.perf_counter() - t0
    seconds = marks[1] - marks[0]
    graphed = trainer.network.graphed if hasattr(trainer.network, "graphed") else None
    graphed_embedding = getattr(trainer.prepare_batch, "_graphed", None)
    return {
        "batch": batch,
        "mode": mode,
        "trainer_img_s": round(batch * iters / seconds, 1),
        "ms_per_iteration": round(1000 * seconds / iters, 2),
        "peak_mib": peak_mib(device),
        "setup_and_run_s": round(total_s, 2),
        "skipped_steps": int(trainer.state.skipped_steps),
        "graphed": bool(graphed is not None and graphed.replays > 0),
        "compiled": bool(getattr(flow, "steps_compiled", False) and compiled_steps(flow).calls > 0),
        "convs_together": convs_together(flow, device),
        "logdets_batched": logdets_batched(flow, device),
        "conv_weights": weights_layout(flow),
        "classifier": args.trainer_classifier,
        # whether the classifier's embedding replayed as a CUDA graph (a failed recording runs it eagerly)
        "classifier_graphed": bool(graphed_embedding is not None and graphed_embedding[1].replays > 0),
        "cudnn_deterministic": flags["cudnn_deterministic"],
        "cudnn_autotuned": device.type == "cuda" and flags["cudnn_benchmark"],
    }


def graphs_exact(args: argparse.Namespace, device: torch.device) -> dict:
    """Graphed vs eager training step: same weights, same batches, no random regulariser, fp32 (TF32 off)."""
    b1, b2 = (make_batch(args.batch, args.size, torch.Generator().manual_seed(s), device) for s in (args.seed, 99))
    flow = build_flow(args, device, *b1, cond_dropout=0.0, noise_std=0.0).train()
    eager, graphed = FlowBitsPerDim(flow), FlowBitsPerDim(flow, cuda_graphs=True)
    out: dict[str, Any] = {}
    for name, (x, z) in (("recorded_batch", b1), ("new_batch", b2)):
        grads = []
        losses = []
        for net in (eager, graphed):
            flow.zero_grad(set_to_none=True)
            with precision_context("fp32"):
                loss = net(x, z).mean()
                loss.backward()
            losses.append(float(loss.detach()))
            del loss  # an eager autograd graph kept alive breaks the next recording (AccumulateGrad streams)
            grads.append(torch.cat([p.grad.reshape(-1) for p in flow.parameters() if p.grad is not None]))
        scale = float(grads[0].abs().max())
        out[name] = {
            "loss_abs_diff": abs(losses[0] - losses[1]),
            "grad_max_abs_diff_rel": float((grads[0] - grads[1]).abs().max()) / max(scale, 1e-30),
        }
    out["graphed"] = bool(graphed.graphed is not None and graphed.graphed.replays > 0)
    return out


def profile_train(args: argparse.Namespace, device: torch.device, mode: str) -> dict:
    """Where one training step of ``mode`` spends its time, after the warm-up (and compilation)."""
    from torch.profiler import ProfilerActivity, profile

    precision, flow, net, opt, batches, _ = train_setup(args, device, args.batch, mode)
    for i in range(args.warmup):
        train_step(net, opt, *batches[i % 3], precision)
    sync(device)
    cuda = device.type == "cuda"
    steps = args.profile_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            train_step(net, opt, *batches[i % 3], precision)
        sync(device)
    wall_ms = 1000 * (time.perf_counter() - t0) / steps
    events = prof.key_averages()

    def self_us(e) -> float:  # microseconds of self time on the device (GPU) or the CPU
        if cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    # device events (kernels, copies, sets), without the GPU ranges of user annotations (``Optimizer.step#...``,
    # inductor's regions), which span kernels already counted: torch's own table leaves them out too
    kernels = [
        e
        for e in events
        if cuda and str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False)
    ]
    rows = kernels if cuda else list(events)
    top = sorted(rows, key=self_us, reverse=True)[: args.profile_top]
    busy_ms = sum(self_us(e) for e in rows) / 1000 / steps
    return {
        "mode": mode,
        "batch": args.batch,
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 2),
        ("device_busy_ms_per_step" if cuda else "cpu_self_ms_per_step"): round(busy_ms, 2),
        "device_events_per_step": round(sum(e.count for e in kernels) / steps, 1) if cuda else None,
        "compiled": bool(getattr(flow, "steps_compiled", False) and compiled_steps(flow).calls > 0),
        "conv_weights": weights_layout(flow),
        "top": [{"name": e.key[:90], "calls_per_step": round(e.count / steps, 1),
                 "ms_per_step": round(self_us(e) / 1000 / steps, 3)} for e in top],  # fmt: skip
    }


def bench_sample(args: argparse.Namespace, device: torch.device, mode: str) -> dict:
    with cudnn_for(mode):
        return _bench_sample(args, device, mode)


def _bench_sample(args: argparse.Namespace, device: torch.device, mode: str) -> dict:
    precision, compiled, graphs = parse_mode(mode)
    x, z = make_batch(args.sample_batch, args.size, torch.Generator().manual_seed(args.seed), device)
    flow = build_flow(args, device, x, z).eval()
    set_coupling_dtype(flow, coupling_dtype(precision))
    set_weight_layout(flow, mode)  # sampling too: cuDNN copies contiguous weights to channels-last at every call
    if graphs:
        flow.graph_sampling()
    if compiled:
        flow.compile_steps(training=False, sampling=True, backend=args.compile_backend)

    def generator() -> torch.Generator:
        """The latents' generator, on the device as generate() has it (a CPU generator would add a host draw of
        512 x 4096 normals and a copy to every timed batch)."""
        return torch.Generator(device).manual_seed(1)

    with precision_context(precision):
        t0 = time.perf_counter()
        flow.sample(z, 0.9, generator=generator())  # warm-up (compilation, graph recording)
        sync(device)
        warmup_s = time.perf_counter() - t0
        reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(args.sample_reps):
            s = flow.sample(z, 0.9, generator=generator())
        sync(device)
        seconds = time.perf_counter() - t0
        out = {
            "mode": mode,
            "batch": args.sample_batch,
            "sample_img_s": round(args.sample_batch * args.sample_reps / seconds, 1),
            "peak_mib": peak_mib(device),
            "warmup_s": round(warmup_s, 2),
            "graphed": bool(graphs and flow.graph_sampling_recorded),
            "compiled": bool(compiled and flow.steps_compiled and compiled_steps(flow).calls > 0),
            "conv_weights": weights_layout(flow),
            "cudnn_autotuned": autotuning(device),
        }
        if graphs or compiled:
            flow.graph_sampling(False)
            flow.compile_steps(False)
            eager = flow.sample(z, 0.9, generator=generator())
            out["vs_eager_max_abs"] = float((s - eager).abs().max())
    return out


def flops_per_image(args: argparse.Namespace, device: torch.device) -> dict:
    """Floating-point operations per image of the check's model, counted by ``torch.utils.flop_counter`` on 2 images
    (convolutions and matrix products, 2 per multiply-add; elementwise work is not counted): the training pass
    (forward and backward of ``-log p(x | z)``) and sampling at temperature 0.9. Every mode computes the same products
    (precision, graphs and compilation change how, not how many), so a row's TFLOP/s is its img/s times these: how
    much of the card's arithmetic the step uses, i.e. whether it is bound by the arithmetic or by everything else."""
    from torch.utils.flop_counter import FlopCounterMode

    x, z = make_batch(2, args.size, torch.Generator().manual_seed(args.seed), device)
    flow = build_flow(args, device, x, z).train()
    with FlopCounterMode(display=False) as counter:
        (-flow.log_prob(x, z).mean()).backward()
    train = counter.get_total_flops() / len(x)
    flow.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        flow.sample(z, 0.9)
    sample = counter.get_total_flops() / len(x)
    return {"train_gflop_per_image": float(f"{train / 1e9:.6g}"),
            "sample_gflop_per_image": float(f"{sample / 1e9:.6g}")}  # fmt: skip


def _tflop_s(img_s: float | None, gflop: float | None) -> float | None:
    """TFLOP/s of a row (``None`` where the count failed or is missing: an older record)."""
    return None if img_s is None or gflop is None else round(img_s * gflop / 1000, 2)


def bench_write(args: argparse.Namespace, device: torch.device, n_images: int, threads: int, root: Path) -> dict:
    x, z = make_batch(64, args.size, torch.Generator().manual_seed(args.seed), device)
    flow = build_flow(args, device, x, z).eval()
    records = [{"image": x[i].cpu(), "condition": z[i].cpu(), "label": i % 2} for i in range(64)]
    target = root / f"synthetic_t{threads}"
    t0 = time.perf_counter()
    with precision_context("tf32"):
        manifest = generate(
            flow, None, records, output_dir=target, model_version="gpu_check", mode="n_per_class",
            n_per_class=n_images // 2, formats=args.write_formats, batch_size=args.sample_batch, device=device,
            progress=False, writer_threads=threads, cuda_graphs=device.type == "cuda",
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    files = {fmt: len(list(target.glob(f"synthetic_*.{suffix}")))
             for fmt, suffix in (("png", "png"), ("nifti", "nii.gz")) if fmt in args.write_formats}  # fmt: skip
    written = min(files.values())  # images with every format written
    lines = manifest.read_text().count("\n") - 1
    shutil.rmtree(target, ignore_errors=True)
    return {"requested": n_images, "images": written, "manifest_rows": lines, "threads": threads,
            "formats": "+".join(args.write_formats),
            "files": sum(files.values()), "seconds": round(seconds, 2),
            "img_s": round(written / seconds, 1)}  # fmt: skip


TARGETS = {"train_img_s": {80: 2000.0, 320: 4000.0}, "sample_img_s": 20000.0, "write_s": 60.0, "roundtrip": 1e-2,
           "bpd_diff": 0.01}  # issue 18 (paper preset, 1x64x64, one H100 / H200)


def _fmt(value: Any, digits: int = 1) -> str:
    """A figure for the tables (``-`` where there is none); ``digits < 0``: scientific (error figures)."""
    if value is None:
        return "-"
    if digits < 0:
        return f"{value:.1e}"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def summarize(results: dict) -> str:
    """The figures as Markdown tables (what ``docs/performance.md`` takes) and each target of issue 18 as met / not
    met / not measured. A training mode counts for the target only with its round trip and bits/dim error inside
    the bounds."""
    lines = [f"## GPU check: {results['env'].get('device')} (torch {results['env'].get('torch')}, "
             f"{results['env'].get('preset')} preset, {results['env'].get('size')} px)", ""]  # fmt: skip
    flops = results["env"].get("flops") or {}
    train_gflop, sample_gflop = flops.get("train_gflop_per_image"), flops.get("sample_gflop_per_image")
    if train_gflop is not None:
        lines += [f"Per image: {train_gflop:,.3f} GFLOP per training pass, {sample_gflop:,.3f} GFLOP per sample "
                  "(convolutions and matrix products; TFLOP/s = img/s x these).", ""]  # fmt: skip
    elif "error" in flops:
        lines += [f"FLOPs per image not counted: {flops['error']}", ""]
    lines += ["| batch | mode | img/s | ms / step | peak MiB | warm-up s | round trip | bpd diff vs fp32 | ran as | "
              "TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    missing = [
        f"{_named(name, r)}: {r.get('skipped') or r.get('error')}"
        for name in ("train", "trainer", "sample", "write", "graphs_exact", "profile")
        for r in results.get(name, [])
        if not measured(r)
    ]
    if "running" in results:  # gpu_check.json of a run stopped during a measurement
        running = dict(results["running"])
        missing.append(f"{_named(running.pop('section'), running)}: did not end (the run was stopped or crashed)")
    for r in sorted(filter(measured, results.get("train", [])), key=lambda r: (r["batch"], _order(r["mode"]))):
        lines.append(f"| {r['batch']} | {r['mode']} | {_fmt(r['train_img_s'])} | {_fmt(r['ms_per_step'])} | "
                     f"{_fmt(r['peak_mib'], 0)} | {_fmt(r['warmup_s'])} | {_fmt(r['roundtrip_max_abs'], -1)} | "
                     f"{_fmt(r['bpd_max_abs_diff_vs_fp32'], -1)} | {_ran_as(r)} | "
                     f"{_fmt(_tflop_s(r['train_img_s'], train_gflop), 2)} |")  # fmt: skip
    trainer_rows = list(filter(measured, results.get("trainer", [])))
    if trainer_rows:
        bare = {(r["batch"], r["mode"]): r["train_img_s"] for r in filter(measured, results.get("train", []))}
        lines += ["", "| bundle trainer: batch | mode | img/s | ms / iteration | bare step img/s | trainer / bare | "
                  "peak MiB | ran as | classifier graphed | cuDNN deterministic |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in trainer_rows:
            step = bare.get((r["batch"], r["mode"]))
            ratio = None if step is None else round(r["trainer_img_s"] / step, 2)
            keys = ("classifier_graphed", "cudnn_deterministic")
            yes = {k: "-" if k not in r else "yes" if r[k] else "no" for k in keys}  # "-": an older record
            lines.append(f"| {r['batch']} | {r['mode']} | {_fmt(r['trainer_img_s'])} | "
                         f"{_fmt(r['ms_per_iteration'])} | {_fmt(step)} | {_fmt(ratio, 2)} | "
                         f"{_fmt(r['peak_mib'], 0)} | {_ran_as(r)} | {yes['classifier_graphed']} | "
                         f"{yes['cudnn_deterministic']} |")  # fmt: skip
    lines += ["", "| sampling mode | batch | img/s | peak MiB | warm-up s | vs eager | ran as | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(filter(measured, results.get("sample", [])), key=lambda r: _order(r["mode"])):
        lines.append(f"| {r['mode']} | {r['batch']} | {_fmt(r['sample_img_s'])} | {_fmt(r['peak_mib'], 0)} | "
                     f"{_fmt(r['warmup_s'])} | {_fmt(r.get('vs_eager_max_abs'), -1)} | {_ran_as(r)} | "
                     f"{_fmt(_tflop_s(r['sample_img_s'], sample_gflop), 2)} |")  # fmt: skip
    lines += [""] + [f"- {w['images']:,} images ({w.get('formats', 'png')}, {w.get('files', w['images']):,} files), "
                     f"{w['threads']} writer thread(s): {w['seconds']} s ({w['img_s']} img/s)"
                     for w in filter(measured, results.get("write", []))]  # fmt: skip
    lines += ["", "Targets (issue 18):"]
    exact = [
        r
        for r in filter(measured, results.get("train", []))
        if r["loss_finite"] and r["roundtrip_max_abs"] <= TARGETS["roundtrip"]
        and r["bpd_max_abs_diff_vs_fp32"] <= TARGETS["bpd_diff"]
    ]  # fmt: skip
    for batch, target in TARGETS["train_img_s"].items():
        rows = [r for r in exact if r["batch"] == batch]
        lines.append(_target_line(f"training at batch {batch}", target, rows, "train_img_s", "img/s"))
    # a sampling mode counts only with its samples within the round-trip bound of the eager decoder's
    rows = [r for r in filter(measured, results.get("sample", []))
            if r["batch"] == 512 and r.get("vs_eager_max_abs", 0.0) <= TARGETS["roundtrip"]]  # fmt: skip
    lines.append(_target_line("sampling at batch 512", TARGETS["sample_img_s"], rows, "sample_img_s", "img/s"))
    big = [w for w in filter(measured, results.get("write", [])) if w.get("requested", w["images"]) == 60000]
    if big:
        w = big[0]
        complete = w["images"] == 60000 and w["manifest_rows"] == 60000
        met = "met" if complete and w["seconds"] <= TARGETS["write_s"] else "not met"
        short = "" if complete else f", only {w['images']:,} images / {w['manifest_rows']:,} manifest rows"
        lines.append(f"- 60,000 images written in <= {TARGETS['write_s']:.0f} s: {met} ({w['seconds']} s, "
                     f"{w.get('formats', 'png')}{short})")
    else:
        lines.append("- 60,000 images written in <= 60 s: not measured")
    if missing:
        lines += ["", "Not measured:"] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def _named(section: str, record: dict) -> str:
    """``"train batch 80, mode fp32"``: a section and the label of one of its measurements."""
    label = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("skipped", "error", "wall_s"))
    return f"{section} {label}" if label else section


def _order(mode: str) -> tuple:
    """Table order: precision, then eager, graphs, compile, compile + graphs; ``+ld1``, ``+cw``, ``+lu1`` and
    ``+tune`` rows after their mode's."""
    precision, compiled, graphs = parse_mode(mode)
    return (PRECISIONS.index(precision), compiled, graphs, contiguous_weights(mode), one_by_one(mode),
            logdets_per_layer(mode), autotuned(mode))  # fmt: skip


def _ran_as(r: dict) -> str:
    """What a mode actually ran as (a graph mode on the CPU, or after a failed recording, runs eagerly)."""
    ran = (("compiled", r.get("compiled")), ("graphed", r.get("graphed")),
           ("cuDNN autotuned", r.get("cudnn_autotuned")))
    return " + ".join(n for n, on in ran if on) or "eager"


def measured(r: dict) -> bool:
    """A measurement's record, not a skipped or failed one."""
    return "skipped" not in r and "error" not in r


def _target_line(what: str, target: float, rows: list[dict], key: str, unit: str) -> str:
    if not rows:
        return f"- {what} >= {target:,.0f} {unit}: not measured"
    best = max(rows, key=lambda r: r[key])
    met = "met" if best[key] >= target else "not met"
    return f"- {what} >= {target:,.0f} {unit}: {met} (best {best[key]:,.1f}, {best['mode']})"


# What a measurement of each kind may take on a GPU (paper preset, 64 px, batches 80 / 320, seconds), before one of
# that kind and batch size has run; afterwards the longest measured one of that kind and size (x 1.25). The compile
# kinds are guesses (a cold inductor compilation of the 64-step model has not been timed on a GPU; 106 s on 2 CPU
# cores).
GPU_ESTIMATES_S = {
    "train": 20.0, "train+compile": 180.0, "profile": 20.0, "profile+compile": 180.0, "graphs_exact": 20.0,
    "sample": 15.0, "sample+compile": 120.0, "write": 75.0, "write_1": 20.0, "trainer": 45.0,
    "trainer+compile": 180.0,
}  # fmt: skip


class Budget:
    """A time budget for the measurements: one starts only if its estimated time fits in what is left.

    Args:
        seconds: the whole budget (``None``: no limit, every measurement runs).
        estimates: kind -> estimated seconds of a measurement of that kind before one of that kind and size has run
            (a kind not listed: 0, i.e. it runs while any time is left); afterwards 1.25x the longest measured one
            of that kind and size (a batch of 320 is not estimated from one of 80).
        start: ``time.perf_counter()`` value the budget counts from (default: now).
    """

    def __init__(self, seconds: float | None, estimates: dict[str, float] | None = None,
                 start: float | None = None) -> None:  # fmt: skip
        self.seconds = seconds
        self.start = time.perf_counter() if start is None else start
        self.estimates = dict(estimates or {})
        self.measured: dict[tuple[str, Any], float] = {}

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def estimate(self, kind: str, size: Any = None) -> float:
        if (kind, size) in self.measured:
            return 1.25 * self.measured[(kind, size)]
        return self.estimates.get(kind, 0.0)

    def why_not(self, kind: str, size: Any = None) -> str | None:
        """``None`` when a measurement of ``kind`` (and ``size``) fits, else why it does not."""
        left = self.left()
        if left is None:
            return None
        if left <= 0:
            return "the --budget-s time budget is spent"
        need = self.estimate(kind, size)
        return None if need <= left else f"needs ~{need:.0f} s of the budget, {left:.0f} s left"

    def record(self, kind: str, seconds: float, size: Any = None) -> None:
        self.measured[(kind, size)] = max(seconds, self.measured.get((kind, size), 0.0))


def run_section(
    name: str, fn, results: dict, budget: Budget | None = None, kind: str | None = None, label: dict | None = None
) -> dict:
    """Run one measurement, print its line and return its record; a failure is reported as ``error``, and a
    measurement that does not fit in ``budget`` (see :class:`Budget`; ``kind`` defaults to ``name``, the size is the
    label's batch) is not run but reported as ``skipped``; both carry ``label`` (e.g. the mode and batch), which a
    measurement's own figures hold."""
    kind = kind or name
    size = (label or {}).get("batch")
    reason = None if budget is None else budget.why_not(kind, size)
    t0 = time.perf_counter()
    if reason is not None:
        value: Any = {**(label or {}), "skipped": reason}
    else:
        if torch.cuda.is_available():  # free the graphs and memory pools of the measurements before this one
            gc.collect()
            torch.cuda.empty_cache()
        try:
            value = fn()
        except Exception as e:  # a failed section is reported and the others still run
            value = {**(label or {}), "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        wall = time.perf_counter() - t0
        if budget is not None:
            budget.record(kind, wall, size)
        if isinstance(value, dict):
            value["wall_s"] = round(wall, 2)
    results.setdefault(name, []).append(value)
    print(f"{name}: {json.dumps(value)}", flush=True)
    return value


def priority(mode: str) -> int:
    """0: the mode the issue's targets were last measured in (``bf16+graphs``); 1: the compiled and graphed mode
    (the lever not yet measured on a GPU); 2: the comparisons."""
    if mode in TARGET_MODES:
        return 0
    _, compiled, graphs = parse_mode(mode)
    return 1 if compiled and graphs else 2


def plan(args: argparse.Namespace, device: torch.device, modes: list[str], profile_modes: list[str],
         sections: set[str], root: Path) -> list[tuple[str, str, Any, dict]]:
    """The measurements as ``(section, kind, fn, label)``, in the order they run, so that a budget that runs out
    drops the least needed figures: first the target modes (:func:`priority` 0: training at every batch, then
    sampling), then the bundle's trainer in ``--trainer-modes`` (what a user's run gets, against the bare step; ~45
    s), then the compiled and graphed ones (1: a cold compilation, never yet timed on a GPU, may take what is left of
    the budget), then the comparisons (2: the other modes, the graphed step's exactness, the profiles, the writes).
    ``kind`` names the time estimate (:class:`Budget`); whether a compiled training or profile run pays the
    compilation is decided when it runs (:func:`run_kind`)."""
    batches = [int(b) for b in args.batches.split(",")]
    groups: list[list] = [[], [], []]
    if "train" in sections:
        for mode in modes:
            for batch in batches:
                fn = lambda b=batch, m=mode: bench_train(args, device, b, m)  # noqa: E731
                groups[priority(mode)].append(("train", "train", fn, {"batch": batch, "mode": mode}))
    if "sample" in sections:
        for mode in SAMPLE_MODES:
            fn = lambda m=mode: bench_sample(args, device, m)  # noqa: E731
            kind = "sample+compile" if parse_mode(mode)[1] else "sample"
            groups[priority(mode)].append(("sample", kind, fn, {"batch": args.sample_batch, "mode": mode}))
    trainer_runs = []  # the user-facing figure: before the compilations, whose time on a GPU is not known
    if "trainer" in sections:
        for mode in args.trainer_modes:
            fn = lambda m=mode: bench_trainer(args, device, args.batch, m, root)  # noqa: E731
            trainer_runs.append(("trainer", "trainer", fn, {"batch": args.batch, "mode": mode}))
    if "graphs_exact" in sections:
        groups[2].append(("graphs_exact", "graphs_exact", lambda: graphs_exact(args, device), {}))
    if "profile" in sections:
        for mode in profile_modes:
            fn = lambda m=mode: profile_train(args, device, m)  # noqa: E731
            groups[2].append(("profile", "profile", fn, {"batch": args.batch, "mode": mode}))
    if "write" in sections:
        n, small_n = args.write_images, max(args.write_images // 10, 2)
        groups[2].append(("write", "write", lambda: bench_write(args, device, n, args.write_threads, root),
                          {"images": n, "threads": args.write_threads}))
        groups[2].append(("write", "write_1", lambda: bench_write(args, device, small_n, 1, root),
                          {"images": small_n, "threads": 1}))  # fmt: skip
    return groups[0] + trainer_runs + groups[1] + groups[2]


def compiled_by(section: str, kind: str, record: dict) -> bool:
    """Whether a measurement left the training step compiled at its batch size for the ones after it: a compiled
    training or profile run that paid the compilation and ended (a skipped or failed one may have compiled nothing;
    the compiled decoder does not cover the training step)."""
    return section in ("train", "profile", "trainer") and kind.endswith("+compile") and measured(record)


def run_kind(section: str, kind: str, label: dict, compiled_at: set) -> str:
    """The estimate's kind of a measurement about to run: a compiled training or profile run at a batch size where
    no compiled run has ended yet pays the compilation (``train+compile``, ``profile+compile``); later ones reuse the
    compiled code (cached per step shape in the process). ``compiled_at``: the batch sizes of the compiled runs that
    ended (a skipped one compiled nothing)."""
    compiling = section in ("train", "profile", "trainer") and parse_mode(label["mode"])[1]
    if compiling and label["batch"] not in compiled_at:
        return f"{section}+compile"
    return kind


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """The first SIGTERM ends the run through its ``finally`` blocks; later ones (``timeout`` signals the process
    group too) are ignored so that the clean-up is not cut (``timeout -k`` still bounds it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small and on the CPU (what the test suite runs)")
    parser.add_argument("--preset", default=None, help="default: paper (small with --cpu)")
    parser.add_argument("--size", type=int, default=None, help="default: 64 (16 with --cpu)")
    parser.add_argument("--batches", default=None, help="training batch sizes, default 80,320 (4 with --cpu)")
    parser.add_argument("--modes", default=",".join(TRAIN_MODES), help="training modes (see the docstring)")
    parser.add_argument("--profile-modes", default="bf16,bf16+compile", help="modes of the profile section")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=15, help="operations / kernels listed per mode")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sample-batch", type=int, default=None, help="default 512 (8 with --cpu)")
    parser.add_argument("--sample-reps", type=int, default=None)
    parser.add_argument("--write-images", type=int, default=None, help="default 60000 (40 with --cpu)")
    parser.add_argument("--write-threads", type=int, default=16)
    parser.add_argument("--write-formats", default="png,nifti",
                        help="formats of the written sets (default: generate.json's, PNG and NIfTI)")  # fmt: skip
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                        help="AdamW(fused=True) on CUDA, as train_flow.json does there (default; --no-fused-adam: "
                        "the multi-tensor AdamW)")  # fmt: skip
    parser.add_argument("--trainer-modes", default="bf16+graphs", help="modes of the trainer section")
    parser.add_argument("--trainer-iters", type=int, default=None, help="iterations per epoch (default 20; 3 --cpu)")
    parser.add_argument("--trainer-classifier", default=None,
                        help="PEPXNet preset computing the condition (default paper; small with --cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default="train,trainer,profile,graphs_exact,sample,write")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the +compile modes (default inductor; aot_eager with --cpu)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the measurements, counted from the process start: one starts only if "
                        "its estimated time fits in what is left (default 250 on a GPU, none with --cpu; gpu_check.sh "
                        "passes what its 8 minutes leave)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                        help="only print the tables and targets of a gpu_check.json (e.g. of a run cut at its time "
                        "limit) and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize is not None:
        try:
            results = json.loads(args.summarize.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--summarize: cannot read {args.summarize}: {e}")
        print(summarize(results), flush=True)
        return results
    small = args.cpu
    device = torch.device("cpu" if small else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the small CPU check.")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}.")
    args.write_formats = tuple(f for f in args.write_formats.split(",") if f)
    if not args.write_formats or not set(args.write_formats) <= {"png", "nifti"}:
        parser.error(f"--write-formats: png and / or nifti, got {','.join(args.write_formats)!r}.")
    tiny = small and args.preset is None
    if args.compile_backend is None:  # the CPU check runs the script's paths; bench_compile_steps.py times inductor
        args.compile_backend = "aot_eager" if small else "inductor"
    defaults = {"preset": ("paper", "small"), "size": (64, 16), "batches": ("80,320", "4"), "warmup": (3, 1),
                "steps": (10, 2), "sample_batch": (512, 8), "sample_reps": (5, 1), "write_images": (60000, 40),
                "trainer_iters": (20, 3), "trainer_classifier": ("paper", "small")}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if small else gpu)
    args.batch = int(args.batches.split(",")[0])
    # the CPU check's model: the small preset cut to 2 levels of 2 steps (3 step shapes to compile instead of 6)
    args.flow_overrides = CPU_FLOW if tiny else {}
    modes = [m for m in args.modes.split(",") if m]
    profile_modes = [m for m in args.profile_modes.split(",") if m]
    args.trainer_modes = [m for m in args.trainer_modes.split(",") if m]
    if args.trainer_iters < 2:
        parser.error(f"--trainer-iters must be >= 2, got {args.trainer_iters}.")
    for option, values in (("--modes", modes), ("--profile-modes", profile_modes),
                           ("--trainer-modes", args.trainer_modes)):  # fmt: skip
        for m in values:
            try:
                parse_mode(m)
            except ValueError as e:
                parser.error(f"{option}: {e}.")
    sections = set(args.sections.split(","))
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "flow_overrides": args.flow_overrides,
        "compile_backend": args.compile_backend,
        "fused_adam": bool(args.fused_adam and device.type == "cuda"),
        "size": args.size,
    }
    try:  # a second or two on a GPU; the tables' TFLOP/s columns
        env["flops"] = flops_per_image(args, device)
    except Exception as e:  # noqa: BLE001 - the measurements do not depend on it
        env["flops"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"env: {json.dumps(env)}", flush=True)
    results: dict[str, Any] = {"env": env}
    seconds = args.budget_s if args.budget_s is not None else (None if small else 250.0)
    budget = Budget(seconds, None if small else GPU_ESTIMATES_S, start=STARTED)
    json_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        json_path = args.out / "gpu_check.json"
    # a time limit's SIGTERM (gpu_check.sh) ends the run through the finally blocks (the write folders removed)
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="gpu_check_write_"))
    compiled_at: set = set()
    try:
        for section, kind, fn, label in plan(args, device, modes, profile_modes, sections, root):
            kind = run_kind(section, kind, label, compiled_at)
            if json_path is not None:  # before and after every measurement: a run killed at its time limit keeps
                # what it measured and names the measurement it was in
                atomic_write_json(json_path, {**results, "running": {"section": section, **label}})
            value = run_section(section, fn, results, budget, kind, label)
            if compiled_by(section, kind, value):
                compiled_at.add(label["batch"])
            if json_path is not None:
                atomic_write_json(json_path, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_handler)
    summary = summarize(results)
    print(summary, flush=True)
    if args.out is not None:
        (args.out / "gpu_check.md").write_text(summary)
    print(f"json={json.dumps(results, separators=(',', ':'))}", flush=True)
    return results


if __name__ == "__main__":
    main()
