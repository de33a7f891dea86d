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
"""Operations per training step of the flow: what a CUDA-graphed GPU step replays, one kernel (or more) each.

A CUDA graph removes the host's launch overhead, not the kernels: each replayed kernel still costs the GPU a few
microseconds however small its work, so at the paper's batch a step of thousands of tiny kernels has a floor that
does not shrink with the batch (``docs/performance.md``, "Operations per training step"). This benchmark counts, on
the CPU, the operations of one training pass (``-log p(x | z)``, forward and backward; nothing else) that compute,
i.e. those that launch kernels on a GPU (views, detaches and other metadata operations are not counted), for a
preset, in three configurations:

* ``one_by_one`` (the peer, this project's pass before the twenty-sixth session but for that session's
  ``FlowSequential`` change, which cannot be switched off): each 1x1 convolution composes its own weight, the
  coupling networks' convolution weights in the default contiguous layout;
* ``together_contiguous`` (the twenty-sixth session's GPU pass): one batched composition per size of 1x1
  convolution (``ConditionalGlow.compose_convs_together``), contiguous convolution weights;
* ``together`` (the twenty-seventh session's GPU pass): the same with the convolution weights channels-last, the
  activations' layout (since the twenty-seventh session, on every device);
* ``batched_logdets`` (today's GPU pass, but for the copy before ``exp`` of a channel slice, which the CPU keeps):
  the same with the data-independent log-determinants (ActNorm, 1x1 convolutions) summed once per level
  (``ConditionalGlow.batch_constant_logdets``, twenty-eighth session). The CPU pass is ``together`` with the 1x1
  convolutions one by one and the log-determinants per layer.

It also checks that all four give the same loss and gradients, and times a CPU pass of each.

Usage::

    python benchmarks/bench_step_ops.py --presets paper,small --batch 4 --reps 3

Last line ``BENCH_STEP_OPS {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.networks.blocks.actnorm import ActNorm  # noqa: E402
from monai_condflow.networks.blocks.invertible_conv import InvertibleConv1x1  # noqa: E402
from monai_condflow.networks.blocks.squeeze import conv_weights_to  # noqa: E402
from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402

# operations that only make another view of a tensor's memory (no kernel on a GPU)
VIEWS = frozenset(
    "detach view t expand _unsafe_view split split_with_sizes slice unsqueeze squeeze diagonal as_strided alias "
    "permute transpose unbind select lift_fresh _reshape_alias".split()
)
# operations that only allocate memory (no kernel either)
ALLOCATIONS = frozenset("empty empty_like empty_strided new_empty new_empty_strided".split())


class OpCounter(TorchDispatchMode):
    """Counts the operations that reach a kernel (every ATen call below autograd except the views of
    :data:`VIEWS` and the allocations of :data:`ALLOCATIONS`), in all and by name."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in VIEWS and name not in ALLOCATIONS:
            self.count += 1
            self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def training_pass(flow: ConditionalGlow, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``-log p(x | z)`` averaged and its gradients (fresh ``.grad``), as a training step computes them."""
    flow.zero_grad(set_to_none=True)
    loss = -flow.log_prob(x, z).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in flow.parameters() if p.grad is not None]


def build(preset: str, batch: int, seed: int) -> tuple[ConditionalGlow, torch.Tensor, torch.Tensor]:
    """The preset's flow, initialised on a batch of smooth images, every parameter nudged (no identity layer)."""
    g = torch.Generator().manual_seed(seed)
    flow = ConditionalGlow.from_preset(preset)
    size = flow.config["image_size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    x = torch.rand(batch, 1, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    z = torch.nn.functional.normalize(torch.randn(batch, flow.condition_dim, generator=g), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return flow.train(), x, z


# name: (1x1 convolutions composed together, convolution weights' layout, log-determinants summed per level)
CONFIGS = {
    "one_by_one": (False, torch.contiguous_format, False),
    "together_contiguous": (True, torch.contiguous_format, False),
    "together": (True, torch.channels_last, False),
    "batched_logdets": (True, torch.channels_last, True),
}


def _configure(flow: ConditionalGlow, name: str) -> None:
    together, layout, batched = CONFIGS[name]
    flow.compose_convs_together = together
    flow.batch_constant_logdets = batched
    conv_weights_to(flow, layout)


def measure(preset: str, batch: int, reps: int, seed: int = 0) -> dict:
    """Operations per pass and CPU milliseconds per pass of each of :data:`CONFIGS`, and the largest loss / gradient
    difference between the peer (``one_by_one``) and the others."""
    flow, x, z = build(preset, batch, seed)
    out: dict[str, Any] = {"preset": preset, "batch": batch, "convolutions": sum(len(g) for g in flow._conv_groups),
                           "sizes": len(flow._conv_groups),
                           "kxk_conv_weights": conv_weights_to(flow, torch.channels_last),
                           "constant_logdet_layers": sum(isinstance(m, (ActNorm, InvertibleConv1x1))
                                                         for m in flow.modules())}  # fmt: skip
    results = {}
    for name in CONFIGS:
        _configure(flow, name)
        training_pass(flow, x, z)  # warm-up
        flow.zero_grad(set_to_none=True)
        counter = OpCounter()
        with counter:  # the pass alone (its gradients are copied out after)
            loss = -flow.log_prob(x, z).mean()
            loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in flow.parameters() if p.grad is not None])
        out[f"ops_{name}"] = counter.count
        out[f"compose_ops_{name}"] = sum(counter.by_name.get(k, 0) for k in ("tril", "triu", "diag_embed", "mm", "bmm"))
        out[f"copy_ops_{name}"] = counter.by_name.get("copy_", 0)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(reps):  # alternating, so that a machine's drift hits all alike
        for name in CONFIGS:
            _configure(flow, name)
            t0 = time.perf_counter()
            training_pass(flow, x, z)
            times[name].append(time.perf_counter() - t0)
    flow.compose_convs_together = flow.batch_constant_logdets = None
    conv_weights_to(flow, torch.channels_last)
    loss_a, grads_a = results["one_by_one"]
    for name in ("together_contiguous", "together", "batched_logdets"):
        loss_b, grads_b = results[name]
        out[f"loss_diff_{name}"] = float((loss_a - loss_b).abs())
        out[f"grad_rel_diff_{name}"] = max(
            float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(grads_a, grads_b)
        )
    # the layout of the weights changes no value: bit-identical loss and gradients
    (loss_c, grads_c), (loss_d, grads_d) = results["together_contiguous"], results["together"]
    out["layout_bit_identical"] = bool(torch.equal(loss_c, loss_d)) and all(
        torch.equal(a, b) for a, b in zip(grads_c, grads_d)
    )
    # the log-determinants summed per level: the same gradients, the loss up to the order of its summation
    loss_e, grads_e = results["batched_logdets"]
    out["logdets_grads_bit_identical"] = all(torch.equal(a, b) for a, b in zip(grads_d, grads_e))
    out["logdets_loss_rel_diff"] = float((loss_d - loss_e).abs() / loss_d.abs().clamp_min(1e-30))
    out["loss_diff"] = max(out[f"loss_diff_{n}"] for n in ("together_contiguous", "together", "batched_logdets"))
    out["grad_rel_diff"] = max(
        out[f"grad_rel_diff_{n}"] for n in ("together_contiguous", "together", "batched_logdets")
    )
    out["ops_ratio"] = round(out["ops_batched_logdets"] / out["ops_one_by_one"], 3)
    for name, t in times.items():
        out[f"cpu_ms_{name}"] = round(1e3 * statistics.median(t), 1)
    out["cpu_time_ratio"] = round(out["cpu_ms_batched_logdets"] / out["cpu_ms_one_by_one"], 3)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="paper,small", help="comma-separated ConditionalGlow presets")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="timed passes of each, alternating")
    args = parser.parse_args(argv)
    rows = [measure(p, args.batch, args.reps) for p in args.presets.split(",")]
    print("| preset | batch | 1x1 convs (sizes) | ops / pass, one by one | together, contiguous weights | together, "
          "channels-last weights | + log-dets per level | ratio | composition ops | copies | CPU ms / pass, one by "
          "one | together, contiguous | together, channels-last | + log-dets per level | loss diff | largest "
          "gradient diff (relative) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['convolutions']} ({r['sizes']}) | {r['ops_one_by_one']:,} | "
              f"{r['ops_together_contiguous']:,} | {r['ops_together']:,} | {r['ops_batched_logdets']:,} | "
              f"{r['ops_ratio']:.3f} | {r['compose_ops_one_by_one']} -> {r['compose_ops_together']} | "
              f"{r['copy_ops_one_by_one']} -> {r['copy_ops_together']} | {r['cpu_ms_one_by_one']} | "
              f"{r['cpu_ms_together_contiguous']} | {r['cpu_ms_together']} | {r['cpu_ms_batched_logdets']} | "
              f"{r['loss_diff']:.1e} | {r['grad_rel_diff']:.1e} |")  # fmt: skip
    print("BENCH_STEP_OPS " + json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
