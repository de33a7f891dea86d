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
"""Classifier resume with augmentation: a run killed mid-epoch and resumed ends with the uninterrupted run's
weights, because the loader's augmentation states are saved with each epoch's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.transforms import Compose, RandAffined, RandGaussianNoised

from monai_condflow.engines import create_classifier_trainer
from monai_condflow.networks.nets import PEPXNet
from monai_condflow.utils.distributed import create_loader

SIZE = 16


def _augmented_dataset(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        image = torch.rand(1, SIZE, SIZE, generator=g) * 0.5
        image[:, 4:12, 4:12] += 0.5 * (i % 2)
        records.append({"image": image, "label": i % 2})
    augmentation = Compose(
        [RandAffined("image", prob=0.8, rotate_range=0.2, padding_mode="border"), RandGaussianNoised("image", 0.5)]
    )
    return Dataset(records, transform=augmentation)


def _run(out: Path, resume: bool = False, kill_at_iteration: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    train = create_loader(_augmented_dataset(16, 3), batch_size=8, shuffle=True, seed=7)
    trainer, _ = create_classifier_trainer(
        net, train, None, device="cpu", max_epochs=3, lr=1e-3, output_dir=out, seed=11, iteration_log=False,
        resume_from=out if resume else None,
    )  # fmt: skip
    if kill_at_iteration is not None:

        def _kill(engine):
            raise KeyboardInterrupt

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill_at_iteration), _kill)
    trainer.run()
    return net


def test_resume_after_a_kill_mid_epoch_with_augmentation_equals_the_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full").state_dict()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", kill_at_iteration=5)  # in epoch 3: resumes from epoch 2's checkpoint
    resumed = _run(tmp_path / "cut", resume=True).state_dict()
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)
