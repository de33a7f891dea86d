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
"""SampleGridHandler: per-class grids to TensorBoard and PNG on a schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from monai_condflow.handlers import SampleGridHandler
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow

S = 16


class _Writer:
    """Records add_image calls like a SummaryWriter."""

    def __init__(self):
        self.images = []

    def add_image(self, tag, img, step):
        self.images.append((tag, tuple(img.shape), step, img.clone()))

    def flush(self):
        pass


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    f = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=S, num_steps=1, num_blocks=(1, 1), hidden_channels=4
    )
    f.initialize(torch.rand(4, 1, S, S), torch.nn.functional.normalize(torch.randn(4, 32), dim=1))
    return f


def test_grids_every_n_epochs_and_at_the_end(flow, tmp_path):
    z = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    writer = _Writer()
    handler = SampleGridHandler(flow, {0: z[:2], 1: z[2:3]}, every_n_epochs=2, summary_writer=writer,
                                output_dir=tmp_path, samples_per_condition=3)  # fmt: skip
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    handler.attach(engine)  # idempotent
    engine.run([0], max_epochs=5)
    assert [(t, s) for t, _, s, _ in writer.images] == [
        ("samples/class_0", 2), ("samples/class_1", 2), ("samples/class_0", 4), ("samples/class_1", 4),
        ("samples/class_0", 5), ("samples/class_1", 5),
    ]  # fmt: skip
    tag, shape, _, img = writer.images[0]
    assert shape == (1, 2 * S + 3 * 2, 3 * S + 4 * 2)  # 2 conditions x 3 samples, 2-px padding
    assert img.min() >= 0 and img.max() <= 1
    png = np.asarray(Image.open(tmp_path / "samples_epoch0002_class0.png"))
    np.testing.assert_array_equal(png, np.rint(img[0].numpy() * 255).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"samples_epoch{e:04d}_class{c}.png" for e in (2, 4, 5) for c in (0, 1)
    )
    # fixed noise: same model -> same grid at every call
    assert torch.equal(writer.images[0][3], writer.images[2][3])
    assert flow.training


def test_tensorboard_log_dir_writer(flow, tmp_path):
    z = torch.nn.functional.normalize(torch.randn(1, 32), dim=1)
    handler = SampleGridHandler(flow, {1: z}, log_dir=tmp_path / "tb", samples_per_condition=2)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "kwargs",
    [{"every_n_epochs": 0}, {"temperature": 0.0}, {"samples_per_condition": 0}, {"conditions": {}},
     {"conditions": {0: torch.zeros(32)}}],
)  # fmt: skip
def test_bad_arguments(flow, kwargs):
    args = {"conditions": {0: torch.zeros(1, 32)}, **kwargs}
    with pytest.raises(ValueError):
        SampleGridHandler(flow, **args)
