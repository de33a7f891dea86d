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
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.transforms import Compose, ScaleIntensityRanged

from monai_condflow.transforms import get_preprocess_transforms
from monai_condflow.utils.fingerprint import describe_transform, transform_fingerprint


def test_equal_settings_equal_fingerprint_in_another_process():
    """No address, id or random state in the description: a chain built in a fresh interpreter agrees."""
    here = transform_fingerprint(get_preprocess_transforms(image_size=32))
    code = (
        "from monai_condflow.transforms import get_preprocess_transforms as g; "
        "from monai_condflow.utils.fingerprint import transform_fingerprint as f; print(f(g(image_size=32)))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert there[-1] == here and len(here) == 16


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 16}, {"window": (40.0, 400.0)}, {"intensity": "uint16"}, {"crop": "none"}, {"box_margin": 2},
     {"resize_mode": "bilinear"}],  # fmt: skip
)
def test_each_setting_of_the_chain_changes_the_fingerprint(kwargs):
    base = {"image_size": 32}
    assert transform_fingerprint(get_preprocess_transforms(**{**base, **kwargs})) != transform_fingerprint(
        get_preprocess_transforms(**base)
    )


def test_description_of_values_arrays_and_monai_transforms():
    assert describe_transform([1, 2.5, "a", None, True]) == [1, 2.5, "a", None, True]
    assert describe_transform(np.arange(3, dtype=np.int16)) == {"array": "int16", "values": [0, 1, 2]}
    big = describe_transform(torch.zeros(100))
    assert big["shape"] == [100] and len(big["sha256"]) == 16
    assert big != describe_transform(torch.ones(100))
    chain = Compose([ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True)])
    text = json.dumps(describe_transform(chain))
    assert "ScaleIntensityRanged" in text and "-1000" in text and "RandomState" in text  # a generator: its class only
    other = Compose([ScaleIntensityRanged("image", a_min=-1000, a_max=300, b_min=0.0, b_max=1.0, clip=True)])
    assert transform_fingerprint(other) != transform_fingerprint(chain)
    cyclic = Compose([])
    cyclic.me = cyclic  # a reference cycle ends in the class name
    assert describe_transform(cyclic)["me"] == "monai.transforms.compose.Compose"
