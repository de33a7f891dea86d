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
"""``benchmarks/gpu_check.sh --cpu``: the GPU check's every section, small, on the CPU (the graph modes fall back),
plus its end-to-end bundle run; and a failing section is reported without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.benchmarks.script import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.slow


def test_gpu_check_script_runs_every_section_on_the_cpu(tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "CONDFLOW_PROGRESS": "0"}
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu", str(out)], capture_output=True,
                          text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    train = report["train"]
    modes = ["fp32", "tf32", "bf16", "tf32+graphs", "bf16+graphs", "bf16+compile", "bf16+compile+graphs"]
    assert [r["mode"] for r in train] == modes
    assert report["env"]["compile_backend"] == "aot_eager"  # the CPU check traces; inductor: test_compiled_steps.py
    for r in train:
        assert "error" not in r and r["loss_finite"] and r["train_img_s"] > 0
        assert not r["graphed"]  # no CUDA: the graph modes trained eagerly
        assert r["compiled"] == ("compile" in r["mode"])
    by_mode = {r["mode"]: r for r in train}
    assert by_mode["fp32"]["roundtrip_max_abs"] < 1e-4 and by_mode["fp32"]["bpd_max_abs_diff_vs_fp32"] == 0.0
    for mode in ("bf16", "bf16+compile"):
        assert 0 < by_mode[mode]["roundtrip_max_abs"] < 1e-2 and 0 < by_mode[mode]["bpd_max_abs_diff_vs_fp32"] < 0.01
    profile = report["profile"]
    assert [(p["mode"], p["compiled"]) for p in profile] == [("bf16", False), ("bf16+compile", True)]
    for p in profile:
        assert "error" not in p and p["cpu_self_ms_per_step"] > 0 and p["wall_ms_per_step"] > 0
        assert 0 < len(p["top"]) <= 15 and all(t["calls_per_step"] > 0 for t in p["top"])
    names = {t["name"] for t in profile[0]["top"]}
    assert any("convolution" in n for n in names)  # the eager step's time is where a CPU step spends it
    exact = report["graphs_exact"][0]
    assert exact["recorded_batch"]["loss_abs_diff"] == 0.0 and exact["new_batch"]["grad_max_abs_diff_rel"] == 0.0
    sample = report["sample"]
    assert [r["mode"] for r in sample] == ["fp32", "tf32", "tf32+graphs", "bf16+graphs", "bf16+compile+graphs"]
    assert all(r["sample_img_s"] > 0 and not r["graphed"] for r in sample)
    assert [r["compiled"] for r in sample] == [False, False, False, False, True]
    assert sample[2]["vs_eager_max_abs"] == 0.0  # graph mode on the CPU: the eager decoder itself
    assert sample[4]["vs_eager_max_abs"] < 1e-2  # the traced bf16 decoder against the eager bf16 one
    assert [(w["images"], w["manifest_rows"], w["threads"]) for w in report["write"]] == [(40, 40, 16), (4, 4, 1)]
    assert "e2e: exit 0" in proc.stdout
    assert (out / "e2e.log").is_file() and (out / "e2e_report.md").is_file()


def test_modes_are_a_precision_with_compile_and_or_graphs():
    parse_mode = load_benchmark("gpu_check").parse_mode
    assert parse_mode("bf16+compile+graphs") == ("bf16", True, True)
    assert parse_mode("tf32+graphs") == ("tf32", False, True)
    assert parse_mode("fp32") == ("fp32", False, False)
    for bad in ("fp16", "bf16+fast", "bf16+graphs+graphs", "+graphs"):
        with pytest.raises(ValueError, match="unknown mode"):
            parse_mode(bad)


def test_a_failed_section_is_reported_and_the_others_still_run(capsys):
    gpu_check = load_benchmark("gpu_check")
    results: dict = {}
    gpu_check.run_section("train", lambda: 1 / 0, results)
    gpu_check.run_section("train", lambda: {"ok": 1}, results)
    assert results["train"][0]["error"] == "ZeroDivisionError: division by zero"
    assert results["train"][1]["ok"] == 1
    assert "ZeroDivisionError" in capsys.readouterr().err  # the traceback is printed too


def test_a_measurement_past_the_budget_is_skipped_and_reported(capsys):
    gpu_check = load_benchmark("gpu_check")
    results: dict = {}
    ran = []
    now = time.perf_counter()
    gpu_check.run_section("train", lambda: ran.append(1) or {"ok": 1}, results, deadline=now + 3600)
    gpu_check.run_section("sample", lambda: ran.append(2) or {"ok": 2}, results, deadline=now - 1)
    assert ran == [1] and results["train"][0]["ok"] == 1
    assert results["sample"] == [{"skipped": "the --budget-s time budget is spent"}]
    assert 'sample: {"skipped"' in capsys.readouterr().out
