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
"""Tests of the TensorBoard embedding-projector handler."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from monai_condflow.handlers import EmbeddingProjectorHandler


class TinyEmbedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(16, 4))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.g(x), dim=1)


def _loader(n: int = 6) -> DataLoader:
    records = [{"image": torch.rand(1, 4, 4), "label": i % 2 if i < n - 1 else -1} for i in range(n)]
    return DataLoader(Dataset(records), batch_size=4, shuffle=False)


def test_writes_projector_files_every_epoch(tmp_path):
    presumptive = torch.tensor([0, 1, 1, 1, 0, 1])
    handler = EmbeddingProjectorHandler(
        TinyEmbedder(),
        _loader(),
        log_dir=str(tmp_path),
        tag="z",
        every_n_epochs=1,
        label_names=["non-COVID", "COVID"],
        presumptive_labels=lambda: presumptive,
    )
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    handler.attach(engine)  # idempotent
    engine.run([0], max_epochs=2)

    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2  # epochs 1 and 2; COMPLETED does not write epoch 2 again
    for step in ("00001", "00002"):
        folder = tmp_path / step / "z"
        rows = (folder / "tensors.tsv").read_text().strip().splitlines()
        assert len(rows) == 6 and len(rows[0].split("\t")) == 4
        metadata = (folder / "metadata.tsv").read_text().strip().splitlines()
        assert metadata[0] == "label\tpresumptive"
        assert metadata[1:3] == ["non-COVID\tnon-COVID", "COVID\tCOVID"]
        assert metadata[-1] == "unlabelled\tCOVID"


def test_direct_write_with_images_and_errors(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    handler = EmbeddingProjectorHandler(TinyEmbedder(), _loader(), summary_writer=writer, with_images=True)
    z = handler.write(global_step=0)
    writer.close()
    assert z.shape == (6, 4)
    folder = tmp_path / "00000" / "embedding"
    assert (folder / "sprite.png").is_file()
    assert (folder / "metadata.tsv").read_text().strip().splitlines() == ["0", "1", "0", "1", "0", "unlabelled"]
    bad = EmbeddingProjectorHandler(TinyEmbedder(), _loader(), log_dir=str(tmp_path), presumptive_labels=[0, 1])
    with pytest.raises(ValueError, match="presumptive"):
        bad.write()
    with pytest.raises(ValueError, match="summary_writer"):
        EmbeddingProjectorHandler(TinyEmbedder(), _loader())
    with pytest.raises(ValueError, match="every_n_epochs"):
        EmbeddingProjectorHandler(TinyEmbedder(), _loader(), log_dir=str(tmp_path), every_n_epochs=0)
