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
"""End to end on real chest CT (UCSD COVID-CT, official patient-disjoint split) with the small presets:
classifier -> flow (conditioned on the frozen classifier's embeddings) -> generation. Skipped without ../shared."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import Dataset

from monai_condflow.data.npz import load_npz_dataset
from monai_condflow.engines.classifier import compute_embeddings, train_classifier
from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.engines.generation import generate
from monai_condflow.networks.nets import ConditionalGlow, PEPXNet
from monai_condflow.transforms import get_array_transforms
from monai_condflow.utils.distributed import create_loader


def test_ucsd_classifier_flow_generation(shared_data: Path, tmp_path: Path):
    torch.manual_seed(0)
    npz = shared_data / "ucsd_covid_ct_64.npz"
    train, val = load_npz_dataset(npz, split="train"), load_npz_dataset(npz, split="val")
    plain = get_array_transforms()
    classifier = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    result = train_classifier(
        classifier, Dataset(train, plain), Dataset(val, plain), device="cpu", max_epochs=6, batch_size=32, lr=3e-3,
        lr_decay=0.99, class_weights="balanced", num_classes=2, iteration_log=False, output_dir=tmp_path / "cls",
    )  # fmt: skip
    assert result["best_metric"] > 0.5  # val macro-F1: a constant guess scores about 0.35, a coin 0.5
    z, _ = compute_embeddings(classifier, create_loader(Dataset(val, plain), 64, shuffle=False, seed=0), "cpu")
    assert torch.allclose(z.norm(dim=1), torch.ones(len(val)), atol=1e-5)

    flow = ConditionalGlow.from_preset("small", num_steps=(2, 2, 2), hidden_channels=(16, 32, 48))
    deq = get_array_transforms(n_bits=8)
    train_loader = create_loader(Dataset(train, deq), batch_size=32, shuffle=True, seed=0, drop_last=True)
    val_loader = create_loader(Dataset(val, deq), batch_size=64, shuffle=False, seed=0)
    trainer, evaluator = create_flow_trainer(
        flow, classifier, train_loader, val_loader, device="cpu", max_epochs=2, output_dir=tmp_path / "flow",
        lr=2e-3, warmup_epochs=1, tensorboard=False,
    )  # fmt: skip
    evaluator.run()  # bits/dim of the initialised, untrained flow
    bpd_init = evaluator.state.metrics["val_bpd"]
    trainer.run()
    assert evaluator.state.best_metric < bpd_init

    manifest = generate(
        flow, classifier, Dataset(val[:12], plain), output_dir=tmp_path / "syn", model_version="e2e-test",
        formats=("png",), seed=1,
    )  # fmt: skip
    rows = manifest.read_text().splitlines()
    assert len(rows) == 13 and all("e2e-test" in row for row in rows[1:])
    assert len(list((tmp_path / "syn").glob("synthetic_*.png"))) == 12
