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
"""Sampling sweep on a finished run: temperature x guidance weight against a judge trained on the true labels.

For a run folder of the pipeline (``classifier/``, ``flow/``, ``data/``), the script trains (once; cached as
``RUN/sweep_judge.pt``) a judge on the real training slices with their *true* labels (not the presumptive ones the
evaluation stage uses), then draws one synthetic slice per training slice (its z, seed 1) for each temperature and
guidance weight and prints, per setting: class agreement overall and per class, images and pixels that overflowed
before clamping (``SAMPLE_RANGE``), the sharpness ratio, and the seconds taken. It writes
``RUN/sweep_sampling.json`` and one grid per setting (rows: real class 0, real class 1, synthetic class 0,
synthetic class 1). The last line is ``SWEEP_SAMPLING {json}``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sweep_sampling.py runs/main --temperatures 0.7 0.9 --guidance 1 2 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _images(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.data import CacheDataset

    from monai_condflow.transforms import get_array_transforms

    ds = CacheDataset(records, get_array_transforms(), progress=False)
    return torch.stack([d["image"] for d in ds]), torch.tensor([int(d["label"]) for d in ds])


def load_splits(run: Path, dataset_dir: Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "val" | "test": (images [N, 1, S, S], labels [N])}`` of a finished run (its data and cache), read
    through the bundle's ``common.json`` records as the stages read them."""
    from monai_condflow.utils.bundle import COMMON_CONFIG, read_bundle_config

    config = read_bundle_config([COMMON_CONFIG])
    config.update({"dataset_dir": str(dataset_dir or run / "data"), "output_dir": str(run)})
    return {k: _images(config.get_parsed_content(f"records#{k}")) for k in ("train", "val", "test")}


def main(argv: Sequence[str] | None = None) -> int:
    from monai_condflow.engines.stages import load_classifier, load_flow
    from monai_condflow.evaluation.plots import image_grid
    from monai_condflow.evaluation.tstr import blurred, predict, train_real_classifier
    from monai_condflow.metrics.sharpness import sharpness_ratio
    from monai_condflow.networks.nets import PEPXNet

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (classifier/, flow/, data/)")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: RUN/data")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--judge-epochs", type=int, default=15)
    args = parser.parse_args(argv)
    run = args.run.resolve()
    splits = load_splits(run, args.dataset_dir)
    train, val, test = splits["train"], splits["val"], splits["test"]

    def factory() -> torch.nn.Module:
        return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)

    judge_file = run / "sweep_judge.pt"
    if judge_file.is_file():
        judge = factory()
        judge.load_state_dict(torch.load(judge_file, weights_only=True))
    else:
        kwargs = {"max_epochs": args.judge_epochs, "lr": 0.002, "batch_size": 32}
        judge = train_real_classifier(train, val, network_factory=factory, train_kwargs=kwargs, seed=0)
        torch.save(judge.state_dict(), judge_file)
    judge.eval()
    reference = {
        "judge_test_accuracy": float((predict(judge, test[0]) == test[1]).float().mean()),
        "judge_real_train_agreement": float((predict(judge, train[0]) == train[1]).float().mean()),
        "judge_blurred_train_agreement": float((predict(judge, blurred(train[0])) == train[1]).float().mean()),
    }
    print(reference, flush=True)
    classifier, flow = load_classifier(run).eval(), load_flow(run).eval()
    with torch.no_grad():
        z = torch.cat([classifier.embed(train[0][i : i + 128]) for i in range(0, len(train[0]), 128)])
    labels = train[1]
    rows = []
    for temperature in args.temperatures:
        for w in args.guidance:
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(1)
            parts, over = [], []
            for i in range(0, len(z), 140):
                x, stats = flow.sample(
                    z[i : i + 140], temperature=temperature, guidance=w, generator=generator, return_stats=True
                )
                parts.append(x)
                over.append(stats["overflow_pixels"])
            x, overflow = torch.cat(parts), torch.cat(over)
            pred = predict(judge, x)
            per_class = [float((pred[labels == c] == c).float().mean()) for c in range(2)]
            row = {
                "temperature": temperature,
                "guidance": w,
                "class_agreement": float((pred == labels).float().mean()),
                "agreement_per_class": per_class,
                "images_with_overflow": int((overflow > 0).sum()),
                "overflow_pixels": int(overflow.sum()),
                "sharpness_ratio": float(sharpness_ratio(x, train[0])),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(row, flush=True)
            rows.append(row)
            pick = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(2)])
            image_grid(
                run / f"sweep_T{temperature:g}_w{w:g}.png", torch.cat([train[0][pick], x[pick]]), nrow=8, scale=3
            )
    result = {**reference, "rows": rows}
    (run / "sweep_sampling.json").write_text(json.dumps(result, indent=1) + "\n")
    print("SWEEP_SAMPLING " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
