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
"""The conditional pixel spline's knots: bins-first against the row-by-row softmax, on the ``small`` flow.

``PixelSpline`` turns its raw knot parameters (``[B, C, H, W, bins]``) into knot positions with a softmax and a
cumulative sum over the bins. PyTorch's CPU softmax over a short last dimension runs row by row; the package computes
the knots with the bins moved in front of the positions instead. This benchmark times both in the same run (the
peer is the row-by-row formulation, patched into the same modules) with alternating repetitions, on the spline alone
and on the ``small`` flow's training step (``log_prob`` forward + backward) and adversarial decode (``inverse`` +
backward), and checks that both give the same numbers. Last line ``BENCH_PIXEL_SPLINE {json}``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_pixel_spline.py --threads 2 --batch 16 --reps 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.networks.blocks.pixel_spline import PixelSpline  # noqa: E402
from monai_condflow.networks.nets import ConditionalGlow  # noqa: E402


def row_by_row_edges(self: PixelSpline, raw: torch.Tensor) -> torch.Tensor:
    """The peer: ``PixelSpline._bin_edges`` with the softmax and the cumulative sum over the last (bins) dimension."""
    size = self.min_bin + (1 - self.min_bin * self.num_bins) * torch.softmax(raw, dim=-1)
    edges = F.pad(torch.cumsum(size, dim=-1), (1, 0)) * (2 * self.tail_bound) - self.tail_bound
    return torch.cat([edges[..., :-1], torch.full_like(edges[..., -1:], self.tail_bound)], dim=-1)


def _median_ms(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]


def run(batch: int, reps: int, size: int = 64, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x = torch.rand(batch, 1, size, size)
    z = F.normalize(torch.randn(batch, 32), dim=1)
    flow = ConditionalGlow.from_preset("small", image_size=size)
    flow.initialize(x, z)
    flow.train()
    spline = next(m for m in flow.modules() if isinstance(m, PixelSpline))
    with torch.no_grad():  # knots away from the uniform start, so both formulations see a trained-like spline
        for p in spline.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, device=p.device))
    v = torch.randn(batch, *spline.widths.shape[:-1]) * 0.5
    nu = torch.randn(batch, flow.latent_dim(x.shape[2:])) * 0.9

    def spline_step() -> None:
        y, logdet = spline(v, z)
        (y.sum() + logdet.sum()).backward()

    def train_step() -> None:
        flow.log_prob(x, z).mean().backward()

    def decode_step() -> None:
        flow.inverse(nu, z, x.shape[2:])[0].mean().backward()

    def outputs() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (*spline(v, z), flow.log_prob(x, z), flow.inverse(nu, z, x.shape[2:])[0])

    ours_edges = PixelSpline._bin_edges
    results: dict[str, dict[str, float]] = {}
    try:
        PixelSpline._bin_edges = row_by_row_edges
        peer_out = outputs()
        PixelSpline._bin_edges = ours_edges
        ours_out = outputs()
        names = ("spline_output", "spline_logdet", "log_prob", "decoded_image")
        max_diff = {n: float((a - b).abs().max()) for n, a, b in zip(names, ours_out, peer_out)}
        max_diff["log_prob_relative"] = max_diff["log_prob"] / float(peer_out[2].abs().max())
        for name, fn in (("spline", spline_step), ("train_step", train_step), ("decode_step", decode_step)):
            ms = {"ours": [], "peer": []}
            for _ in range(2):  # warm-up of both
                for impl in (ours_edges, row_by_row_edges):
                    PixelSpline._bin_edges = impl
                    fn()
            for _ in range(reps):  # alternating, so drifts of a shared machine hit both
                for key, impl in (("ours", ours_edges), ("peer", row_by_row_edges)):
                    PixelSpline._bin_edges = impl
                    ms[key].append(_median_ms(fn, 1))
            ours, peer = sorted(ms["ours"])[reps // 2], sorted(ms["peer"])[reps // 2]
            results[name] = {"ours_ms": round(ours, 2), "peer_ms": round(peer, 2), "speedup": round(peer / ours, 3)}
    finally:
        PixelSpline._bin_edges = ours_edges
    flow.zero_grad(set_to_none=True)
    return {"batch": batch, "size": size, "reps": reps, "max_abs_diff": max_diff, **results}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side (a multiple of 8 for the small preset)")
    parser.add_argument("--reps", type=int, default=15, help="alternating repetitions per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.batch, args.reps, args.size)
    out["threads"] = torch.get_num_threads()
    for name in ("spline", "train_step", "decode_step"):
        r = out[name]
        print(f"{name:12s} ours {r['ours_ms']:8.2f} ms   row-by-row peer {r['peer_ms']:8.2f} ms   "
              f"speedup {r['speedup']:.2f}x")  # fmt: skip
    print("largest differences, ours - peer: " + ", ".join(f"{k} {v:.3g}" for k, v in out["max_abs_diff"].items()))
    print("BENCH_PIXEL_SPLINE " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
