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
"""Speed and memory of :class:`~monai_condflow.networks.nets.ConditionalGlow` against normflows' multiscale Glow.

Both flows are built at a matched configuration (``--levels`` squeeze levels, ``--steps`` flow steps per level,
coupling hidden width ``--hidden``, input ``1 x size x size``) and measured side by side in one process, fp32 on
CPU, alternating ours / peer (the order flips every repetition), after warm-up. Reported per model:

* training-step images/s: forward + negative log-likelihood + backward + ``AdamW(foreach=True).step`` (median over
  ``--reps``);
* sampling images/s: one batch at temperature 0.9 under ``torch.no_grad`` (median over ``--reps``);
* peak memory: peak resident set size during two training steps (resp. two sampling batches) minus the resident
  size just before them, measured in a fresh subprocess per model and per phase, after imports, model construction,
  ActNorm initialisation on 2 images and a reset of the kernel's peak-RSS mark (Linux ``VmHWM``). It therefore
  counts activations, gradients, optimiser state and temporaries, not the weights. ``tracemalloc`` does not see
  torch's allocations; the RSS mark does (it also counts allocator caching, equally for both models).

Ours uses ``granularity=2`` by default (``--granularity``): its inner-level split then factors out half of the
channels like the peer's; the paper's default (4) carries more channels.

The condition of ours is a batch of unit 32-d vectors (the PEPXNet embedding); the peer is conditioned the way
normflows' Glow example does it, through a class-conditional base distribution (``ClassCondDiagGaussian``, 2
classes), so its couplings do not read a condition: the peer does slightly less work per step than ours.

Usage::

    python benchmarks/bench_flow.py --levels 3 --steps 8 --hidden 64 --batch 32 --reps 5 --threads 1
    python benchmarks/bench_flow.py --profile   # also prints where ours spends its time
    python benchmarks/bench_flow.py --no-memory --compile   # ours with torch.compile (+ the peer compiled)

The last line is ``train_ratio=<ours/peer> sample_ratio=<ours/peer>`` (images/s ratios, two decimals).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["build_ours", "build_peer", "main"]

TEMPERATURE = 0.9
CONDITION_DIM = 32
NUM_CLASSES = 2


@dataclass
class Candidate:
    """A model with the three operations the benchmark times; ``condition(batch)`` makes its condition."""

    name: str
    model: nn.Module
    condition: Callable[[int], torch.Tensor]
    initialize: Callable[[torch.Tensor, torch.Tensor], None]
    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor], torch.Tensor]


def _unit_condition(batch: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(batch, CONDITION_DIM), dim=1)


def _class_condition(batch: int) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,))


def build_ours(
    levels: int, steps: int, hidden: int, size: int, act: str | None = None, granularity: int = 2
) -> Candidate:
    """ConditionalGlow with ``levels`` levels of ``steps`` steps (one block each) and coupling width ``hidden``.

    ``granularity=2`` (the benchmark's default) factors out half of the inner levels' channels, like the peer's
    (standard Glow's) split; the model's own default, 4, is the paper's finer split and carries more channels.
    """
    from monai_condflow.networks.nets import ConditionalGlow

    # one block per level, so every level has ``steps`` steps like the peer; other settings are the defaults
    model = ConditionalGlow(
        spatial_dims=2,
        in_channels=1,
        condition_dim=CONDITION_DIM,
        num_levels=levels,
        image_size=size,
        num_steps=steps,
        num_blocks=1,
        hidden_channels=hidden,
        granularity=granularity,
        **({} if act is None else {"act": (act, {"inplace": True})}),
    )

    def initialize(x: torch.Tensor, c: torch.Tensor) -> None:
        model.initialize(x, c)

    return Candidate(
        name="ours",
        model=model,
        condition=_unit_condition,
        initialize=initialize,
        nll=lambda x, c: -model.log_prob(x, c).mean(),
        sample=lambda c: model.sample(c, temperature=TEMPERATURE),
    )


def build_peer(
    levels: int, steps: int, hidden: int, size: int, act: str | None = None, granularity: int = 2
) -> Candidate:
    """normflows multiscale Glow as in its Glow example: ``levels`` levels of ``steps`` GlowBlocks each.

    ``act`` and ``granularity`` are ignored: normflows' coupling network uses (leaky) ReLU and its split halves.
    """
    import normflows as nf

    channels = 1
    q0, merges, flows = [], [], []
    for i in range(levels):  # i = 0 is the deepest (generative-first) level
        width = channels * 2 ** (levels + 1 - i)
        level = [nf.flows.GlowBlock(width, hidden, split_mode="channel", scale=True) for _ in range(steps)]
        level += [nf.flows.Squeeze()]
        flows.append(level)
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (channels * 2 ** (levels - i), size // 2 ** (levels - i), size // 2 ** (levels - i))
        else:
            shape = (channels * 2 ** (levels + 1), size // 2**levels, size // 2**levels)
        q0.append(nf.distributions.ClassCondDiagGaussian(shape, NUM_CLASSES))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=True)

    def initialize(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():  # normflows' ActNorm initialises itself on the first forward pass
            model.log_prob(x, y)

    def sample(y: torch.Tensor) -> torch.Tensor:
        return model.sample(len(y), y=y, temperature=TEMPERATURE)[0]

    return Candidate(
        name="peer",
        model=model,
        condition=_class_condition,
        initialize=initialize,
        nll=lambda x, y: model.forward_kld(x, y),
        sample=sample,
    )


BUILDERS = {"ours": build_ours, "peer": build_peer}


def _images(batch: int, size: int, channels_last: bool = False) -> torch.Tensor:
    """Dequantised 8-bit images in [0, 1) (the flow's training input)."""
    x = (torch.randint(0, 256, (batch, 1, size, size)).float() + torch.rand(batch, 1, size, size)) / 256.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _build(name: str, args: argparse.Namespace) -> Candidate:
    candidate = BUILDERS[name](args.levels, args.steps, args.hidden, args.size, args.ours_act, args.granularity)
    if args.channels_last:
        candidate.model.to(memory_format=torch.channels_last)
    return candidate


def _prepare(name: str, args: argparse.Namespace) -> tuple[Candidate, torch.optim.Optimizer]:
    candidate = _build(name, args)
    batch = max(args.batch, 2)
    candidate.initialize(_images(batch, args.size, args.channels_last), candidate.condition(batch))
    # the same optimiser implementation for both (torch's CPU default is the per-parameter loop)
    optimizer = torch.optim.AdamW(candidate.model.parameters(), lr=1e-4, weight_decay=1e-6, foreach=True)
    return candidate, optimizer


def _train_step(candidate: Candidate, optimizer: torch.optim.Optimizer, x: torch.Tensor, c: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = candidate.nll(x, c)
    loss.backward()
    optimizer.step()
    elapsed = time.perf_counter() - start
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"{candidate.name}: non-finite loss {value}")
    return elapsed


def _sample_batch(candidate: Candidate, c: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = candidate.sample(c)
    elapsed = time.perf_counter() - start
    if out.shape[0] != c.shape[0]:
        raise RuntimeError(f"{candidate.name}: sample returned {tuple(out.shape)}")
    return elapsed


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_child(name: str, phase: str, args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: peak-RSS increase (MiB) of two training steps or two sampling batches.

    The kernel's peak-RSS mark (``VmHWM``) is reset after the set-up (``/proc/self/clear_refs`` = 5), so the
    figure is ``peak RSS during the phase - RSS before it``. Where the reset is not allowed it falls back to
    ``ru_maxrss`` (which then cannot see below the set-up's own peak and may read 0).
    """
    torch.manual_seed(0)
    candidate = _build(name, args)
    candidate.initialize(_images(2, args.size, args.channels_last), candidate.condition(2))
    optimizer = torch.optim.AdamW(candidate.model.parameters(), lr=1e-4, foreach=True)
    x, c = _images(args.batch, args.size, args.channels_last), candidate.condition(args.batch)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, method = _proc_status_kib("VmRSS"), "VmHWM"
    except OSError:
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    for _ in range(2):
        if phase == "train":
            _train_step(candidate, optimizer, x, c)
        else:
            _sample_batch(candidate, c)
    peak = _proc_status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak - base) / 1024.0, "method": method}))  # both in KiB on Linux


def _measure_memory(name: str, phase: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{name}:{phase}"]
    for key in ("levels", "steps", "hidden", "batch", "size", "threads", "granularity"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--ours-act", args.ours_act] if args.ours_act else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child {name}:{phase} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def _profile_ours(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    candidate, optimizer = _prepare("ours", args)
    x, c = _images(args.batch, args.size, args.channels_last), candidate.condition(args.batch)
    _train_step(candidate, optimizer, x, c)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        with record_function("train_step"):
            _train_step(candidate, optimizer, x, c)
        with record_function("sample"):
            _sample_batch(candidate, c)
    print("\n== profile of ours: one training step + one sampling batch (self CPU time) ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def _gflops_per_image(candidate: Candidate, args: argparse.Namespace, batch: int = 2) -> tuple[float, float]:
    """Counted (not timed) GFLOP per image of a training step (forward + backward) and of sampling."""
    from torch.utils.flop_counter import FlopCounterMode

    x, c = _images(batch, args.size, args.channels_last), candidate.condition(batch)
    with FlopCounterMode(display=False) as counter:
        candidate.nll(x, c).backward()
    train = counter.get_total_flops()
    candidate.model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        candidate.sample(c)
    return train / batch / 1e9, counter.get_total_flops() / batch / 1e9


def _compile_candidate(candidate: Candidate) -> Candidate:
    """The same model with ``torch.compile``: ours through its own opt-in (``compile_sampling``) and a compiled
    ``log_prob``; the peer with its ``forward_kld`` and ``sample`` compiled. Nothing is compiled until first used."""
    model = candidate.model
    if candidate.name == "ours":
        log_prob = torch.compile(model.log_prob)
        model.compile_sampling()
        return Candidate("ours+compile", model, candidate.condition, candidate.initialize,
                         lambda x, c: -log_prob(x, c).mean(), candidate.sample)  # fmt: skip
    forward_kld, sample = torch.compile(model.forward_kld), torch.compile(model.sample)
    return Candidate("peer+compile", model, candidate.condition, candidate.initialize, forward_kld,
                     lambda y: sample(len(y), y=y, temperature=TEMPERATURE)[0])  # fmt: skip


def _compile_and_check(
    eager: Candidate, compiled: Candidate, optimizer: torch.optim.Optimizer, x: torch.Tensor, c: torch.Tensor
) -> dict[str, float]:
    """Compile (first training step, first sampling batch: timed as the compile times) and compare with eager.

    Returns the compile times (s, the first call including its own run) and the max. abs. differences compiled vs
    eager of the batch's log-likelihood and of a sample drawn from the same noise (ours: the same latents decoded
    eagerly; the peer: the same RNG seed, with inductor's ``fallback_random`` so it draws the noise eagerly).
    """
    out: dict[str, float] = {}
    start = time.perf_counter()
    _train_step(compiled, optimizer, x, c)
    out["compile_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _sample_batch(compiled, c)
    out["compile_sample_s"] = time.perf_counter() - start
    if eager.model is not compiled.model:  # a separate eager copy (the peer): give it the compiled one's weights
        eager.model.load_state_dict(compiled.model.state_dict())
    out["nll_diff"] = abs(float(compiled.nll(x, c).detach()) - float(eager.nll(x, c).detach()))
    with torch.no_grad():
        if compiled.name.startswith("ours"):
            model = compiled.model
            nu = torch.randn(len(c), model.latent_dim(), generator=torch.Generator().manual_seed(1)) * TEMPERATURE
            reference = model.inverse(nu, c)[0].clamp(0.0, 1.0)
            sample = model.sample(c, temperature=TEMPERATURE, generator=torch.Generator().manual_seed(1))
        else:
            torch.manual_seed(1)
            reference = eager.sample(c)
            torch.manual_seed(1)
            sample = compiled.sample(c)
    out["sample_diff"] = float((sample - reference).abs().max())
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=3, help="squeeze levels (image side divisible by 2**levels)")
    parser.add_argument("--steps", type=int, default=8, help="flow steps per level")
    parser.add_argument("--hidden", type=int, default=64, help="coupling network hidden width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--granularity",
        type=int,
        default=2,
        help="fine-grained split factor of ours (2: halve like the peer / standard Glow; 4: the paper's default)",
    )
    parser.add_argument("--ours-act", default=None, help="coupling activation of ours (default: the model's, ELU)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs, both models")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="opt-in: time ours with torch.compile (training: compiled log_prob; sampling: compile_sampling) against "
        "the eager peer, plus an extra line with the peer compiled the same way; compile times are reported "
        "separately and excluded from the throughput; peak memory is then not measured",
    )
    parser.add_argument("--profile", action="store_true", help="also profile ours (torch.profiler)")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size % 2**args.levels:
        parser.error(f"--size {args.size} must be divisible by 2**levels = {2**args.levels}")
    if min(args.levels, args.steps, args.hidden, args.batch, args.reps, args.threads) < 1 or args.warmup < 0:
        parser.error("levels, steps, hidden, batch, reps and threads must be >= 1; warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; prints a table and, last, ``train_ratio=... sample_ratio=...``.

    Returns:
        The measured figures (images/s, MiB, ratios) by name.
    """
    args = _parse(argv)
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")  # raised inside normflows' LU 1x1 conv
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, phase = args.memory_child.split(":")
        _memory_child(name, phase, args)
        return {}
    torch.manual_seed(args.seed)
    candidates = {name: _prepare(name, args) for name in ("ours", "peer")}
    data = {
        name: (_images(args.batch, args.size, args.channels_last), cand.condition(args.batch))
        for name, (cand, _) in candidates.items()
    }
    flops = {name: _gflops_per_image(cand, args) for name, (cand, _) in candidates.items()}  # eager, before compiling
    compile_info: dict[str, dict[str, float]] = {}
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # the peer draws its noise inside the compiled code: same RNG as eager
        args.no_memory = True
        peer_eager, _ = _prepare("peer", args)  # stays eager; "peer" is compiled for the extra line
        peer_eager.model.load_state_dict(candidates["peer"][0].model.state_dict())
        eager_ours = candidates["ours"][0]
        candidates["ours"] = (_compile_candidate(eager_ours), candidates["ours"][1])
        candidates["peer+compile"] = (_compile_candidate(candidates["peer"][0]), candidates["peer"][1])
        candidates["peer"] = (peer_eager, torch.optim.AdamW(peer_eager.model.parameters(), lr=1e-4,
                                                            weight_decay=1e-6, foreach=True))  # fmt: skip
        data["peer+compile"] = data["peer"]
        flops["peer+compile"] = flops["peer"]
        eager_of = {"ours": eager_ours, "peer+compile": peer_eager}
        for name in ("ours", "peer+compile"):
            cand, optimizer = candidates[name]
            compile_info[name] = _compile_and_check(eager_of[name], cand, optimizer, *data[name])
    names = list(candidates)
    train: dict[str, list[float]] = {name: [] for name in names}
    sample: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            candidate, optimizer = candidates[name]
            t_train = _train_step(candidate, optimizer, *data[name])
            t_sample = _sample_batch(candidate, data[name][1])
            if rep >= args.warmup:
                train[name].append(args.batch / t_train)
                sample[name].append(args.batch / t_sample)

    results: dict[str, float] = {}
    print(
        f"config: 1x{args.size}x{args.size}, levels={args.levels}, steps={args.steps}, hidden={args.hidden}, "
        f"batch={args.batch}, threads={args.threads}, reps={args.reps} (+{args.warmup} warm-up), fp32 CPU, "
        f"ours granularity={args.granularity}, "
        f"channels_last={args.channels_last}, ours act={args.ours_act or 'default (ELU)'}, torch {torch.__version__}"
        + (", ours: torch.compile (inductor)" if args.compile else "")
    )
    header = (
        f"{'model':<12} {'params':>10} {'train img/s':>12} {'sample img/s':>13} {'train MiB':>10} {'sample MiB':>11}"
    )
    print(header + f" {'train GFLOP/img':>16} {'sample GFLOP/img':>17}")
    for name, (candidate, _) in candidates.items():
        params = sum(p.numel() for p in candidate.model.parameters())
        results[f"{name}_params"] = float(params)
        results[f"{name}_train_ips"] = statistics.median(train[name])
        results[f"{name}_sample_ips"] = statistics.median(sample[name])
        mem_train = mem_sample = float("nan")
        if not args.no_memory:
            mem_train, mem_sample = _measure_memory(name, "train", args), _measure_memory(name, "sample", args)
        results[f"{name}_train_mib"], results[f"{name}_sample_mib"] = mem_train, mem_sample
        flops_train, flops_sample = flops[name]
        results[f"{name}_train_gflop"], results[f"{name}_sample_gflop"] = flops_train, flops_sample
        print(
            f"{name:<12} {params:>10,} {results[f'{name}_train_ips']:>12.1f} {results[f'{name}_sample_ips']:>13.1f} "
            f"{mem_train:>10.0f} {mem_sample:>11.0f} {flops_train:>16.3f} {flops_sample:>17.3f}"
        )
    print("per-rep train img/s: " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in train[k]) for k in train))
    print("per-rep sample img/s: " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in sample[k]) for k in sample))
    if args.profile:
        _profile_ours(args)
    for name, info in compile_info.items():
        print(
            f"{name}: compile (first call, incl. its run) train {info['compile_train_s']:.1f} s, sample "
            f"{info['compile_sample_s']:.1f} s; compiled vs eager max abs diff: NLL {info['nll_diff']:.3g}, "
            f"sample (same noise) {info['sample_diff']:.3g}"
        )
    if "peer+compile" in candidates:
        results["train_ratio_vs_compiled_peer"] = results["ours_train_ips"] / results["peer+compile_train_ips"]
        results["sample_ratio_vs_compiled_peer"] = results["ours_sample_ips"] / results["peer+compile_sample_ips"]
        print(
            f"vs compiled peer: train_ratio={results['train_ratio_vs_compiled_peer']:.2f} "
            f"sample_ratio={results['sample_ratio_vs_compiled_peer']:.2f}"
        )
    paired = {k: [o / p for o, p in zip(v["ours"], v["peer"])] for k, v in (("train", train), ("sample", sample))}
    print(
        "paired per-rep ratios (ours/peer, same repetition): "
        + "; ".join(f"{k} " + ", ".join(f"{r:.2f}" for r in v) + f" (median {statistics.median(v):.2f})"
                    for k, v in paired.items())
    )  # fmt: skip
    results["train_ratio"] = results["ours_train_ips"] / results["peer_train_ips"]
    results["sample_ratio"] = results["ours_sample_ips"] / results["peer_sample_ips"]
    print(f"train_ratio={results['train_ratio']:.2f} sample_ratio={results['sample_ratio']:.2f}")
    return results


if __name__ == "__main__":
    main()
