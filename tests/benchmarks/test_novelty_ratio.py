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
"""benchmarks/novelty_ratio.py: the flow cache and the early-epoch snapshots used as a background model."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets import ConditionalGlow
from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("novelty_ratio")


def _tiny(seed: int = 0) -> ConditionalGlow:
    torch.manual_seed(seed)
    return ConditionalGlow.from_preset(
        "small", image_size=16, condition_dim=0, num_levels=2, num_steps=1, num_blocks=(1, 1), hidden_channels=4
    )


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(64, 1, 16, 16, generator=g) * 255).round() / 255


def test_cached_flow_saves_the_final_and_early_weights_and_reuses_them(bench, tmp_path):
    flow = _tiny()
    bpd = bench._cached_flow(flow, _images(), 2, 0, tmp_path, "main", bench.EARLY_EPOCHS, 1)
    final, early = tmp_path / "main_s0_e2.pt", tmp_path / "main_s0_e2_at1.pt"
    assert final.is_file() and early.is_file()
    saved_final = torch.load(final, weights_only=True)
    saved_early = torch.load(early, weights_only=True)
    assert saved_final["train_bpd"] == pytest.approx(bpd)
    assert any(not torch.equal(saved_final["network"][k], v) for k, v in saved_early["network"].items())
    for k, v in flow.state_dict().items():
        assert torch.equal(saved_final["network"][k], v)
    # a second call loads instead of training: another initialisation ends with the cached weights, no training
    again = _tiny(seed=5)
    calls = []
    real = bench.train_flow
    bench.train_flow = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert bench._cached_flow(again, _images(), 2, 0, tmp_path, "main", bench.EARLY_EPOCHS, 1) == pytest.approx(bpd)
    finally:
        bench.train_flow = real
    assert not calls
    for k, v in again.state_dict().items():
        assert torch.equal(saved_final["network"][k], v)


def test_early_background_needs_a_cache(bench):
    with pytest.raises(ValueError, match="--cache"):
        bench._cached_flow(_tiny(), _images(), 2, 0, None, "main", need=1)
