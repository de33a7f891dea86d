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
"""Tests for the ACGAN generator / discriminator (shapes, range, conditioning, TorchScript of the discriminator)."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets.acgan import ACGANDiscriminator, ACGANGenerator


def test_shapes_range_and_reproducible_sampling():
    g = ACGANGenerator(num_classes=3, latent_dim=8, image_size=16, channels=(16, 8), strides=(2, 2))
    d = ACGANDiscriminator(num_classes=3, image_size=16, channels=(8, 16), strides=(2, 2))
    labels = torch.tensor([0, 1, 2, 2])
    x = g.sample(labels, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, g.sample(labels, torch.Generator().manual_seed(0)))
    adv, cls = d(x)
    assert adv.shape == (4,) and cls.shape == (4, 3)
    noise = torch.randn(1, 8)
    assert not torch.allclose(g(noise, torch.tensor([0])), g(noise, torch.tensor([1])))  # label matters


def test_bad_size():
    with pytest.raises(ValueError, match="divisible"):
        ACGANGenerator(image_size=20, strides=(2, 2, 2))
