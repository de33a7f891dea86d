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
Compiled flow steps (``ConditionalGlow.compile_steps``, bundle id ``compile``) against the eager flow, measured in
the same run: training step (per-sample bits/dim, backward, AdamW) and sampling, on twin models with the same
weights, in interleaved rounds (eager, compiled, eager, compiled, ...), so that a load swing hits both.

Prints per preset: the compilation time (the first compiled training step and the first compiled sample, each
minus an eager one), the median step / sample time of each, the paired per-round ratios eager / compiled (above 1:
compiled is faster), and the largest difference of the loss, the gradients and the samples. The last line is
``json=<every figure>``.

    .venv/bin/python benchmarks/bench_compile_steps.py                      # small at 64 px batch 32, paper batch 8
    .venv/bin/python benchmarks/bench_compile_steps.py --presets small --rounds 5 --backend aot_eager  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.engines.flow import FlowBitsPerDim  # noqa: E402
from monai_condflow.networks.blocks.compiled_steps import compiled_steps  # noqa: E402
from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402

BATCHES = {"small": 32, "paper": 8}


def twins(preset: str, size: int, batch: int, seed: int, **overrides) -> tuple:
    """Two models with the same weights (every parameter perturbed, so no coupling is the identity), a batch, and
    the condition; training-time noise and condition dropout off so that both see the same loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = ((torch.rand(batch, 1, size, size, generator=g) * 255).round() + 0.5) / 256
    z = torch.nn.functional.normalize(torch.randn(batch, 32, generator=g), dim=1)
    flows = []
    for _ in range(2):
        torch.manual_seed(seed)
        flow = ConditionalGlow.from_preset(preset, image_size=size, cond_dropout=0.0, noise_std=0.0, **overrides)
        with torch.no_grad():
            pg = torch.Generator().manual_seed(seed + 1)
            for p in flow.parameters():
                fan_in = p[0].numel() if p.ndim >= 2 else 1
                p.add_(0.1 / fan_in**0.5 * torch.randn(p.shape, generator=pg))
        flow.initialize(x, z)
        flows.append(flow)
    return flows, x, z


def train_step(net: FlowBitsPerDim, opt: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor) -> tuple:
    opt.zero_grad(set_to_none=True)
    loss = net(x, z).mean()
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    opt.step()
    return loss.detach(), grads


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_preset(args: argparse.Namespace, preset: str) -> dict:
    batch = args.batch or BATCHES.get(preset, 16)
    (eager_flow, comp_flow), x, z = twins(preset, args.size, batch, args.seed, **json.loads(args.overrides))
    comp_flow.compile_steps(training=True, sampling=True, backend=args.backend)
    nets = [FlowBitsPerDim(f).train() for f in (eager_flow, comp_flow)]
    opts = [torch.optim.AdamW(f.parameters(), lr=1e-5) for f in (eager_flow, comp_flow)]
    # first steps: the compiled one holds the compilation
    t_eager0, (l_e, g_e) = timed(train_step, nets[0], opts[0], x, z)
    t_comp0, (l_c, g_c) = timed(train_step, nets[1], opts[1], x, z)
    loss_diff = float((l_e - l_c).abs())
    grad_diff_rel = float((g_e - g_c).abs().max() / g_e.abs().max().clamp_min(1e-30))
    train = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, i in (("eager", 0), ("compiled", 1)):
            train[name].append(timed(train_step, nets[i], opts[i], x, z)[0])
    for f in (eager_flow, comp_flow):
        f.eval()
    sample_z = z[: args.sample_batch] if args.sample_batch <= batch else z.repeat(-(-args.sample_batch // batch), 1)
    sample_z = sample_z[: args.sample_batch]

    def draw(flow):
        return flow.sample(sample_z, 0.9, generator=torch.Generator().manual_seed(3))

    t_s_eager0, s_e = timed(draw, eager_flow)
    t_s_comp0, s_c = timed(draw, comp_flow)
    sample_diff = float((s_e - s_c).abs().max())
    sample = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, flow in (("eager", eager_flow), ("compiled", comp_flow)):
            sample[name].append(timed(draw, flow)[0])

    def summary(times: dict) -> dict:
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
        return {
            "eager_ms": round(1000 * statistics.median(times["eager"]), 1),
            "compiled_ms": round(1000 * statistics.median(times["compiled"]), 1),
            "paired_ratio_median": round(statistics.median(ratios), 3),
            "paired_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        }

    return {
        "preset": preset,
        "size": args.size,
        "batch": batch,
        "sample_batch": len(sample_z),
        "backend": args.backend,
        "threads": torch.get_num_threads(),
        "compile_train_s": round(t_comp0 - t_eager0, 1),
        "compile_sample_s": round(t_s_comp0 - t_s_eager0, 1),
        "train": summary(train),
        "sample": summary(sample),
        "loss_abs_diff": loss_diff,
        "grad_max_abs_diff_rel": grad_diff_rel,
        "sample_max_abs_diff": sample_diff,
        "compiled_calls": compiled_steps(comp_flow).calls,
        "compile_failed": compiled_steps(comp_flow).failed,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,paper")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: small 32, paper 8)")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--overrides", default="{}", help="JSON of ConditionalGlow arguments for every preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.sample_batch < 1:
        parser.error("--rounds and --sample-batch must be >= 1.")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = []
        for preset in [p for p in args.presets.split(",") if p]:
            result = bench_preset(args, preset)
            print(f"{preset}: {json.dumps(result)}", flush=True)
            results.append(result)
    finally:
        torch.set_num_threads(threads)  # a caller (the test suite) keeps its own setting
    print("json=" + json.dumps(results, separators=(",", ":")), flush=True)
    return results


if __name__ == "__main__":
    main()
