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
"""benchmarks/bench_step_ops.py: its operation counter against hand-counted passes, and one small run."""

from __future__ import annotations

import json

import torch

from tests.benchmarks.script import load_benchmark


def test_the_counter_counts_computing_operations_not_views():
    bench = load_benchmark("bench_step_ops")
    a = torch.randn(4, 3, requires_grad=True)
    counter = bench.OpCounter()
    with counter:
        y = (a.t() * 2.0).unsqueeze(0)  # t and unsqueeze are views: one mul
        y.sum().backward()  # sum, then its backward: expand (a view) and mul's backward (one mul)
    assert counter.by_name.get("mul") == 2 and counter.by_name.get("sum") == 1
    assert not {"t", "unsqueeze", "expand"} & set(counter.by_name)
    assert counter.count == sum(counter.by_name.values())


def test_small_run_composes_fewer_operations_with_the_same_pass(capsys):
    bench = load_benchmark("bench_step_ops")
    (row,) = bench.main(["--presets", "small", "--batch", "2", "--reps", "1"])
    out = capsys.readouterr().out
    assert row["convolutions"] == 18 and row["sizes"] == 4  # the small preset: 4 + 2 x 4 + 6 steps, 4 sizes
    # one batched composition per size instead of one per convolution: >= 10 operations fewer per extra convolution
    assert row["ops_one_by_one"] - row["ops_together"] >= 10 * (row["convolutions"] - row["sizes"])
    assert row["compose_ops_together"] < row["compose_ops_one_by_one"] / 3
    assert row["loss_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-3
    assert row["cpu_ms_one_by_one"] > 0 and row["cpu_ms_together"] > 0
    assert f"| small | 18 (4) | {row['ops_one_by_one']:,} | {row['ops_together']:,} |" in out
    assert json.loads(out.strip().splitlines()[-1].split(" ", 1)[1]) == [row]
