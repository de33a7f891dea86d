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
"""Speed, memory and numerical error of a :class:`~monai_condflow.networks.nets.ConditionalGlow` preset on a GPU,
in three precision modes.

Modes (each on a fresh model from the same seed; before its ActNorm initialisation every parameter gets noise of
std ``--perturb / sqrt(fan_in)``, zero-initialised convolutions included, so no layer starts as the identity and the
error figures below are not those of an identity map; the ActNorms, initialised afterwards on the first batch,
normalise the perturbed network as they do a trained one):

* ``fp32``: full fp32, TF32 off for both cuDNN convolutions and matmuls (PyTorch allows TF32 in cuDNN
  convolutions by default, so this is set explicitly);
* ``tf32``: fp32 tensors, TF32 tensor-core arithmetic allowed in convolutions and matmuls;
* ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around the forward / inverse (TF32 off); parameters,
  gradients and optimiser state stay fp32.

Per mode:

* training images/s: ``zero_grad`` + ``-log_prob(x, z).mean()`` + backward + ``AdamW`` step (the paper's
  hyper-parameters, peak rate 5e-4 after a linear warm-up of ``--warmup-iters`` iterations as in the trainer),
  ``--batch`` images, timed over ``--steps`` steps after ``--warmup`` steps (CUDA synchronised);
* peak GPU memory of training (``torch.cuda.max_memory_allocated`` over the warm-up and timed steps, weights
  included);
* sampling images/s: ``sample(z, temperature=0.9)`` for ``--sample-batch`` conditions, over ``--sample-reps``
  batches after one warm-up batch; its peak memory;
* numerical error of the trained weights: round trip
  ``max |decode(encode(x)) - x|`` in the mode, and ``max |NLL_mode - NLL_ref|`` against an
  fp32 reference (TF32 off; float64 with ``--double-ref``) of the same weights, in nats per image.

Usage::

    python benchmarks/bench_flow_gpu.py                                   # paper preset, batch 80, cuda
    python benchmarks/bench_flow_gpu.py --device cpu --preset small --batch 4 --steps 2 --sample-batch 4

The last line is ``json=<one-line JSON of every figure>``; ``--out FILE`` also writes it to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402

MODES = ("fp32", "tf32", "bf16")


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in cuDNN convolutions and CUDA matmuls, with whichever API this torch has."""
    precision = "tf32" if enabled else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:  # older torch
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """Run the block in ``mode`` (see the module docstring)."""
    set_tf32(mode == "tf32")
    if mode == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the previous phase's cached blocks do not count towards this one's peak
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def make_batch(batch: int, size: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Smooth 8-bit images, dequantised into ``[0, 1]``, and unit 32-d conditions (like PEPXNet embeddings)."""
    coarse = torch.rand(batch, 1, size // 8, size // 8, generator=generator)
    img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img = (img * 255).round()
    x = ((img + torch.rand(img.shape, generator=generator)) / 256.0).clamp(0, 1)
    z = F.normalize(torch.randn(batch, 32, generator=generator), dim=1)
    return x.to(device), z.to(device)


def build(args: argparse.Namespace, device: torch.device, x: torch.Tensor, z: torch.Tensor) -> ConditionalGlow:
    torch.manual_seed(args.seed)
    net = ConditionalGlow.from_preset(args.preset, image_size=args.size).to(device)
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        for p in net.parameters():  # std perturb / sqrt(fan_in), zero-initialised convs included
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.add_(args.perturb / fan_in**0.5 * torch.randn(p.shape, generator=g).to(device))
        net.initialize(x, z)  # after the perturbation, so the ActNorms normalise the perturbed network
    return net


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args.batch, args.size, gen, device) for _ in range(4)]
    set_tf32(False)
    net = build(args, device, *batches[0])
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=1e-6, betas=(0.5, 0.999))
    # the trainer's linear warm-up (create_flow_trainer: 10 epochs, per iteration); without it one AdamW step at the
    # peak rate saturates the bounded scales of the paper preset's 64 steps and the NLL overflows
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / args.warmup_iters))
    net.train()

    def step(i: int) -> torch.Tensor:
        x, z = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with precision(mode, device):
            loss = -net.log_prob(x, z).mean()
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    reset_peak(device)
    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(args.steps)]
    sync(device)
    t_train = time.perf_counter() - t0
    train_peak = peak_mib(device)
    last_loss = float(losses[-1])
    out = {
        "mode": mode,
        "train_img_s": args.batch * args.steps / t_train,
        "train_ms_per_step": 1000 * t_train / args.steps,
        "train_peak_mib": train_peak,
        "final_nll_nats": last_loss,
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }

    # sampling
    net.eval()
    zs = F.normalize(torch.randn(args.sample_batch, 32, generator=gen), dim=1).to(device)
    with torch.no_grad(), precision(mode, device):
        net.sample(zs, temperature=0.9)
        reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(args.sample_reps):
            s = net.sample(zs, temperature=0.9)
        sync(device)
    t_sample = time.perf_counter() - t0
    out.update(
        sample_img_s=args.sample_batch * args.sample_reps / t_sample,
        sample_peak_mib=peak_mib(device),
        sample_finite=bool(torch.isfinite(s).all()),
    )

    # numerical error of the trained, non-identity weights
    with torch.no_grad():
        x, z = batches[0]
        set_tf32(False)
        if args.double_ref:  # a float64 copy of the same weights
            nll_ref = -copy.deepcopy(net).double().log_prob(x.double(), z.double())
        else:
            nll_ref = -net.log_prob(x, z)
        with precision(mode, device):
            nu, _ = net(x, z)
            x_rec, _ = net.inverse(nu, z)
            nll = -net.log_prob(x, z)
        out.update(
            roundtrip_max_abs=float((x_rec.float() - x).abs().max()),
            nll_max_abs_diff_nats=float((nll.double() - nll_ref.double()).abs().max()),
            nll_ref_mean_nats=float(nll_ref.mean()),
        )
    set_tf32(False)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=80)
    parser.add_argument("--sample-reps", type=int, default=10)
    parser.add_argument("--warmup-iters", type=int, default=1000, help="linear learning-rate warm-up iterations")
    parser.add_argument("--perturb", type=float, default=0.1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--double-ref", action="store_true", help="fp64 reference NLL (slow on GPUs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {list(MODES)}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu for a dry run).")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }
    probe = ConditionalGlow.from_preset(args.preset, image_size=args.size)
    config = {**probe.config, "parameters": sum(p.numel() for p in probe.parameters())}
    del probe
    print(f"env: {json.dumps(env)}")
    print(f"model: {json.dumps(config)}")
    print(
        f"batch {args.batch} (sampling {args.sample_batch}), {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.sample_reps} sampling batches, cudnn.benchmark={args.cudnn_benchmark}",
        flush=True,
    )
    results = []
    ref = "fp64" if args.double_ref else "fp32"
    for mode in modes:
        t0 = time.perf_counter()
        r = run_mode(mode, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the mode's model and optimiser are gone with run_mode's frame
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(
            f"{mode:5s} train {r['train_img_s']:8.1f} img/s ({r['train_ms_per_step']:.1f} ms/step, peak "
            f"{r['train_peak_mib']:.0f} MiB, NLL {r['final_nll_nats']:.1f}) | sample {r['sample_img_s']:8.1f} img/s "
            f"(peak {r['sample_peak_mib']:.0f} MiB) | round trip {r['roundtrip_max_abs']:.2e} | "
            f"NLL diff vs {ref} {r['nll_max_abs_diff_nats']:.2e} nats (of {r['nll_ref_mean_nats']:.1f})",
            flush=True,
        )
        if not (r["loss_finite"] and r["sample_finite"]):
            print(f"WARNING: {mode}: non-finite training loss or samples; its error figures are meaningless.")
    report = {"env": env, "model": config, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    line = json.dumps(report, separators=(",", ":"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(f"json={line}")
    return report


if __name__ == "__main__":
    main()
