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
"""Channels-last weights of the classifier and the critic, and the critic frozen during the flow's step.

Three measurements, each against its peer in the same run with alternating repetitions (median):

* ``classifier_step``: one training step (forward, cross-entropy, backward, Adam) of the ``small`` PEPXNet,
  ``PEPXNet(channels_last=True)`` (the default) against ``channels_last=False`` (PyTorch's default layout). The
  accuracy of each layout's gradients against a float64 copy of the same net is reported too (largest absolute
  error over the parameters, divided by the largest gradient).
* ``critic_passes``: the adversarial phase's three critic passes on a batch of real and decoded images (the critic's
  hinge step with its weight gradients, then the flow-side pass that needs only the gradient with respect to the
  images), as :class:`~monai_condflow.engines.flow_adversarial.AdversarialFlowTrainer` runs them: ours with
  channels-last weights and the critic's weights frozen during the flow-side pass; the peer in the default layout
  with the weights trainable in both (the package before these changes).
* ``adversarial_step``: the whole phase step at ``likelihood_every = 2`` (two consecutive iterations, one with the
  likelihood term) of the ``small`` flow with the ``high_pass`` critic: ours against the same step with the peer's
  critic.

Last line ``BENCH_CHANNELS_LAST {json}``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_channels_last.py --threads 2 --reps 15
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.engines.flow import FlowBitsPerDim  # noqa: E402
from monai_condflow.engines.flow_adversarial import (  # noqa: E402
    frozen_parameters,
    hinge_discriminator_loss,
    random_translate,
)
from monai_condflow.networks.nets import ConditionalGlow, PEPXNet, ProjectionDiscriminator  # noqa: E402


def _alternate(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median milliseconds of each function, run in alternating order after two warm-up rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps + 2):
        for name in names if i % 2 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: round(1000.0 * sorted(v)[len(v) // 2], 2) for k, v in times.items()}


def gradient_error(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest absolute gradient error of ``net`` (float32) against a float64 copy, over the largest gradient."""
    reference = copy.deepcopy(net).double()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(reference(x.double()), y).backward()
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    worst = max(float((a.grad.double() - b.grad).abs().max()) for a, b in zip(net.parameters(), reference.parameters()))
    net.zero_grad(set_to_none=True)
    return worst / scale


def classifier_step(batch: int, size: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours = PEPXNet.from_preset("small")
    peer = PEPXNet.from_preset("small", channels_last=False)
    peer.load_state_dict(ours.state_dict())
    x, y = torch.rand(batch, 1, size, size), torch.randint(0, 2, (batch,))
    errors = {
        "ours_gradient_error": gradient_error(ours, x[:4], y[:4]),
        "peer_gradient_error": gradient_error(peer, x[:4], y[:4]),
    }

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

        return run

    ms = _alternate(
        {"ours": step(ours, torch.optim.Adam(ours.parameters(), 1e-3)),
         "peer": step(peer, torch.optim.Adam(peer.parameters(), 1e-3))},
        reps,
    )  # fmt: skip
    return {"ours_ms": ms["ours"], "peer_ms": ms["peer"], "speedup": round(ms["peer"] / ms["ours"], 3), **errors}


def critic_passes(disc: torch.nn.Module, x: torch.Tensor, fake: torch.Tensor, z: torch.Tensor, freeze: bool) -> None:
    """The phase's critic passes: the hinge step (weight gradients), then the flow-side pass (image gradient)."""
    gen = torch.Generator().manual_seed(0)
    d_loss = hinge_discriminator_loss(
        disc(random_translate(x, 3, gen), z), disc(random_translate(fake.detach(), 3, gen), z)
    )
    disc.zero_grad(set_to_none=True)
    d_loss.backward()
    with frozen_parameters(disc) if freeze else nullcontext():
        (-disc(random_translate(fake, 3, gen), z).mean()).backward()


def run(batch: int, reps: int, size: int = 64, classifier_batch: int = 32) -> dict:
    results: dict[str, dict[str, float]] = {"classifier_step": classifier_step(classifier_batch, size, reps)}
    torch.manual_seed(0)
    ours = ProjectionDiscriminator(2, 1, 32, high_pass=True)
    peer = ProjectionDiscriminator(2, 1, 32, high_pass=True, channels_last=False)
    peer.load_state_dict(ours.state_dict())
    x = torch.rand(batch, 1, size, size)
    z = F.normalize(torch.randn(batch, 32), dim=1)
    fake = torch.rand(batch, 1, size, size, requires_grad=True)
    ms = _alternate(
        {"ours": lambda: critic_passes(ours, x, fake, z, True), "peer": lambda: critic_passes(peer, x, fake, z, False)},
        reps,
    )  # fmt: skip
    speedup = round(ms["peer"] / ms["ours"], 3)
    results["critic_passes"] = {"ours_ms": ms["ours"], "peer_ms": ms["peer"], "speedup": speedup}

    flow = ConditionalGlow.from_preset("small", image_size=size)
    flow.initialize(x, z)
    flow.train()
    nll = FlowBitsPerDim(flow, n_bits=8)

    def phase_steps(disc: torch.nn.Module, freeze: bool) -> Callable[[], None]:
        def two() -> None:
            for with_likelihood in (True, False):  # likelihood_every = 2
                nu = torch.randn(batch, flow.latent_dim(x.shape[2:])) * 0.9
                decoded, _ = flow.inverse(nu, z, x.shape[2:])
                critic_passes(disc, x, decoded, z, freeze)  # the flow-side pass's backward reaches the flow
                if with_likelihood:
                    (2 * nll(x, z).mean()).backward()
                flow.zero_grad(set_to_none=True)

        return two

    ms = _alternate({"ours": phase_steps(ours, True), "peer": phase_steps(peer, False)}, max(1, reps // 3))
    results["adversarial_step"] = {
        "ours_ms": round(ms["ours"] / 2, 2), "peer_ms": round(ms["peer"] / 2, 2),
        "speedup": round(ms["peer"] / ms["ours"], 3),
    }  # fmt: skip
    return {"batch": batch, "classifier_batch": classifier_batch, "size": size, "reps": reps, **results}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="batch of the critic and the phase (the recipe's 16)")
    parser.add_argument("--classifier-batch", type=int, default=32, help="batch of the classifier's training step")
    parser.add_argument("--size", type=int, default=64, help="image side (a multiple of 16)")
    parser.add_argument("--reps", type=int, default=15, help="alternating repetitions per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.batch, args.reps, args.size, args.classifier_batch)
    out["threads"] = torch.get_num_threads()
    for name in ("classifier_step", "critic_passes", "adversarial_step"):
        r = out[name]
        print(f"{name:17s} ours {r['ours_ms']:8.2f} ms   peer {r['peer_ms']:8.2f} ms   speedup {r['speedup']:.2f}x")
    c = out["classifier_step"]
    print(f"classifier gradient error vs float64 (of the largest gradient): ours {c['ours_gradient_error']:.2e}, "
          f"peer {c['peer_gradient_error']:.2e}")  # fmt: skip
    print("BENCH_CHANNELS_LAST " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
