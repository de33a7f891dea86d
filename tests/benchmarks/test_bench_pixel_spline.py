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
"""benchmarks/bench_pixel_spline.py: the package's bins-first knots equal the row-by-row peer's, and the run reports."""

from __future__ import annotations

import json

import pytest
import torch

from monai_condflow.networks.blocks.pixel_spline import PixelSpline
from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_pixel_spline")


def test_bins_first_knots_equal_the_row_by_row_peer(bench):
    torch.manual_seed(0)
    spline = PixelSpline(2, 1, (8, 8), num_bins=5, condition_dim=6, condition_factor=2)
    with torch.no_grad():
        for p in spline.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device))
    offsets = spline._offsets(torch.zeros(3, 1, 8, 8), torch.randn(3, 6))
    for args in ((), (offsets,)):  # unconditional [C, H, W, bins] and per-image [B, C, H, W, bins] knots
        ours = spline._knots(*args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PixelSpline, "_bin_edges", bench.row_by_row_edges)
            peer = spline._knots(*args)
        for a, b in zip(ours, peer):
            assert a.shape == b.shape and a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.equal(ours[0][..., 0], torch.full_like(ours[0][..., 0], -spline.tail_bound))
        assert torch.equal(ours[1][..., -1], torch.full_like(ours[1][..., -1], spline.tail_bound))


def test_the_benchmark_times_both_and_restores_the_package(bench, capsys):
    out = bench.main(["--batch", "2", "--size", "16", "--reps", "1"])
    assert PixelSpline._bin_edges is not bench.row_by_row_edges  # the patch is undone
    for name in ("spline", "train_step", "decode_step"):
        assert out[name]["ours_ms"] > 0 and out[name]["peer_ms"] > 0
    assert out["max_abs_diff"]["decoded_image"] < 1e-4 and out["max_abs_diff"]["log_prob_relative"] < 1e-5
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("BENCH_PIXEL_SPLINE ") and json.loads(last.split(" ", 1)[1])["batch"] == 2
