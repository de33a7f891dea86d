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
import torch

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
    # run order: the target mode, the compiled and graphed one, then the comparisons
    modes = ["bf16+graphs", "bf16+compile+graphs", "bf16+graphs+tune", "bf16+graphs+ld1", "bf16+graphs+cw",
             "bf16+graphs+lu1+cw+ld1", "fp32", "tf32", "bf16", "tf32+graphs", "bf16+compile"]  # fmt: skip
    assert [r["mode"] for r in train] == modes
    assert report["env"]["compile_backend"] == "aot_eager"  # the CPU check traces; inductor: test_compiled_steps.py
    flops = report["env"]["flops"]
    # the backward pass of a convolution costs two of its forward passes: training ~3x sampling (paper: 18.2 / 6.1)
    assert flops["sample_gflop_per_image"] > 0
    assert 2.5 < flops["train_gflop_per_image"] / flops["sample_gflop_per_image"] < 3.5
    for r in train:
        assert "error" not in r and r["loss_finite"] and r["train_img_s"] > 0
        assert not r["graphed"]  # no CUDA: the graph modes trained eagerly
        assert r["compiled"] == ("compile" in r["mode"])
        # read off the flow's weights: +cw really trained contiguous weights, the rest the flow's own layout
        assert r["conv_weights"] == ("contiguous" if "+cw" in r["mode"] else "channels_last")
        assert r["logdets_batched"] is False  # the CPU's default; +ld1 sets it off everywhere
        assert r["cudnn_autotuned"] is False  # no cuDNN on the CPU, +tune or not
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
    assert [r["mode"] for r in sample] == ["bf16+graphs", "bf16+compile+graphs", "fp32", "tf32", "tf32+graphs",
                                           "bf16+graphs+cw", "bf16+graphs+tune"]  # fmt: skip
    assert all(r["sample_img_s"] > 0 and not r["graphed"] and not r["cudnn_autotuned"] for r in sample)
    assert [r["compiled"] for r in sample] == [False, True, False, False, False, False, False]
    assert [r["conv_weights"] for r in sample] == ["channels_last"] * 5 + ["contiguous", "channels_last"]
    assert [p["conv_weights"] for p in profile] == ["channels_last"] * 2
    assert sample[4]["vs_eager_max_abs"] == 0.0  # graph mode on the CPU: the eager decoder itself
    assert sample[1]["vs_eager_max_abs"] < 1e-2  # the traced bf16 decoder against the eager bf16 one
    # the bundle's trainer (EMA, handlers, the classifier's embedding per batch) in the target mode
    trainer = report["trainer"]
    assert [(r["batch"], r["mode"], r["classifier"]) for r in trainer] == [(4, "bf16+graphs", "small")]
    assert trainer[0]["trainer_img_s"] > 0 and trainer[0]["skipped_steps"] == 0 and not trainer[0]["graphed"]
    assert trainer[0]["conv_weights"] == "channels_last"
    # generate.json's formats: a PNG and a NIfTI file per image
    assert [(w["images"], w["manifest_rows"], w["threads"], w["files"], w["formats"]) for w in report["write"]] == [
        (40, 40, 16, 80, "png+nifti"),
        (4, 4, 1, 8, "png+nifti"),
    ]
    # the summary: every measured mode in the tables, and the targets (no 64 px batch-80 figure on the CPU)
    summary = (out / "gpu_check.md").read_text()
    assert summary in proc.stdout
    for mode in modes:
        assert f"| 4 | {mode} |" in summary
    assert "| 4 | bf16+compile+graphs | " in summary and summary.count("| compiled |") == 3  # 2 train rows, 1 sample
    bare = next(r["train_img_s"] for r in train if r["mode"] == "bf16+graphs")
    ratio = f"{round(trainer[0]['trainer_img_s'] / bare, 2):,.2f}"
    assert f"| 4 | bf16+graphs | {trainer[0]['trainer_img_s']:,.1f} | " in summary and f" | {ratio} | " in summary
    assert "- training at batch 80 >= 2,000 img/s: not measured" in summary
    assert "Not measured:" not in summary  # no budget on the CPU: nothing skipped
    assert "e2e: exit 0" in proc.stdout
    assert (out / "e2e.log").is_file() and (out / "e2e_report.md").is_file()


def test_the_time_bound_keeps_what_was_measured_and_names_what_was_cut(tmp_path: Path):
    """The GPU run's time bound, exercised on the CPU: a 200,000-image write cannot end in the budget, so the script
    stops it, keeps the sampling rows measured before it, names the write, and still ends within the total."""
    out, scratch = tmp_path / "out", tmp_path / "tmp"  # the run's own temporary folder: leftovers are its own
    scratch.mkdir()
    env = {**os.environ, "CONDFLOW_PROGRESS": "0", "GPU_CHECK_TOTAL_S": "60", "GPU_CHECK_GRACE_S": "5",
           "E2E_TIMEOUT": "0", "GPU_CHECK_ARGS": "--sections sample,write --write-images 200000",
           "TMPDIR": str(scratch)}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    seconds = time.perf_counter() - t0
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]  # a measurement was stopped
    assert seconds <= 60 + 5, seconds
    assert "gpu_check.py stopped at its time limit" in proc.stdout and "e2e: not run" in proc.stdout
    # ended after the SIGTERM (timeout: 124), which removes the write folder (tens of thousands of files), not killed
    # mid-way by the SIGKILL that follows GPU_CHECK_KILL_S later (137)
    assert "gpu_check.py exited with 124" in proc.stdout, proc.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["running"] == {"section": "write", "images": 200000, "threads": 16}
    sampled = [r["mode"] for r in report["sample"]]
    assert sampled == ["bf16+graphs", "bf16+compile+graphs", "fp32", "tf32", "tf32+graphs", "bf16+graphs+cw",
                       "bf16+graphs+tune"]  # fmt: skip
    assert all(r["sample_img_s"] > 0 for r in report["sample"]) and "write" not in report
    assert not list(scratch.iterdir())  # the stopped write's folder is removed
    summary = (out / "gpu_check.md").read_text()
    assert "- write images 200000, threads 16: did not end (the run was stopped or crashed)" in summary
    assert "| bf16+compile+graphs | 8 |" in summary


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
    budget = gpu_check.Budget(3600.0, {"slow": 7200.0})
    gpu_check.run_section("train", lambda: ran.append(1) or {"ok": 1}, results, budget, label={"mode": "fp32"})
    gpu_check.run_section("train", lambda: ran.append(2), results, budget, "slow", label={"mode": "tf32"})
    spent = gpu_check.Budget(1e-9)
    time.sleep(0.01)
    gpu_check.run_section("sample", lambda: ran.append(3) or {"ok": 3}, results, spent, label={"mode": "bf16"})
    assert ran == [1] and results["train"][0]["ok"] == 1
    assert results["train"][1] == {"mode": "tf32", "skipped": "needs ~7200 s of the budget, 3600 s left"}
    assert results["sample"] == [{"mode": "bf16", "skipped": "the --budget-s time budget is spent"}]
    assert 'sample: {"mode": "bf16", "skipped"' in capsys.readouterr().out


def test_the_budget_estimates_a_kind_and_size_by_its_longest_measured_run():
    gpu_check = load_benchmark("gpu_check")
    budget = gpu_check.Budget(100.0, {"train": 20.0})
    assert budget.estimate("train", 80) == 20.0 and budget.estimate("write") == 0.0  # unknown kinds: while time is left
    budget.record("train", 8.0, 80)
    budget.record("train", 4.0, 80)
    assert budget.estimate("train", 80) == 10.0  # 1.25 x the longest, not the default
    assert budget.estimate("train", 320) == 20.0  # another batch size: not estimated from batch 80
    assert budget.why_not("train", 80) is None
    budget.record("train", 90.0, 80)
    assert budget.why_not("train", 80).startswith("needs ~112 s of the budget")
    assert gpu_check.Budget(None).why_not("anything") is None
    # the clock can start before the budget is made (gpu_check.py counts from before its imports)
    assert gpu_check.Budget(100.0, start=time.perf_counter() - 99.5).left() < 0.5


def test_the_lu1_cw_and_ld1_options_set_the_flow_and_sort_after_their_mode():
    import argparse

    gpu_check = load_benchmark("gpu_check")
    assert gpu_check.parse_mode("bf16+graphs+lu1") == ("bf16", False, True) and gpu_check.one_by_one("bf16+graphs+lu1")
    assert not gpu_check.one_by_one("bf16+graphs") and not gpu_check.contiguous_weights("bf16+graphs+lu1")
    assert gpu_check.parse_mode("bf16+graphs+lu1+cw") == ("bf16", False, True)
    assert gpu_check.contiguous_weights("bf16+graphs+lu1+cw") and gpu_check.one_by_one("bf16+graphs+lu1+cw")
    assert gpu_check.logdets_per_layer("bf16+graphs+ld1") and not gpu_check.logdets_per_layer("bf16+graphs+lu1+cw")
    assert gpu_check.autotuned("bf16+graphs+tune") and not gpu_check.autotuned("bf16+graphs+ld1")
    for bad in ("bf16+lu2", "bf16+cw+cw", "bf16+ld2", "bf16+tune+tune"):
        with pytest.raises(ValueError, match="lu1"):
            gpu_check.parse_mode(bad)
    modes = ["bf16+graphs+lu1+cw", "bf16+graphs+lu1", "fp32", "bf16+graphs+cw", "bf16+graphs+ld1", "bf16+graphs",
             "bf16", "bf16+graphs+tune"]  # fmt: skip
    assert sorted(modes, key=gpu_check._order) == [
        "fp32", "bf16", "bf16+graphs", "bf16+graphs+tune", "bf16+graphs+ld1", "bf16+graphs+lu1", "bf16+graphs+cw",
        "bf16+graphs+lu1+cw"
    ]  # fmt: skip
    args = argparse.Namespace(preset="small", size=16, seed=0, flow_overrides=gpu_check.CPU_FLOW, fused_adam=False,
                              compile_backend="aot_eager")  # fmt: skip
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # devices are only named here, nothing runs on them

    def kxk(flow):  # the convolutions whose weight layout the option changes (1x1 kernels have one layout)
        return [m.weight for m in flow.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[2:].numel() > 1]

    for mode, expected, channels_last in (("fp32+lu1+cw+ld1", False, False), ("fp32", None, True)):
        flow = gpu_check.train_setup(args, cpu, 2, mode)[1]
        assert flow.compose_convs_together is expected and flow.batch_constant_logdets is expected
        # what a row reports: per level on CUDA unless +ld1, never on the CPU (its default)
        assert gpu_check.logdets_batched(flow, cuda) is (expected is None)
        assert gpu_check.logdets_batched(flow, cpu) is False
        assert all(w.is_contiguous(memory_format=torch.channels_last) is channels_last for w in kxk(flow))
        assert all(w.is_contiguous() is not channels_last for w in kxk(flow))
        assert gpu_check.weights_layout(flow) == ("channels_last" if channels_last else "contiguous")
        # what a row reports: together on CUDA unless +lu1, never on the CPU (its default), never for compiled steps
        assert gpu_check.convs_together(flow, cuda) is (expected is None)
        assert gpu_check.convs_together(flow, cpu) is False
    kxk(flow)[0].data = kxk(flow)[0].data.contiguous()
    assert gpu_check.weights_layout(flow) == "mixed"
    flow.compile_steps(backend="aot_eager")
    flow.zero_grad()
    (-flow.log_prob(*gpu_check.make_batch(2, 16, torch.Generator().manual_seed(0), cpu)).mean()).backward()
    assert gpu_check.compiled_steps(flow).calls > 0 and gpu_check.convs_together(flow, cuda) is False
    assert gpu_check.logdets_batched(flow, cuda) is False  # the row says so (test_compiled_steps.py: they do)
    flow.compile_steps(False)


def test_the_plan_runs_the_target_modes_first_and_compiles_last():
    import argparse

    gpu_check = load_benchmark("gpu_check")
    args = argparse.Namespace(batches="80,320", sample_batch=512, batch=80, write_images=60000, write_threads=16)
    sections = {"train", "profile", "graphs_exact", "sample", "write"}
    steps = gpu_check.plan(args, None, list(gpu_check.TRAIN_MODES), ["bf16", "bf16+compile"], sections, Path("."))
    order = [(section, kind, label.get("mode"), label.get("batch")) for section, kind, _, label in steps]
    assert order[:6] == [
        ("train", "train", "bf16+graphs", 80),
        ("train", "train", "bf16+graphs", 320),
        ("sample", "sample", "bf16+graphs", 512),
        ("train", "train", "bf16+compile+graphs", 80),  # whether it pays the compilation: run_kind, when it runs
        ("train", "train", "bf16+compile+graphs", 320),
        ("sample", "sample+compile", "bf16+compile+graphs", 512),
    ]
    assert ("write", "write", None, None) in order[6:] and ("train", "train", "fp32", 320) in order[6:]
    assert len(order) == 2 * len(gpu_check.TRAIN_MODES) + len(gpu_check.SAMPLE_MODES) + 1 + 2 + 2
    # the bundle's trainer: right after the target modes, before the compilations (whose time on a GPU is unknown)
    args.trainer_modes = ["bf16+graphs"]
    steps = gpu_check.plan(args, None, list(gpu_check.TRAIN_MODES), [], sections | {"trainer"}, Path("."))
    order = [(section, kind, label.get("mode"), label.get("batch")) for section, kind, _, label in steps]
    assert order[3] == ("trainer", "trainer", "bf16+graphs", 80)
    assert order[4] == ("train", "train", "bf16+compile+graphs", 80)


def test_a_compiled_run_pays_the_compilation_until_one_at_its_batch_has_run():
    run_kind = load_benchmark("gpu_check").run_kind
    compiled_at: set = set()
    assert run_kind("train", "train", {"batch": 80, "mode": "bf16+compile+graphs"}, compiled_at) == "train+compile"
    assert run_kind("profile", "profile", {"batch": 80, "mode": "bf16+compile"}, compiled_at) == "profile+compile"
    assert run_kind("train", "train", {"batch": 80, "mode": "bf16+graphs"}, compiled_at) == "train"
    compiled_at.add(80)  # a compiled run at batch 80 ended (a skipped one would not be added)
    assert run_kind("train", "train", {"batch": 80, "mode": "bf16+compile"}, compiled_at) == "train"
    assert run_kind("profile", "profile", {"batch": 80, "mode": "bf16+compile"}, compiled_at) == "profile"
    assert run_kind("train", "train", {"batch": 320, "mode": "bf16+compile"}, compiled_at) == "train+compile"
    assert run_kind("sample", "sample+compile", {"batch": 512, "mode": "bf16+compile+graphs"}, compiled_at) == (
        "sample+compile"
    )
    assert run_kind("trainer", "trainer", {"batch": 320, "mode": "bf16+compile+graphs"}, compiled_at) == (
        "trainer+compile"
    )
    assert run_kind("trainer", "trainer", {"batch": 80, "mode": "bf16+compile+graphs"}, compiled_at) == "trainer"
    compiled_by = load_benchmark("gpu_check").compiled_by
    assert compiled_by("train", "train+compile", {"batch": 80, "train_img_s": 1.0})
    assert not compiled_by("train", "train+compile", {"batch": 80, "skipped": "no time"})
    assert not compiled_by("train", "train+compile", {"batch": 80, "error": "RuntimeError: backend failed"})
    assert not compiled_by("train", "train", {"batch": 80, "train_img_s": 1.0})  # reused, did not compile
    assert not compiled_by("sample", "sample+compile", {"batch": 512, "sample_img_s": 1.0})  # the decoder only


def _train_row(batch, mode, img_s, roundtrip=1e-3, bpd=1e-3):
    return {"batch": batch, "mode": mode, "train_img_s": img_s, "ms_per_step": 1000 * batch / img_s, "peak_mib": 1.0,
            "warmup_s": 1.0, "roundtrip_max_abs": roundtrip, "bpd_max_abs_diff_vs_fp32": bpd, "loss_finite": True,
            "graphed": "graphs" in mode, "compiled": "compile" in mode}  # fmt: skip


def test_the_summary_judges_the_targets_on_exact_modes_only(tmp_path: Path, capsys):
    gpu_check = load_benchmark("gpu_check")
    results = {
        "env": {"device": "GPU", "torch": "x", "preset": "paper", "size": 64,
                "flops": {"train_gflop_per_image": 18.2269, "sample_gflop_per_image": 6.0763}},
        "train": [
            _train_row(80, "bf16+graphs", 1328.0),
            _train_row(80, "bf16+compile+graphs", 2500.0, roundtrip=0.02),  # fastest, but its round trip is off
            _train_row(320, "bf16+compile+graphs", 4100.0),
            {"batch": 320, "mode": "fp32", "skipped": "needs ~20 s of the budget, 3 s left"},
        ],
        "sample": [
            {"mode": "bf16+graphs", "batch": 512, "sample_img_s": 20000.0, "peak_mib": 1.0, "warmup_s": 1.0,
             "graphed": True, "compiled": False, "vs_eager_max_abs": 0.0},
            {"mode": "bf16+compile+graphs", "batch": 512, "sample_img_s": 30000.0, "peak_mib": 1.0, "warmup_s": 1.0,
             "graphed": True, "compiled": True, "vs_eager_max_abs": 0.5},  # fastest, but far from the eager samples
        ],  # fmt: skip
        "write": [{"requested": 60000, "images": 60000, "manifest_rows": 60000, "threads": 16, "seconds": 61.0,
                   "img_s": 983.6}],  # fmt: skip
    }
    results["trainer"] = [{"batch": 80, "mode": "bf16+graphs", "trainer_img_s": 996.0, "ms_per_iteration": 80.3,
                           "peak_mib": 2.0, "graphed": True, "compiled": False, "classifier_graphed": True,
                           "cudnn_deterministic": True}]  # fmt: skip
    summary = gpu_check.summarize(results)
    # against the bare step of the same mode and batch
    assert "| 80 | bf16+graphs | 996.0 | 80.3 | 1,328.0 | 0.75 | 2 | graphed | yes | yes |" in summary
    assert "- training at batch 80 >= 2,000 img/s: not met (best 1,328.0, bf16+graphs)" in summary
    assert "- training at batch 320 >= 4,000 img/s: met (best 4,100.0, bf16+compile+graphs)" in summary
    assert "- sampling at batch 512 >= 20,000 img/s: met (best 20,000.0, bf16+graphs)" in summary
    assert "- 60,000 images written in <= 60 s: not met (61.0 s, png)" in summary
    assert "- train batch 320, mode fp32: needs ~20 s of the budget, 3 s left" in summary
    assert "| 80 | bf16+compile+graphs | 2,500.0 | 32.0 | 1 | 1.0 | 2.0e-02 | 1.0e-03 | compiled + graphed |" in summary
    # TFLOP/s = img/s x GFLOP per image / 1000: 1,328 x 18.2269 = 24.21 (training), 20,000 x 6.0763 = 121.53
    assert "| 80 | bf16+graphs | 1,328.0 | 60.2 | 1 | 1.0 | 1.0e-03 | 1.0e-03 | graphed | 24.21 |" in summary
    assert "| bf16+graphs | 512 | 20,000.0 | 1 | 1.0 | 0.0e+00 | graphed | 121.53 |" in summary
    assert "Per image: 18.227 GFLOP per training pass, 6.076 GFLOP per sample" in summary
    counted = results["env"].pop("flops")
    assert "| bf16+graphs | 512 | 20,000.0 | 1 | 1.0 | 0.0e+00 | graphed | - |" in gpu_check.summarize(results)
    results["env"]["flops"] = {"error": "RuntimeError: x"}
    assert "FLOPs per image not counted: RuntimeError: x" in gpu_check.summarize(results)
    results["env"]["flops"] = counted
    # a set with files missing is not met, however fast
    results["write"] = [{"requested": 60000, "images": 59990, "manifest_rows": 60000, "threads": 16, "seconds": 30.0,
                         "img_s": 2000.0}]  # fmt: skip
    assert "- 60,000 images written in <= 60 s: not met (30.0 s, png, only 59,990 images / 60,000 manifest rows)" in (
        gpu_check.summarize(results)
    )
    # the same from a saved file (a run cut at its time limit)
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(results))
    assert gpu_check.main(["--summarize", str(path)]) == results
    assert gpu_check.summarize(results) in capsys.readouterr().out


def test_the_trainer_section_puts_back_the_generators_and_cudnn_flags(tmp_path: Path):
    """The bundle's trainer seeds every generator and makes cuDNN deterministic for the process (as a user's run
    does); the section records that and puts both back, so the sections after it run as they would without it."""
    import argparse
    import random

    import numpy as np
    import torch

    gpu_check = load_benchmark("gpu_check")
    args = argparse.Namespace(preset="small", size=16, seed=0, trainer_iters=2, trainer_classifier="small",
                              flow_overrides=gpu_check.CPU_FLOW)  # fmt: skip
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    saved = (random.getstate(), np.random.get_state())
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # not what the trainer sets
        torch.manual_seed(123)
        random.seed(4)
        np.random.seed(5)
        states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        record = gpu_check.bench_trainer(args, torch.device("cpu"), 4, "fp32", tmp_path)
        assert record["cudnn_deterministic"] is True and record["trainer_img_s"] > 0 and record["skipped_steps"] == 0
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
        assert np.array_equal(np.random.get_state()[1], states[2])
        assert list(tmp_path.iterdir()) == []  # the run folder removed
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def test_the_tune_option_autotunes_cudnn_for_its_row_only(tmp_path: Path, monkeypatch):
    """``+tune`` runs its training / sampling row with cuDNN's autotuning on (what the bundle id ``deterministic``
    false sets) and the trainer with ``deterministic=False``; the flags are put back after the row, also after a
    failing one, and a row without it runs with the process's flags."""
    import argparse

    gpu_check = load_benchmark("gpu_check")
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    seen: list = []
    original = gpu_check.train_step

    def spy(*a, **k):
        seen.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return original(*a, **k)

    monkeypatch.setattr(gpu_check, "train_step", spy)
    args = argparse.Namespace(preset="small", size=16, seed=0, flow_overrides=gpu_check.CPU_FLOW, fused_adam=False,
                              compile_backend="aot_eager", warmup=1, steps=1, trainer_iters=2,
                              trainer_classifier="small")  # fmt: skip
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        gpu_check.bench_train(args, torch.device("cpu"), 2, "fp32+tune")
        assert set(seen) == {(False, True)}
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        seen.clear()
        gpu_check.bench_train(args, torch.device("cpu"), 2, "fp32")
        assert set(seen) == {(True, False)}
        with pytest.raises(ZeroDivisionError), gpu_check.cudnn_for("bf16+tune"):
            assert torch.backends.cudnn.benchmark
            raise ZeroDivisionError
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        record = gpu_check.bench_trainer(args, torch.device("cpu"), 4, "fp32+tune", tmp_path)
        assert record["cudnn_deterministic"] is False and record["cudnn_autotuned"] is False  # the CPU: no cuDNN
        record = gpu_check.bench_trainer(args, torch.device("cpu"), 4, "fp32", tmp_path)
        assert record["cudnn_deterministic"] is True
        assert gpu_check._ran_as({"graphed": True, "cudnn_autotuned": True}) == "graphed + cuDNN autotuned"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize("var, value", [("GPU_CHECK_KILL_S", "0"), ("GPU_CHECK_KILL_S", "x"),
                                        ("GPU_CHECK_GRACE_S", "1.5"), ("E2E_TIMEOUT", "-1")])  # fmt: skip
def test_a_time_setting_that_is_not_whole_seconds_is_refused_before_the_set_up(tmp_path: Path, var: str, value: str):
    """A kill delay of 0 would never send the SIGKILL (the stopped run ignores a second SIGTERM), and a non-number
    broke the budget's arithmetic: refused by name, before anything is installed or measured."""
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, var: value}, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and f"gpu_check.sh: {var} must be a whole number of seconds" in proc.stderr
    assert f"got '{value}'" in proc.stderr and "set-up:" not in proc.stdout
