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
"""Adversarial fine-tuning on finished flows: the flow stage's last phase, ablated over its settings and flow seeds.

For each ``--seeds`` value the likelihood-trained flow of ``--flow-runs`` (one finished run folder per seed, e.g. a
main job and ``ablate_flow.py``'s seed folders with ``--adversarial_steps 0``; they share data and classifier) is
fine-tuned for ``--steps`` steps by the package's
:class:`~monai_condflow.engines.flow_adversarial.AdversarialFlowTrainer` (``bits/dim + adv_weight * adversarial +
range_weight * excess + cls_weight * consistency``, a
:class:`~monai_condflow.networks.nets.ProjectionDiscriminator`), without the bundle around it, so one likelihood
training serves many settings. The EMA of the fine-tuned weights is saved as ``OUT/NAME_sSEED/flow/model.pt`` and
judged with ``ablate_flow.evaluate_seed`` (the true-label judge, figures and grids of the flow ablations). Last
line ``ABLATE_ADVERSARIAL {json}``; results in ``OUT/NAME.json``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ablate_adversarial.py runs/main --flow-runs runs/main --seeds 0 \\
        --name adv1 --adv-weight 1.0 --cls-weight 1.0 --range-weight 0.5 --steps 400 --out runs/adversarial \\
        --judge-dir runs/ablations
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_flow import evaluate_seed, load_or_train_second_judge, splits_and_judge, summarize  # noqa: E402


def fine_tune(
    flow, classifier, images: torch.Tensor, args: argparse.Namespace, seed: int, snapshot=None
) -> tuple[nn.Module, dict]:
    """Fine-tune ``flow`` on ``images`` (training slices, ``[N, 1, S, S]``) with the package's
    :class:`AdversarialFlowTrainer`; returns the EMA copy and a log of the losses every ``--log-every`` steps.
    ``snapshot(step, ema_module)`` is called after each step of ``--snapshots`` (it must not touch the weights)."""
    from ignite.engine import Events

    from monai_condflow.engines.ema import ModelEMA
    from monai_condflow.engines.flow_adversarial import AdversarialFlowTrainer
    from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
    from monai_condflow.networks.nets import ProjectionDiscriminator
    from monai_condflow.utils.distributed import create_loader

    torch.manual_seed(seed)
    with torch.no_grad():
        z_all = torch.cat([classifier.embed(images[i : i + 128]) for i in range(0, len(images), 128)])
    data = [{"image": x, "condition": z} for x, z in zip(images, z_all)]
    loader = create_loader(data, args.batch, shuffle=True, seed=seed, drop_last=True)
    widths = {} if args.d_channels is None else {"channels": args.d_channels}  # None: the network's default
    disc = ProjectionDiscriminator(2, images.shape[1], z_all.shape[1], high_pass=args.d_high_pass, **widths)
    flow.train()
    trainer = AdversarialFlowTrainer(
        "cpu", args.steps, loader, flow, disc,
        torch.optim.Adam(flow.parameters(), lr=args.lr, betas=(0.5, 0.9)),
        torch.optim.Adam(disc.parameters(), lr=args.d_lr, betas=(0.5, 0.9)),
        prepare_batch=ConditionPrepareBatch(classifier=classifier), adversarial_weight=args.adv_weight,
        consistency_weight=args.cls_weight, range_weight=args.range_weight, temperature=args.train_temperature,
        shift=args.shift, max_grad_norm=args.clip, ema=ModelEMA(flow, decay=args.ema), seed=seed,
        likelihood_batch_size=args.likelihood_batch, likelihood_every=args.likelihood_every,
    )  # fmt: skip
    log: dict[str, list] = {"step": [], "bpd": [], "d_loss": [], "g_adv": [], "cls": [], "excess": []}
    t0 = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED(every=args.log_every))
    def _log(engine) -> None:
        out = engine.state.output
        keys = ("loss", "d_loss", "g_adversarial", "consistency", "excess")
        for name, value in zip(log, (engine.state.iteration, *(out[k] for k in keys))):
            log[name].append(value)
        print(
            f"seed {seed} step {engine.state.iteration}: bpd {out['loss']:.3f} d {out['d_loss']:.3f} g_adv "
            f"{out['g_adversarial']:.3f} cls {out['consistency']:.3f} excess {out['excess']:.4f} "
            f"({(time.perf_counter() - t0) / engine.state.iteration:.2f} s/step)",
            flush=True,
        )

    @trainer.on(Events.ITERATION_COMPLETED)
    def _snapshot(engine) -> None:
        if snapshot is not None and engine.state.iteration in args.snapshots:
            snapshot(engine.state.iteration, trainer.ema.module)

    trainer.run()
    log["seconds"] = time.perf_counter() - t0
    return trainer.ema.module.eval(), log


def _run_folder(folder: Path, base: Path, flow_json: Path) -> Path:
    """A run folder for ``evaluate_seed``: ``data/`` and ``classifier/`` linked from ``base``, ``flow/flow.json``
    copied from ``flow_json`` (the weights are saved into ``flow/`` by the caller)."""
    (folder / "flow").mkdir(parents=True, exist_ok=True)
    for name in ("data", "classifier"):
        if not (folder / name).exists():
            (folder / name).symlink_to((base / name).resolve(), target_is_directory=True)
    shutil.copy(flow_json, folder / "flow" / "flow.json")
    return folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="finished run folder whose data/ and classifier/ are used")
    p.add_argument("--flow-runs", type=Path, nargs="+", required=True, help="one run folder per seed (flow/ inside)")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--judge-dir", type=Path, default=None, help="folder of judge.pt (default: --out)")
    p.add_argument("--judge-epochs", type=int, default=15)
    p.add_argument("--second-judge", action="store_true", help="also judge with ablate_flow's plain CNN")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--likelihood-batch", type=int, default=None, help="images of a batch in the likelihood term")
    p.add_argument(
        "--likelihood-every", type=int, default=1, help="the likelihood term on every k-th step only (weighted by k)"
    )
    p.add_argument("--d-channels", type=int, nargs="+", default=None, help="discriminator widths (default: its own)")
    p.add_argument("--d-high-pass", action="store_true", help="the discriminator also reads x - mean_3x3(x)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--d-lr", type=float, default=2e-4)
    p.add_argument("--adv-weight", type=float, default=1.0)
    p.add_argument("--cls-weight", type=float, default=1.0)
    p.add_argument("--range-weight", type=float, default=0.5, help="weight of the squared excess beyond [0, 1]")
    p.add_argument("--train-temperature", type=float, default=0.9)
    p.add_argument("--shift", type=int, default=3)
    p.add_argument("--clip", type=float, default=50.0)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.9, 1.0])
    p.add_argument("--tstr-temperature", type=float, default=0.9)
    p.add_argument("--tstr-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tstr-epochs", type=int, default=15)
    p.add_argument(
        "--snapshots", type=int, nargs="*", default=[],
        help="also judge the EMA weights after these steps (T = tstr temperature, no TSTR): the curve over steps",
    )  # fmt: skip
    args = p.parse_args(argv)
    if len(args.flow_runs) != len(args.seeds):
        p.error("--flow-runs needs one run folder per --seeds value")
    args.priors, args.fit_shrinkage = ["auto"], None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from monai_condflow.engines.stages import load_classifier, load_flow
    from monai_condflow.utils.io import atomic_torch_save, atomic_write_text

    args = parse_args(argv)
    splits, judge = splits_and_judge(args, args.judge_dir)
    second = load_or_train_second_judge(args.judge_dir or args.out, splits) if args.second_judge else None
    per_seed: dict[int, dict] = {}
    for seed, run in zip(args.seeds, args.flow_runs):
        seed_dir = _run_folder(args.out / f"{args.name}_s{seed}", args.base, run / "flow" / "flow.json")
        classifier = load_classifier(args.base).eval()
        flow = load_flow(run)
        snapshot_dirs: dict[int, Path] = {}

        def _save(step: int, module: nn.Module, seed_dir: Path = seed_dir, snapshot_dirs: dict = snapshot_dirs) -> None:
            snap_dir = _run_folder(seed_dir / f"step{step}", args.base, seed_dir / "flow" / "flow.json")
            atomic_torch_save({"network": module.state_dict()}, snap_dir / "flow" / "model.pt")
            snapshot_dirs[step] = snap_dir

        tuned, log = fine_tune(flow, classifier, splits["train"][0], args, seed, snapshot=_save)
        atomic_torch_save({"network": tuned.state_dict()}, seed_dir / "flow" / "model.pt")
        row = evaluate_seed(seed_dir, judge, splits, args, second)
        row["train_log"], row["train_s"] = log, log["seconds"]
        light = argparse.Namespace(**{**vars(args), "temperatures": [args.tstr_temperature], "tstr_seeds": []})
        row["snapshots"] = {
            str(step): evaluate_seed(snap_dir, judge, splits, light, second) for step, snap_dir in snapshot_dirs.items()
        }
        per_seed[seed] = row
        print(f"{args.name} seed {seed}: {json.dumps({k: v for k, v in row.items() if k != 'train_log'})}", flush=True)
    result = {"name": args.name, "args": {k: str(v) for k, v in vars(args).items()}, "per_seed": per_seed}
    skip = ("train_log", "snapshots")
    result["summary"] = summarize({s: {k: v for k, v in r.items() if k not in skip} for s, r in per_seed.items()})
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    print("ABLATE_ADVERSARIAL " + json.dumps(result["summary"], separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
