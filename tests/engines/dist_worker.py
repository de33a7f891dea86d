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
Worker for the multi-process tests (``tests/engines/test_distributed.py``), launched with
``python -m torch.distributed.run --nproc_per_node=2 --max-restarts=1 tests/engines/dist_worker.py --scenarios ...
--out DIR``. After a restart, scenarios whose result files all ranks already wrote are skipped.

The scenario functions are also imported by the tests and run in the test process (one rank) as the reference.
Every scenario writes ``{out}/{scenario}_rank{r}.pt``: final weights, per-iteration local losses, skipped steps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from monai_condflow.networks.blocks.compiled_steps import compiled_steps
from monai_condflow.utils.distributed import (
    all_gather_tensors,
    any_across_ranks,
    broadcast_module,
    cleanup_distributed,
    create_loader,
    get_rank,
    get_world_size,
    init_distributed,
    unwrap_model,
)

__all__ = ["make_flow_data", "make_flow", "run_flow", "run_classifier", "SCENARIOS"]

N_TRAIN, N_VAL, SIZE, GLOBAL_BATCH = 16, 8, 16, 8


def make_flow_data(n: int, seed: int, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Deterministic quantised 16x16 images with labels and unit-norm conditions (same in every process)."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, SIZE, SIZE, generator=g) * 255).round() / 256 + 0.5 / 256
    labels = torch.arange(n) % 2
    # class-dependent brightness, so that the classifier has something to learn
    images = (images * 0.5 + labels.view(-1, 1, 1, 1) * 0.4).clamp(0, 1)
    cond = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=1)
    images, cond = images.to(dtype), cond.to(dtype)
    return [{"image": images[i], "label": int(labels[i]), "condition": cond[i]} for i in range(n)]


def make_flow(seed: int = 1) -> torch.nn.Module:
    """A tiny ConditionalGlow (2 levels, 2 steps, width 8) for 16x16 images, without the random training-time
    mechanisms of the ``small`` preset (condition dropout, Gaussian noise): with them a 2-rank run equals the
    1-rank run only in distribution (each rank draws its own noise), and these scenarios compare weights."""
    from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

    torch.manual_seed(seed)
    return ConditionalGlow.from_preset(
        "small",
        num_levels=2,
        image_size=SIZE,
        num_steps=2,
        num_blocks=(1, 1),
        hidden_channels=8,
        cond_dropout=0.0,
        noise_std=0.0,
    )


def run_flow(
    out_dir: str | os.PathLike,
    *,
    max_epochs: int = 2,
    nan_rank: int | None = None,
    nan_iteration: int = 2,
    crash_epoch: int | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> dict[str, Any]:
    """Train the tiny flow through ``create_flow_trainer``; optionally make one rank's loss NaN at one iteration
    (the gradients stay finite), or raise after the checkpoint of ``crash_epoch`` (first attempt only). ``float64``
    removes most of the rounding noise that Adam's first steps amplify, so runs can be compared tightly.
    ``compile``: through ``torch.compile``'d flow steps (the bundle id ``compile``; the ``aot_eager`` backend, which
    traces and runs AOT autograd's functions without generating code: inductor itself is tested in one process)."""
    from monai.engines.utils import IterationEvents
    from monai.utils import CommonKeys as Keys

    from monai_condflow.engines.flow_trainer import create_flow_trainer

    out_dir = Path(out_dir)
    train = create_loader(make_flow_data(N_TRAIN, 0, dtype), GLOBAL_BATCH, shuffle=True, seed=3)
    val = create_loader(make_flow_data(N_VAL, 1, dtype), GLOBAL_BATCH, shuffle=False, seed=3)
    flow = make_flow().to(dtype)
    if compile:
        flow.compile_steps(backend="aot_eager")  # kept by create_flow_trainer(compile=True)
    trainer, evaluator = create_flow_trainer(
        flow,
        None,
        train,
        val,
        device="cpu",
        max_epochs=max_epochs,
        output_dir=out_dir / "run",
        warmup_epochs=1,
        lr=1e-3,
        resume_from=out_dir / "run",
        seed=5,
        tensorboard=False,
        compile=compile,
    )
    losses: list[float] = []
    grad_norms: list[float] = []

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def _inject(engine):
        if nan_rank is not None and get_rank() == nan_rank and engine.state.iteration == nan_iteration:
            engine.state.output[Keys.LOSS] = engine.state.output[Keys.LOSS] + float("nan")

    @trainer.on(IterationEvents.MODEL_COMPLETED)
    def _record(engine):
        losses.append(float(engine.state.output[Keys.LOSS].item()))
        grad_norms.append(float(engine.state.output["grad_norm"]))

    if crash_epoch is not None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        from ignite.engine import Events

        @trainer.on(Events.EPOCH_COMPLETED(once=crash_epoch))
        def _crash(engine):
            raise RuntimeError(f"injected crash after epoch {crash_epoch}")

    trainer.run()
    flow = unwrap_model(trainer.network).flow
    return {
        "state": {k: v.detach().clone() for k, v in flow.state_dict().items()},
        "losses": losses,
        "grad_norms": grad_norms,
        "skipped": int(trainer.state.skipped_steps),
        "epoch": int(trainer.state.epoch),
        "val_bpd": float(evaluator.state.metrics["val_bpd"]),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "compiled_calls": getattr(compiled_steps(flow), "calls", 0),
    }


def run_classifier(out_dir: str | os.PathLike, *, max_epochs: int = 2) -> dict[str, Any]:
    """Train a tiny PEPXNet with ``create_classifier_trainer``; no batch norm (its statistics differ per rank)."""
    from monai.engines.utils import IterationEvents
    from monai.utils import CommonKeys as Keys

    from monai_condflow.engines.classifier import create_classifier_trainer
    from monai_condflow.networks.nets.pepx_net import PEPXNet

    torch.manual_seed(2)
    net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2, norm=None)
    data = [{"image": d["image"], "label": d["label"]} for d in make_flow_data(N_TRAIN, 0)]
    train = create_loader(data, GLOBAL_BATCH, shuffle=True, seed=3)
    trainer, _ = create_classifier_trainer(
        net, train, None, device="cpu", max_epochs=max_epochs, lr=1e-3, output_dir=Path(out_dir) / "clf", seed=5
    )
    losses: list[float] = []

    @trainer.on(IterationEvents.MODEL_COMPLETED)
    def _record(engine):
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        losses.append(float(torch.as_tensor(out[Keys.LOSS]).detach()))

    trainer.run()
    return {"state": {k: v.detach().clone() for k, v in unwrap_model(trainer.network).state_dict().items()},
            "losses": losses}  # fmt: skip


SCENARIOS = {
    "flow": lambda out: run_flow(out / "flow"),
    "flow64": lambda out: run_flow(out / "flow64", dtype=torch.float64),
    "flow_compiled": lambda out: run_flow(out / "flow_compiled", compile=True),
    "nan": lambda out: run_flow(out / "nan", nan_rank=1, nan_iteration=2),
    "classifier": lambda out: run_classifier(out / "classifier"),
    "crash": lambda out: run_flow(out / "crash", max_epochs=3, crash_epoch=2, dtype=torch.float64),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed("gloo")
    out = Path(args.out)
    try:
        # several flags in one all-reduce: true where any rank says so (rank 0 alone says the first)
        if any_across_ranks([get_rank() == 0, False]) != [True, False]:
            raise RuntimeError("any_across_ranks reduced a list of flags wrongly")
        # rank r contributes r + 1 rows: unequal lengths come back in rank order
        rows = torch.arange(get_rank() + 1, dtype=torch.float64).view(-1, 1).repeat(1, 3) + 10 * get_rank()
        expected = torch.cat([torch.arange(r + 1, dtype=torch.float64).view(-1, 1).repeat(1, 3) + 10 * r
                              for r in range(get_world_size())])  # fmt: skip
        if not torch.equal(all_gather_tensors(rows), expected):
            raise RuntimeError("all_gather_tensors gathered unequal lengths wrongly")
        module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(module.weight, float(get_rank()))
        broadcast_module(module, src=0)
        if not torch.equal(module.weight, torch.zeros(2, 2)):
            raise RuntimeError("broadcast_module did not copy rank 0's parameters")
        for name in args.scenarios.split(","):
            target = out / f"{name}_rank{get_rank()}.pt"
            # after a torchrun restart, skip the scenarios that every rank already finished
            if not any_across_ranks(not target.is_file()):
                continue
            result = SCENARIOS[name](out)
            torch.save(result, target)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
