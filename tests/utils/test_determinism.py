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

import random

import numpy as np
import pytest
import torch

from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.determinism import cudnn_flags, set_run_determinism


@pytest.fixture(autouse=True)
def _keep_cudnn_flags():
    before = cudnn_flags()
    yield
    torch.backends.cudnn.deterministic = before["deterministic"]
    torch.backends.cudnn.benchmark = before["benchmark"]


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.parametrize("deterministic", [True, False])
def test_both_settings_seed_alike_and_set_cudnn_as_asked(deterministic):
    # start from the opposite flags, so that a call that set nothing fails
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (not deterministic), deterministic
    set_run_determinism(7, deterministic)
    draws = _draws()
    assert cudnn_flags() == {"deterministic": deterministic, "benchmark": not deterministic}
    set_run_determinism(7, not deterministic)
    assert _draws() == draws  # the seeding does not depend on the switch
    set_run_determinism(8, deterministic)
    assert _draws() != draws


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_anything_but_a_bool_is_refused_by_the_id_name_before_seeding(value):
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(ConfigValueError, match="'deterministic'"):
        set_run_determinism(5, value)
    assert torch.equal(torch.rand(2), expected)  # nothing was seeded
