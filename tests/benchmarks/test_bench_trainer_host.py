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
"""benchmarks/bench_trainer_host.py: the host-copy counter tells device reads from host copies, the model clock takes
the model's parts out of an iteration, and a run reports both trainers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_trainer_host")


def test_the_counter_tells_device_reads_from_host_copies(bench):
    counter = bench.HostCopies()
    x = torch.ones(3, requires_grad=True)
    with counter:
        counter.on = True
        loss = (2 * x).sum()
        loss.item()  # a computed value: a wait for the device on a GPU
        float(loss.detach())
        host = torch.tensor(6.0)  # made by the host from a number: free anywhere
        host.item()
        bool(host > 0)  # a comparison computes a new tensor: counted
        counter.on = False
        loss.item()  # not counted while off
    assert counter.calls == 4 and counter.device_reads == 3


def test_the_model_clock_counts_only_the_wrapped_parts(bench):
    clock = bench.ModelTime()
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    class Embedder(torch.nn.Module):
        def embed(self, x):
            time.sleep(0.02)
            return x

    classifier = Embedder()
    clock.attach(net, opt, classifier)
    net(torch.ones(1, 2)).sum().backward()  # the forward is timed (backward is wrapped by time_epochs)
    opt.step()
    classifier.embed(torch.ones(1))
    time.sleep(0.05)  # outside the model: not counted
    assert 0.02 <= clock.seconds < 0.05


def test_a_run_reports_both_trainers(bench, tmp_path: Path):
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # not what the trainers set
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    try:
        result = bench.main(["--preset", "small", "--hidden", "4", "--size", "16", "--classifier", "small",
                             "--iters", "4", "--reps", "1", "--loader-batch", "4", "--loader-batches", "2",
                             "--out", str(out)])  # fmt: skip
        # the process as it was: the trainers' set_determinism and --threads 1 apply to the benchmark only
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    assert json.loads(out.read_text()) == result
    for name in ("ours", "peer"):
        r = result[name]
        assert r["iteration_ms"] > r["host_ms"] > 0 and len(r["host_ms_reps"]) == 1
        assert r["host_copies_per_iter"] >= r["device_reads_per_iter"] > 0
    # ours reads the device once per step (+ the loader's 2 reads of its sampler per epoch); the peer's decollation
    # and handlers read the device loss and more
    assert result["ours"]["device_reads_per_iter"] == pytest.approx(1 + 2 / 4)
    assert result["peer"]["device_reads_per_iter"] > result["ours"]["device_reads_per_iter"]
    assert torch.autograd.backward.__name__ == "backward"  # the clock's wrapper was removed
    loader = result["loader"]
    assert loader["batch"] == 4 and loader["ms_per_batch_copy_cache_false"] > 0
    assert loader["ms_per_batch_copy_cache_true"] > 0
    assert loader["dequantize_us_package"] > 0 and loader["dequantize_us_before"] > 0
