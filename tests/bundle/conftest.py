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

"""Fixtures of the bundle tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_condflow.data.phantom import generate_phantom_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A small phantom folder (48 slices of 64 px, 12 patients) for stages run at a tiny budget."""
    data = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(data, num_images=48, seed=3, image_size=64, slices_per_patient=4, overwrite=True)
    return data
