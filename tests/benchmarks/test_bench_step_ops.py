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
    assert row["ops_one_by_one"] - row["ops_together_contiguous"] >= 10 * (row["convolutions"] - row["sizes"])
    assert row["compose_ops_together"] < row["compose_ops_one_by_one"] / 3
    # 18 couplings x 2 3x3 convolutions + 2 x 2 of the split priors; with contiguous weights the gradient of each
    # comes out channels-last (the activations' layout) and is copied to the weight's layout, with channels-last
    # weights it is not: exactly one copy fewer per such weight, nothing else changes, and no value either
    assert row["kxk_conv_weights"] == 40
    assert row["copy_ops_together_contiguous"] - row["copy_ops_together"] == row["kxk_conv_weights"]
    assert row["ops_together_contiguous"] - row["ops_together"] == row["kxk_conv_weights"]
    assert row["layout_bit_identical"] is True
    # the data-independent log-determinants summed per level (4 levels): ActNorm's and the 1x1 convolution's sum,
    # product, expansion and addition to the chain, forward and backward, go (>= 4 operations per such layer), a
    # handful per level come; the gradients as before, the loss up to the order of its summation
    assert row["constant_logdet_layers"] == 2 * 18
    assert row["ops_together"] - row["ops_batched_logdets"] >= 4 * row["constant_logdet_layers"]
    assert row["logdets_loss_rel_diff"] < 1e-6 and row["grad_rel_diff_batched_logdets"] < 1e-3
    assert row["loss_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-3
    assert all(row[f"cpu_ms_{name}"] > 0 for name in bench.CONFIGS)
    assert (f"| small | 2 | 18 (4) | {row['ops_one_by_one']:,} | {row['ops_together_contiguous']:,} | "
            f"{row['ops_together']:,} | {row['ops_batched_logdets']:,} | ") in out
    assert json.loads(out.strip().splitlines()[-1].split(" ", 1)[1]) == [row]


def test_the_pass_alone_is_counted():
    """The count is the loss and its backward pass only: the gradients' copies made for the comparison are not
    in it (the twenty-sixth session's figures counted one copy per parameter tensor on top of the pass)."""
    bench = load_benchmark("bench_step_ops")
    flow, x, z = bench.build("small", 2, 0)
    flow.compose_convs_together = True
    bench.training_pass(flow, x, z)
    flow.zero_grad(set_to_none=True)
    counter = bench.OpCounter()
    with counter:
        (-flow.log_prob(x, z).mean()).backward()
    row = bench.measure("small", 2, reps=1)
    assert row["ops_together"] == counter.count  # the flow is built with channels-last weights
