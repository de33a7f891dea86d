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
"""benchmarks/bench_compile_steps.py: the twins start equal, the compiled one runs compiled code in both uses, and
every figure is reported (``aot_eager``: no code generation, so fast)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmarks.script import load_benchmark

TINY = json.dumps({"num_levels": 2, "num_steps": 2, "num_blocks": [1, 1], "hidden_channels": 8})


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_compile_steps")


def test_twins_have_the_same_weights_and_no_identity_coupling(bench):
    (a, b), x, z = bench.twins("small", 16, 4, 0, **json.loads(TINY))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    outs = [p for n, p in a.named_parameters() if "conv_out" in n]
    assert outs and all(p.abs().max() > 0 for p in outs)  # zero-initialised in Glow; perturbed here
    assert x.shape == (4, 1, 16, 16) and torch.allclose(z.norm(dim=1), torch.ones(4))


def test_the_run_reports_every_figure_and_compiled_calls(bench, capsys):
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    results = bench.main(["--presets", "small", "--size", "16", "--batch", "4", "--sample-batch", "6", "--rounds", "2",
                          "--backend", "aot_eager", "--overrides", TINY, "--threads", "1"])  # fmt: skip
    assert torch.get_num_threads() == threads  # --threads 1 did not leak into the caller
    (r,) = results
    assert r["preset"] == "small" and r["batch"] == 4 and r["sample_batch"] == 6 and not r["compile_failed"]
    # 4 steps x (first + 2 rounds) training calls + 4 steps x (first + 2 rounds) samples, all compiled
    assert r["compiled_calls"] == 4 * 3 * 2
    assert r["loss_abs_diff"] < 1e-4 and r["grad_max_abs_diff_rel"] < 1e-4 and r["sample_max_abs_diff"] < 1e-4
    for use in ("train", "sample"):
        assert r[use]["eager_ms"] > 0 and r[use]["compiled_ms"] > 0 and r[use]["paired_ratio_median"] > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("json=") and json.loads(out[-1][5:]) == results
