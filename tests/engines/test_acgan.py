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
"""Tests for ACGAN training: losses by hand, one short training run, checkpoint loadable by run_evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from monai_condflow.engines.acgan import acgan_d_loss, acgan_g_loss, train_acgan
from monai_condflow.evaluation.report import load_module
from monai_condflow.networks.nets.acgan import ACGANDiscriminator, ACGANGenerator


def test_losses_hand_values():
    zero = (torch.zeros(2), torch.zeros(2, 2))  # logits 0: BCE = CE = log 2
    labels = torch.tensor([0, 1])
    assert float(acgan_d_loss(zero, zero, labels, labels)) == pytest.approx(4 * math.log(2))
    assert float(acgan_g_loss(zero, labels)) == pytest.approx(2 * math.log(2))


def test_train_and_reload(tmp_path):
    imgs = torch.rand(24, 1, 8, 8)
    labels = torch.arange(24) % 2
    g = ACGANGenerator(num_classes=2, latent_dim=8, image_size=8, channels=(8, 4), strides=(2, 2), num_res_units=0)
    d = ACGANDiscriminator(num_classes=2, image_size=8, channels=(4, 8), strides=(2, 2), num_res_units=0)
    res = train_acgan(g, d, imgs, labels, max_epochs=2, batch_size=8, output_dir=tmp_path / "acgan")
    assert res["epochs"] == 2 and len(res["g_loss"]) == 2 and all(math.isfinite(v) for v in res["d_loss"])
    factory = lambda: ACGANGenerator(2, 8, 8, channels=(8, 4), strides=(2, 2), num_res_units=0)  # noqa: E731
    g2 = load_module(tmp_path / "acgan", factory, "acgan")
    y = torch.tensor([0, 1])
    assert torch.equal(
        g2.sample(y, torch.Generator().manual_seed(1)), g.eval().sample(y, torch.Generator().manual_seed(1))
    )
