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
"""Wall time of the vectorised label propagation on many embeddings (CPU, fp32).

For ``--n`` random unit embeddings of dimension ``--dim`` in ``--classes`` noisy clusters, the script times
centroid fitting on 50 labelled embeddings plus propagation to all ``--n`` (median of ``--reps``) for both similarity
kinds, and, for scale, the brute-force per-pair ``scipy.stats.wasserstein_distance`` loop on the first
``--brute`` embeddings (extrapolated linearly to ``--n``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_label_propagation.py --n 100000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.stats import wasserstein_distance

from monai_condflow.engines.label_propagation import LabelPropagation

__all__ = ["main"]


def _data(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    z = torch.nn.functional.normalize(centres[labels] + 0.2 * torch.randn(n, dim, generator=g), dim=1)
    return z, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--brute", type=int, default=500)
    args = parser.parse_args(argv)

    z, labels = _data(args.n, args.dim, args.classes, seed=0)
    labelled = torch.arange(50)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n={args.n}, dim={args.dim}")
    for kind in ("gaussian", "wasserstein"):
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            lp = LabelPropagation(args.classes, kind=kind).fit(z[labelled], labels[labelled])
            predicted, _ = lp.predict(z)
            times.append(time.perf_counter() - start)
        accuracy = float((predicted == labels).float().mean())
        print(f"{kind:12s} median {statistics.median(times) * 1e3:8.1f} ms  (accuracy vs cluster ids {accuracy:.4f})")
    centroids = lp.centroids.double().numpy()
    zs = z[: args.brute].double().numpy()
    start = time.perf_counter()
    for row in zs:
        for c in centroids:
            wasserstein_distance(row, c)
    brute = (time.perf_counter() - start) * args.n / args.brute
    print(f"scipy loop   ~{brute:8.1f} s   (extrapolated from {args.brute} embeddings)")


if __name__ == "__main__":
    main()
