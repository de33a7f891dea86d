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
"""Tests for the main job's orchestration (the stages themselves are covered by tests/bundle)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest

import monai_condflow.pipeline as pipeline
from monai_condflow.pipeline import (
    BUNDLE_ROOT,
    CPU_BUDGET,
    Stage,
    cli_value,
    default_stages,
    main,
    num_labels_arg,
    parse_stage_overrides,
    run_pipeline,
)
from monai_condflow.utils.bundle import config_file_ids


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for split in ("train.txt", "val.txt", "test.txt"):
        (root / split).write_text("")
    return root


def test_stage_command_and_override_order(tmp_path: Path):
    stage = Stage("s", ["a.json", "b.json"], {"max_epochs": 30, "lr": 0.1})
    cmd = stage.command(tmp_path, {"max_epochs": 2, "dataset_dir": "/d"})
    assert cmd[cmd.index("--config_file") + 1] == json.dumps(
        [str(tmp_path / "configs" / f) for f in ("a.json", "b.json")]
    )
    assert cmd[cmd.index("--max_epochs") + 1] == "2"  # the user's value wins over the stage budget
    assert cmd[cmd.index("--lr") + 1] == "0.1" and cmd[cmd.index("--dataset_dir") + 1] == "/d"


@pytest.mark.parametrize("value", [False, True, None, 0, 30, 1e-5, 2.5, "name", [1, 2], {"a": False}, ["x", True]])
def test_cli_values_read_back_by_fire_as_the_same_python_value(value):
    # the bundle CLI is python-fire: JSON "false" would arrive as the truthy string "false"
    from fire.parser import DefaultParseValue

    text = cli_value(value)
    assert DefaultParseValue(text) == value and type(DefaultParseValue(text)) is type(value)


def test_cli_value_refuses_what_fire_cannot_read_back():
    with pytest.raises(TypeError, match="Path"):
        cli_value(Path("/x"))


def test_stage_override_false_reaches_the_bundle_as_false(tmp_path: Path):
    parsed = parse_stage_overrides(["evaluation.augmentation=false"], CPU_BUDGET)
    cmd = Stage("e", ["evaluate.json"], parsed["evaluation"]).command(tmp_path, {})
    assert cmd[cmd.index("--augmentation") + 1] == "False"


def test_default_stages():
    semi = default_stages(50)
    assert [s.name for s in semi] == ["classifier (semi-supervised)", "flow", "generation", "evaluation"]
    assert semi[0].config_files == ["train_classifier.json", "train_semisupervised.json"]
    assert default_stages("all")[0].config_files == ["train_classifier.json"]
    assert semi[1].overrides == CPU_BUDGET["flow"]


@pytest.mark.parametrize("text, value", [("all", "all"), ("50", 50), ("0.05", 0.05), ("1", 1)])
def test_parse_num_labels(text, value):
    assert num_labels_arg(text) == value


def test_parse_num_labels_bad():
    with pytest.raises(argparse.ArgumentTypeError, match="--num-labels"):
        num_labels_arg("-2")


def test_missing_dataset_and_split_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline(tmp_path / "nowhere", tmp_path / "out", stages=[])
    data = _dataset(tmp_path / "d")
    (data / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        run_pipeline(data, tmp_path / "out", stages=[])
    assert main([str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")]) == 1


def test_stages_run_in_order_and_a_failure_names_the_stage(tmp_path: Path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    marker = tmp_path / "ran.txt"
    ok = {
        "imports": ["$import pathlib"],
        "marker": str(marker),
        "run": ["$pathlib.Path(@marker).write_text(@output_dir)"],
    }
    (bundle / "configs" / "ok.json").write_text(json.dumps(ok))
    (bundle / "configs" / "bad.json").write_text(json.dumps({"run": ["$1/0"]}))
    (bundle / "configs" / "logging.conf").write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n[logger_root]\nlevel=INFO\nhandlers=h\n"
        "[handler_h]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stdout,)\n[formatter_f]\nformat=%(message)s\n"
    )
    data = _dataset(tmp_path / "d")
    times = run_pipeline(data, tmp_path / "out", stages=[Stage("first", ["ok.json"])], bundle_root=bundle)
    assert list(times) == ["first"] and marker.read_text() == str((tmp_path / "out").resolve())
    with pytest.raises(RuntimeError, match="stage 'second' failed"):
        run_pipeline(data, tmp_path / "out", stages=[Stage("second", ["bad.json"])], bundle_root=bundle)


def test_a_multi_process_stage_runs_under_torchrun_with_its_overlay_and_split_threads(tmp_path: Path, monkeypatch):
    stage = Stage("flow", ["train_flow.json"], nproc=2)
    cmd = stage.command(tmp_path, {"seed": 1})
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    assert cmd[7:10] == ["monai.bundle", "run", "--config_file"]
    assert json.loads(cmd[10])[-1] == str(tmp_path / "configs" / "multi_gpu_train_flow.json")
    assert stage.env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "2"
    assert stage.env({"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 6)
    assert stage.env({})["OMP_NUM_THREADS"] == stage.env({"OMP_NUM_THREADS": "4,2"})["OMP_NUM_THREADS"] == "3"
    assert Stage("flow", ["train_flow.json"]).env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    assert Stage("flow", ["train_flow.json"]).command(tmp_path, {})[:3] == [sys.executable, "-m", "monai.bundle"]
    with pytest.raises(ValueError, match="evaluate.json has no multi-process overlay"):
        Stage("e", ["evaluate.json"], nproc=2)
    with pytest.raises(ValueError, match="nproc must be an integer >= 1"):
        Stage("flow", ["train_flow.json"], nproc=0)
    # a real launch: both ranks run the stage with the overlay stacked last and one thread each
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "stage.json").write_text(json.dumps({"imports": ["$import os", "$import pathlib"], "x": 1}))
    write = "$pathlib.Path(@output_dir, 'rank' + os.environ['RANK']).write_text(os.environ['OMP_NUM_THREADS'])"
    overlay = {"run": [write]}
    (bundle / "configs" / "stage_ddp.json").write_text(json.dumps(overlay))
    (bundle / "configs" / "logging.conf").write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n[logger_root]\nlevel=INFO\nhandlers=h\n"
        "[handler_h]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stdout,)\n[formatter_f]\nformat=%(message)s\n"
    )
    monkeypatch.setitem(pipeline.MULTI_PROCESS_CONFIGS, "stage.json", "stage_ddp.json")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "out"
    run_pipeline(_dataset(tmp_path / "d"), out, stages=[Stage("two", ["stage.json"], nproc=2)], bundle_root=bundle)
    assert sorted(p.name for p in out.glob("rank*")) == ["rank0", "rank1"]
    assert {p.read_text() for p in out.glob("rank*")} == {"1"}


def test_main_passes_flow_processes_to_the_flow_stage_only(tmp_path: Path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, stages, **k: calls.append(stages) or {})
    assert main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--flow-processes", "2", "--public-pretrain"]) == 0
    [stages] = calls
    assert {s.name: s.nproc for s in stages} == {
        "public classifier (phantom)": 1, "public flow (phantom)": 2, "classifier (semi-supervised)": 1, "flow": 2,
        "generation": 1, "evaluation": 1,
    }  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--flow-processes", "2", "--dp-epsilon", "4"])
    assert info.value.code == 2 and "DP-SGD flow stage runs in one process" in capsys.readouterr().err


def test_default_stages_with_the_acgan_baseline():
    stages = default_stages(50, baseline=True)
    assert [s.name for s in stages] == [
        "classifier (semi-supervised)",
        "flow",
        "generation",
        "baseline (ACGAN)",
        "evaluation",
    ]
    assert stages[3].config_files == ["train_acgan.json"] and stages[3].overrides == CPU_BUDGET["acgan"]
    assert [s.name for s in default_stages(50, baseline=False)] == [
        "classifier (semi-supervised)",
        "flow",
        "generation",
        "evaluation",
    ]


@pytest.mark.parametrize("num_labels", ["all", 50])
def test_default_stages_with_dp_split_the_budget_in_half(num_labels):
    before = copy.deepcopy(CPU_BUDGET)
    stages = default_stages(num_labels, dp_epsilon=4.0, dp_delta=1e-5)
    clf, flow = stages[0], stages[1]
    # the DP classifier trains on the labelled images only: no semi-supervised overlay even with 50 labels
    assert clf.config_files == ["train_classifier.json", "train_classifier_dp.json"]
    assert flow.config_files == ["train_flow.json", "train_flow_dp.json"]
    assert clf.overrides == {"target_epsilon": 2.0, "target_delta": 5e-6}
    assert flow.overrides == {"target_epsilon": 2.0, "target_delta": 5e-6}
    assert clf.name == "classifier (DP-SGD, epsilon 2)" and flow.name == "flow (DP-SGD, epsilon 2)"
    assert [s.name for s in stages[2:]] == ["generation", "evaluation"]
    assert CPU_BUDGET == before  # the shared budget is not modified


def test_every_default_stage_config_file_exists():
    for stages in (default_stages(50, baseline=True), default_stages("all", dp_epsilon=1.0)):
        for stage in stages:
            for name in stage.config_files:
                assert (BUNDLE_ROOT / "configs" / name).is_file(), name


@pytest.mark.parametrize("eps, delta", [(0.0, 1e-5), (-1.0, 1e-5), (math.nan, 1e-5), (4.0, 0.0), (4.0, 1.0)])
def test_default_stages_bad_dp_budget(eps, delta):
    with pytest.raises(ValueError, match="dp_epsilon must be a finite number > 0 and dp_delta in"):
        default_stages("all", dp_epsilon=eps, dp_delta=delta)


def test_parse_stage_overrides_values_and_copy():
    before = copy.deepcopy(CPU_BUDGET)
    out = parse_stage_overrides(
        ["evaluation.max_epochs=30", "flow.flow_preset=paper", "flow.audit_holdout=0.2", "generation.flag=true",
         "flow.sizes=[1, 2]", "classifier.note=a=b", "acgan.lr=1e-4"],
        CPU_BUDGET,
    )  # fmt: skip
    assert out["evaluation"] == {**CPU_BUDGET["evaluation"], "max_epochs": 30}
    assert out["flow"] == {**CPU_BUDGET["flow"], "flow_preset": "paper", "audit_holdout": 0.2, "sizes": [1, 2]}
    assert out["generation"] == {"flag": True}
    assert out["classifier"]["note"] == "a=b"  # not JSON: kept as the string after the first '='
    assert out["acgan"] == {**CPU_BUDGET["acgan"], "lr": 1e-4}
    assert CPU_BUDGET == before and out["flow"] is not CPU_BUDGET["flow"]
    assert parse_stage_overrides(["acgan.max_epochs=2"], {}) == {"acgan": {"max_epochs": 2}}
    assert parse_stage_overrides([], {"flow": {"a": 1}}) == {"flow": {"a": 1}}


def test_parse_stage_overrides_errors():
    with pytest.raises(
        ValueError, match="unknown stage 'bogus'.*stages: classifier, flow, generation, acgan, evaluation"
    ):
        parse_stage_overrides(["bogus.x=1"], CPU_BUDGET)
    for item in ("flowmax_epochs=3", "flow.max_epochs", "flow.=3"):
        with pytest.raises(ValueError, match="expected STAGE.ID=VALUE"):
            parse_stage_overrides([item], CPU_BUDGET)


def test_main_refuses_bad_stage_overrides_and_dp_settings(tmp_path: Path, capsys):
    for argv in (["--stage-set", "bogus.x=1"], ["--dp-epsilon", "-1"], ["--stage-set", "flow.nodot"]):
        with pytest.raises(SystemExit) as info:
            main([str(tmp_path), "--output-dir", str(tmp_path / "o"), *argv])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage 'bogus'" in err and "STAGE.ID=VALUE" in err
    assert "dp_epsilon must be a finite number > 0" in err
    assert not (tmp_path / "o").exists()


def test_main_passes_dp_baseline_and_audit_holdout_to_the_stages(tmp_path: Path, monkeypatch, capsys):
    calls = []

    def fake_run_pipeline(dataset_dir, output_dir, num_labels, overrides, stages, num_images, seed, bundle_root):
        calls.append((num_labels, overrides, stages, seed))
        return {s.name: 1.0 for s in stages}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    argv = [str(tmp_path), "--output-dir", str(tmp_path / "o"), "--num-labels", "all", "--seed", "3", "--baseline",
            "--dp-epsilon", "6", "--audit-holdout", "0.2", "--set", "flow_preset=paper"]  # fmt: skip
    assert main(argv) == 0
    [(num_labels, overrides, stages, seed)] = calls
    assert num_labels == "all" and seed == 3 and overrides == {"seed": 3, "flow_preset": "paper"}
    assert [s.name for s in stages] == [
        "classifier (DP-SGD, epsilon 3)",
        "flow (DP-SGD, epsilon 3)",
        "generation",
        "baseline (ACGAN)",
        "evaluation",
    ]
    assert stages[1].overrides["audit_holdout"] == 0.2 and stages[1].overrides["target_epsilon"] == 3.0
    assert "audit_holdout" not in stages[0].overrides
    assert "total 5 s" in capsys.readouterr().out


def test_default_stages_refuses_an_infinite_dp_epsilon():
    with pytest.raises(ValueError, match="dp_epsilon"):
        default_stages("all", dp_epsilon=math.inf)


def test_default_stages_with_public_pretraining():
    budget = parse_stage_overrides(
        ["flow.audit_holdout=0.2", "flow.max_epochs=20", "classifier.max_epochs=25", "classifier.max_rounds=2"],
        CPU_BUDGET,
    )
    stages = default_stages("all", budget, dp_epsilon=10.0, dp_delta=1e-5, public_pretrain=True, baseline=True)
    assert [s.name for s in stages] == [
        "public classifier (phantom)",
        "public flow (phantom)",
        "classifier (public, frozen: epsilon 0)",
        "flow (DP-SGD fine-tuning, epsilon 10)",
        "generation",
        "baseline (ACGAN)",
        "evaluation",
    ]
    assert [s.public for s in stages] == [True, True, False, False, False, False, False]
    pub_clf, pub_flow, install, dp_flow = stages[:4]
    assert pub_clf.config_files == ["train_classifier.json"]
    assert pub_clf.overrides == {"max_epochs": 25}  # the rounds are dropped: the public classifier has all labels
    assert pub_flow.config_files == ["train_flow.json"]
    assert pub_flow.overrides == {"max_epochs": 20}  # no audit split of the public phantom
    assert install.config_files == ["public_classifier.json"]
    assert dp_flow.config_files == ["train_flow.json", "train_flow_dp.json"]
    # the whole budget goes to the flow: the public classifier spends nothing
    assert dp_flow.overrides["target_epsilon"] == 10.0 and dp_flow.overrides["target_delta"] == 1e-5
    assert dp_flow.overrides["audit_holdout"] == 0.2
    for stage in stages:
        for name in stage.config_files:
            assert (BUNDLE_ROOT / "configs" / name).is_file(), name


def test_public_stage_commands_point_at_the_public_folder(tmp_path: Path):
    stages = default_stages("all", dp_epsilon=4.0, public_pretrain=True)
    common = {"dataset_dir": "/private", "output_dir": str(tmp_path), "num_labels": "all", "seed": 1}

    def value(cmd, key):
        return cmd[cmd.index(f"--{key}") + 1]

    public = stages[0].command(BUNDLE_ROOT, common)
    assert value(public, "dataset_dir") == str(tmp_path / "public" / "data")
    assert value(public, "output_dir") == str(tmp_path / "public") and value(public, "seed") == "1"
    private = stages[3].command(BUNDLE_ROOT, common)
    assert value(private, "dataset_dir") == "/private" and value(private, "output_dir") == str(tmp_path)
    # the checkpoint path is a bundle expression resolved against the private run's output_dir
    from monai.bundle import ConfigParser

    parser = ConfigParser({"imports": ["$import os"], "output_dir": str(tmp_path)})
    parser["public_checkpoint"] = value(private, "public_checkpoint")
    assert parser.get_parsed_content("public_checkpoint") == str(tmp_path / "public" / "flow" / "model.pt")


def test_public_pretraining_with_dp_needs_all_labels():
    with pytest.raises(ValueError, match="needs --num-labels all"):
        default_stages(50, dp_epsilon=4.0, public_pretrain=True)


@pytest.mark.parametrize("num_labels", ["all", 50])
def test_public_pretraining_without_dp_starts_the_private_flow_from_the_phantom_flow(num_labels):
    stages = default_stages(num_labels, public_pretrain=True)
    semi = num_labels != "all"
    assert [s.name for s in stages] == [
        "public classifier (phantom)",
        "public flow (phantom)",
        "classifier (semi-supervised)" if semi else "classifier",
        "flow",
        "generation",
        "evaluation",
    ]
    assert [s.public for s in stages] == [True, True, False, False, False, False]
    # the private classifier is trained as usual (label propagation included); only the flow starts from public weights
    assert stages[2].config_files == default_stages(num_labels)[0].config_files
    assert stages[3].config_files == ["train_flow.json"]
    assert stages[3].overrides == {**CPU_BUDGET["flow"], "pretrained_checkpoint": pipeline.PUBLIC_FLOW_CHECKPOINT}
    assert "pretrained_checkpoint" not in stages[1].overrides and "pretrained_checkpoint" not in CPU_BUDGET["flow"]


def test_run_pipeline_generates_the_public_phantom_for_public_stages(tmp_path: Path, monkeypatch):
    made = []
    monkeypatch.setattr(
        pipeline, "_prepare_default_dataset", lambda out, n, seed, progress=True: made.append((out, n, seed))
    )
    monkeypatch.setattr(pipeline, "run_stage_process", lambda cmd, env: (0, None))
    data = _dataset(tmp_path / "d")
    run_pipeline(data, tmp_path / "o", stages=[Stage("p", ["x.json"], public=True)], num_images=80, seed=4)
    assert made == [((tmp_path / "o" / "public").resolve(), 80, 4)]
    made.clear()
    run_pipeline(data, tmp_path / "o", stages=[Stage("q", ["x.json"])])
    assert made == []  # private stages only, a dataset given: nothing generated
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        run_pipeline(tmp_path / "absent", tmp_path / "o", stages=[Stage("p", ["x.json"], public=True)])
    assert made == []  # a bad private dataset stops the run before the phantom is generated


def test_the_public_phantom_differs_from_a_private_phantom(tmp_path: Path, monkeypatch):
    made = []

    def fake_prepare(out, n, seed, progress=True):
        made.append((out, seed))
        data = _dataset(out / "data")
        return data

    monkeypatch.setattr(pipeline, "_prepare_default_dataset", fake_prepare)
    monkeypatch.setattr(pipeline, "run_stage_process", lambda cmd, env: (0, None))
    run_pipeline(None, tmp_path / "o", stages=[Stage("p", ["x.json"], public=True)], seed=4)
    out = (tmp_path / "o").resolve()
    assert made == [(out, 4), (out / "public", 4 + pipeline.PUBLIC_PHANTOM_SEED_OFFSET)]


def test_main_passes_public_pretraining(tmp_path: Path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, stages, **k: calls.append(stages) or {})
    argv = [str(tmp_path), "--output-dir", str(tmp_path / "o"), "--num-labels", "all", "--dp-epsilon", "6",
            "--public-pretrain"]  # fmt: skip
    assert main(argv) == 0
    assert [s.public for s in calls[0]][:2] == [True, True] and calls[0][3].overrides["target_epsilon"] == 6.0
    assert main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--public-pretrain"]) == 0
    assert calls[1][3].overrides["pretrained_checkpoint"] == pipeline.PUBLIC_FLOW_CHECKPOINT
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--public-pretrain", "--dp-epsilon", "4"])
    assert "needs --num-labels all" in capsys.readouterr().err


def test_without_a_dataset_the_pipeline_never_overwrites_the_users_files(tmp_path: Path, monkeypatch):
    """OUTPUT_DIR/data that the pipeline did not write is refused, never overwritten or emptied; its own phantom is
    reused or regenerated."""
    import monai_condflow.data.phantom as phantom

    made = []

    def fake_generate(out, num_images, seed, overwrite, num_workers, progress=True):
        made.append(seed)
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "images" / "phantom_p0_s0.png").write_bytes(b"png")
        for split in ("train", "val", "test"):
            (out / f"{split}.txt").write_text("phantom_p0_s0.png 0 0 0 8 8\n")
        meta = {"name": "monai_condflow phantom chest CT", "seed": seed, "num_images": num_images}
        (out / "dataset.json").write_text(json.dumps(meta))

    monkeypatch.setattr(phantom, "generate_phantom_dataset", fake_generate)
    user = tmp_path / "o" / "data"
    (user / "images").mkdir(parents=True)
    (user / "train.txt").write_text("mine.png 1 0 0 8 8\n")
    (user / "images" / "mine.png").write_bytes(b"my scan")
    (user / "images" / "phantom_p1_s1.png").write_bytes(b"my file with a phantom-like name")
    with pytest.raises(FileExistsError, match=r"did not create.*mine\.png"):
        pipeline._prepare_default_dataset(tmp_path / "o", 80, 0)
    assert (user / "train.txt").read_text() == "mine.png 1 0 0 8 8\n" and made == []
    assert (user / "images" / "phantom_p1_s1.png").read_bytes() == b"my file with a phantom-like name"
    assert main(["--output-dir", str(tmp_path / "o"), "--num-images", "80"]) == 1  # refused with a message, exit 1

    fresh = tmp_path / "p"
    assert pipeline._prepare_default_dataset(fresh, 80, 0) == fresh / "data" and made == [0]
    pipeline._prepare_default_dataset(fresh, 80, 0)
    assert made == [0]  # reused
    pipeline._prepare_default_dataset(fresh, 80, 1)
    assert made == [0, 1]  # its own phantom with other settings: regenerated
    (fresh / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        pipeline._prepare_default_dataset(fresh, 80, 2)
    assert made == [0, 1]


def test_an_output_folder_that_is_a_file_is_named(tmp_path: Path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    assert main([str(_dataset(tmp_path / "d")), "--output-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "'output_dir'" in err and "runs is a file" in err


@pytest.mark.parametrize("module", ["monai_condflow.pipeline", "monai_condflow.evaluation.sweep"])
def test_every_cli_option_has_help_and_shows_its_default(module, capsys):
    """Issue 16: help text on every option, defaults shown, no raw reStructuredText in the description."""
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text
    for option in ("--seed", "--output-dir", "--bundle-root"):
        assert option in text
    assert "(default: 0)" in text  # --seed
    assert f"(default: {BUNDLE_ROOT})" in " ".join(text.split())
    if module == "monai_condflow.pipeline":
        parser = mod.build_parser()
        for action in parser._actions:
            assert action.help, action.option_strings or action.dest
        for option in ("--num-images", "--num-labels", "--dp-delta"):
            assert option in text
        assert "(default: 600)" in text and "(default: 50)" in text


def test_main_passes_the_bundle_root_and_a_missing_bundle_is_named(tmp_path: Path, monkeypatch, capsys):
    seen = {}

    def fake_run_pipeline(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr("monai_condflow.pipeline.run_pipeline", fake_run_pipeline)
    assert main([str(tmp_path), "--output-dir", str(tmp_path / "o"), "--bundle-root", str(tmp_path / "b")]) == 0
    assert seen["bundle_root"] == tmp_path / "b"
    assert main([str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 0
    assert seen["bundle_root"] == BUNDLE_ROOT and (BUNDLE_ROOT / "configs" / "metadata.json").is_file()
    monkeypatch.undo()
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train.txt", "val.txt", "test.txt"):
        (data / split).write_text("")
    with pytest.raises(FileNotFoundError, match=r"has no configs/ folder"):
        run_pipeline(data, tmp_path / "out", stages=[Stage("first", ["ok.json"])], bundle_root=tmp_path / "nowhere")


@pytest.mark.parametrize("module", ["monai_condflow.data.phantom", "monai_condflow.data.export"])
def test_the_other_command_lines_document_every_option(module, capsys):
    """Issue 16: the phantom and export command lines: help on every option, defaults shown, no raw markup."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    options = [tok for tok in text.split() if tok.startswith("--") and tok != "--help"]
    assert options
    if module.endswith("phantom"):
        assert "(default: 600)" in text and "(default: 0)" in text and "--no-progress" in text


def test_every_stage_stacks_common_json_first_and_the_data_lists_live_only_there():
    """``common.json`` holds the shared ids and the one ``records`` block; the stages only refer to it."""
    configs = BUNDLE_ROOT / "configs"
    for stages in (default_stages(50, baseline=True), default_stages("all", dp_epsilon=1.0, public_pretrain=True)):
        for stage in stages:
            files = json.loads(stage.command(BUNDLE_ROOT, {"output_dir": "/o"})[5])
            assert Path(files[0]).name == pipeline.COMMON_CONFIG and pipeline.COMMON_CONFIG not in files[1:]
    common = json.loads((configs / "common.json").read_text())
    assert set(common["records"]) == {"train_raw", "train", "val", "test", "training"}
    for path in configs.glob("*.json"):
        text = path.read_text()
        if path.name != "common.json":
            assert "load_covidx_split(" not in text and '"bundle_root"' not in text, path.name
            assert '"imports"' not in text, f"{path.name} must add to common.json's imports with +imports"


def test_the_main_job_budget_is_the_bundle_configs_own_defaults():
    """Issue 15: the pipeline adds no epoch overrides; the stage configs hold the main job's budget, so a stage run
    by hand trains exactly as the main job does (classifier 30 epochs + 3 rounds of 6, flow 45 epochs and
    900 steps of adversarial fine-tuning, evaluation 15 epochs and 2 synthetic sets)."""
    from monai.bundle import ConfigParser

    assert all(not v for v in CPU_BUDGET.values())
    for stage in default_stages(50, baseline=True):
        assert not stage.overrides, stage.name
    configs = BUNDLE_ROOT / "configs"

    def value(files, key):
        parser = ConfigParser()
        parser.read_config([str(configs / "common.json")] + [str(configs / f) for f in files])
        return parser.get_parsed_content(key)

    assert value(["train_classifier.json"], "max_epochs") == 30
    semi = ["train_classifier.json", "train_semisupervised.json"]
    assert (value(semi, "epochs_per_round"), value(semi, "max_rounds")) == (6, 3)
    assert value(["train_flow.json"], "max_epochs") == 45 and value(["train_flow.json"], "sample_every") == 5
    phase = {k: value(["train_flow.json"], k) for k in ("adversarial_steps", "adversarial_batch_size",
             "adversarial_likelihood_every", "discriminator_high_pass", "discriminator_lr")}  # fmt: skip
    assert phase == {"adversarial_steps": 900, "adversarial_batch_size": 16, "adversarial_likelihood_every": 2,
                     "discriminator_high_pass": True, "discriminator_lr": 4e-4}  # fmt: skip
    dp = ["train_flow.json", "train_flow_dp.json"]
    assert value(dp, "adversarial_steps") == 0  # not private: off under DP-SGD
    assert value(["train_acgan.json"], "max_epochs") == 40
    assert value(["evaluate.json"], "max_epochs") == 15 and value(["evaluate.json"], "n_synthetic_sets") == 2
    assert value(["evaluate.json"], "n_judges") == 3


def test_the_closing_summary_counts_the_reports_checks(tmp_path):
    """The pipeline's last lines say how many of the report's checks hold and name the failing ones ("not measured"
    counts as neither); without checks in metrics.json there is no such line."""
    from monai_condflow.pipeline import _summary

    scores = {"accuracy": 0.9}
    checks = [
        {"name": "synthetic images keep their class", "holds": False},
        {"name": "they decode cleanly", "holds": True},
        {"name": "the flow does not memorise its training images", "holds": None},
    ]
    (tmp_path / "metrics.json").write_text(json.dumps({"trtr": scores, "tstr": scores, "fid": 0.1, "checks": checks}))
    lines = _summary(tmp_path, {"flow": 1.0})
    assert "  checks: 1 of 3 hold; failing: synthetic images keep their class (report.md, 'Checks')" in lines
    checks[0] = {"name": "synthetic images keep their class", "holds": None, "at_chance": True}
    (tmp_path / "metrics.json").write_text(json.dumps({"trtr": scores, "tstr": scores, "fid": 0.1, "checks": checks}))
    assert ("  checks: 1 of 3 hold; not judged (real classifier at chance): class, TSTR (report.md, 'Checks')"
            in _summary(tmp_path, {"flow": 1.0}))  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps({"trtr": scores, "tstr": scores, "fid": 0.1}))
    assert not any("checks:" in line for line in _summary(tmp_path, {"flow": 1.0}))


def test_the_closing_summary_gives_class_agreement_and_the_judges_range(tmp_path):
    from monai_condflow.pipeline import _summary

    scores = {"accuracy": 0.9}
    m = {"trtr": scores, "tstr": scores, "fid": 0.1, "fid_ratio": 14.74, "class_agreement": 0.757,
         "class_agreement_per_judge": [0.798, 0.833, 0.538]}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    assert ("  class agreement 0.757 (3 evaluation classifiers: 0.538 to 0.833) | FID / floor 14.7"
            in _summary(tmp_path, {"flow": 1.0}))  # fmt: skip
    m["class_agreement_per_judge"] = [0.798]  # one judge: no range
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    assert "  class agreement 0.757 | FID / floor 14.7" in _summary(tmp_path, {"flow": 1.0})
    m.update(lattice_peak=21.28, lattice_peak_real=1.084)  # the squeeze lattice beside the real slices'
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    assert "  class agreement 0.757 | FID / floor 14.7 | squeeze lattice 21.3 (real 1.08)" in _summary(
        tmp_path, {"flow": 1.0}
    )


def test_a_failed_stage_names_the_error_behind_monais_wrapper(tmp_path: Path, capfd):
    """The cause of a failed stage sat ~50 lines above the pipeline's last line, under MONAI's "Failed to evaluate
    ConfigExpression"; the pipeline's error now ends with it. The stage's own output still passes through."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import sys\n"
        "print('stage output', flush=True)\n"
        "print('/x/reader.py:3: UserWarning: a warning line', file=sys.stderr)\n"
        "class DataError(ValueError):\n    pass\n"
        "try:\n"
        "    raise DataError('t/train.txt:5: image file t/images/a.png does not exist.')\n"
        "except DataError as e:\n"
        "    raise RuntimeError('Failed to evaluate ConfigExpression: (\"$load(@x)\")') from e\n"
    )
    code, cause = pipeline.run_stage_process([sys.executable, str(script)], dict(os.environ))
    out, err = capfd.readouterr()
    assert code == 1 and cause == "DataError: t/train.txt:5: image file t/images/a.png does not exist."
    assert "stage output" in out and "Traceback" in err and "UserWarning: a warning line" in err
    assert pipeline.run_stage_process([sys.executable, "-c", "pass"], dict(os.environ)) == (0, None)
    # through run_pipeline: the RuntimeError says stage, exit code and cause, then the command
    data = _dataset(tmp_path / "d")
    with pytest.raises(RuntimeError, match=r"stage 'bad' failed with exit code 1: DataError: t/train") as info:
        run_pipeline(data, tmp_path / "o", stages=[_ScriptStage("bad", script)])
    # the command can be pasted into a shell as it is printed (quoted), also with spaces in a path
    import shlex

    assert shlex.split(str(info.value).split("command: ")[1]) == [sys.executable, str(script)]
    spaced = tmp_path / "a dir ü" / "stage.py"
    spaced.parent.mkdir()
    spaced.write_text(script.read_text())
    with pytest.raises(RuntimeError) as info:
        run_pipeline(data, tmp_path / "o", stages=[_ScriptStage("bad", spaced)])
    assert shlex.split(str(info.value).split("command: ")[1]) == [sys.executable, str(spaced)]
    # a traceback without a wrapper, and stderr without a traceback
    assert pipeline.stage_error_cause(["Traceback (most recent call last):\n", '  File "a.py"\n',
                                       "KeyError: 'image'\n"]) == "KeyError: 'image'"  # fmt: skip
    assert pipeline.stage_error_cause(["killed\n"]) is None
    # an earlier, unrelated traceback (a warning's, logged and survived) is not the cause; nor is a "Name: text" line
    earlier = ["Traceback (most recent call last):\n", "OSError: tensorboard flush failed\n", "Epoch: 3\n"]
    chain = ["Traceback (most recent call last):\n", "KeyError: 'image'\n", "\n",
             "The above exception was the direct cause of the following exception:\n", "\n",
             "Traceback (most recent call last):\n", "RuntimeError: Failed to evaluate ConfigExpression\n"]  # fmt: skip
    assert pipeline.stage_error_cause(earlier + chain) == "KeyError: 'image'"
    assert pipeline.stage_error_cause(["Traceback (most recent call last):\n", "Epoch: 3\n"]) is None


class _ScriptStage(Stage):
    """A stage whose command runs a Python script instead of a bundle."""

    def __init__(self, name: str, script: Path) -> None:
        super().__init__(name, ["x.json"])
        self.script = script

    def command(self, bundle_root, common, optional=()):
        return [sys.executable, str(self.script)]


def test_set_ids_reach_only_the_stages_that_have_them_and_a_typo_is_refused(tmp_path: Path, monkeypatch):
    """``--set`` goes to every stage whose configs define the id (the bundle now refuses unknown ids); an id that no
    stage has is refused before any stage runs, with the closest ids."""
    ran = []
    monkeypatch.setattr(pipeline, "run_stage_process", lambda cmd, env: ran.append(cmd) or (0, None))
    data = _dataset(tmp_path / "d")
    stages = [Stage("classifier", ["train_classifier.json"]), Stage("flow", ["train_flow.json"])]
    run_pipeline(data, tmp_path / "o", stages=stages, overrides={"adversarial_steps": 0, "max_epochs": 2})
    classifier, flow = ran
    assert "--adversarial_steps" not in classifier and flow[flow.index("--adversarial_steps") + 1] == "0"
    assert classifier[classifier.index("--max_epochs") + 1] == "2" and "--max_epochs" in flow
    ran.clear()
    with pytest.raises(ValueError, match=r"--set max_epoch=\.\.\.: no stage of this run has .*'max_epochs'"):
        run_pipeline(data, tmp_path / "o", stages=stages, overrides={"max_epoch": 2})
    assert ran == []


def test_the_preflight_runs_the_evaluations_data_checks_before_the_first_stage(tmp_path: Path, monkeypatch):
    """Before any stage, the evaluation stage's ``preflight`` list runs as its own ``monai.bundle run`` (same ids as
    the stage, one process, ``initialize`` skipped); a failed pre-flight names its cause and no stage runs."""
    ran = []
    outcome = {"preflight": (0, None)}

    def fake_run(cmd, env):
        ran.append(cmd)
        return outcome["preflight"] if "--run_id" in cmd else (0, None)

    monkeypatch.setattr(pipeline, "run_stage_process", fake_run)
    data = _dataset(tmp_path / "d")
    stages = default_stages(50, flow_processes=2)
    run_pipeline(data, tmp_path / "o", stages=stages, overrides={"image_size": 32})
    first, rest = ran[0], ran[1:]
    assert first[first.index("--run_id") + 1] == "preflight" and "torch.distributed.run" not in first
    assert "evaluate.json" in first[first.index("--config_file") + 1]
    assert first[first.index("--image_size") + 1] == "32" and first[first.index("--dataset_dir") + 1] == str(data)
    assert first[first.index("--init_id") + 1] not in config_file_ids([BUNDLE_ROOT / "configs" / "evaluate.json"])
    assert len(rest) == len(stages) and not any("--run_id" in cmd for cmd in rest)
    ran.clear()
    outcome["preflight"] = (1, "ValueError: the validation set has N=18 samples")
    with pytest.raises(RuntimeError, match=r"pre-flight of stage .evaluation. \(nothing was trained\) failed .*N=18"):
        run_pipeline(data, tmp_path / "o", stages=stages)
    assert len(ran) == 1
    # a run without the evaluation stage has no pre-flight
    ran.clear()
    run_pipeline(data, tmp_path / "o", stages=stages[:1])
    assert len(ran) == 1 and "--run_id" not in ran[0]


def test_the_preflight_refuses_a_validation_split_too_small_for_the_evaluation(tmp_path: Path):
    """A real pre-flight (``monai.bundle run`` of evaluate.json's ``preflight``) on a phantom folder with 20
    validation images (FID needs more than the evaluation classifier's 32 features): the splits are read and
    preprocessed into the stages' cache, and the pipeline stops before the classifier stage, naming the split and N."""
    from monai_condflow.data.phantom import generate_phantom_dataset

    data, out = tmp_path / "data", tmp_path / "out"
    generate_phantom_dataset(data, num_images=240, seed=1, image_size=128, progress=False)
    lines = (data / "val.txt").read_text().splitlines()
    assert len(lines) > 32
    (data / "val.txt").write_text("\n".join(lines[:20]) + "\n")
    with pytest.raises(RuntimeError, match=r"pre-flight .* the validation set has N=20 samples of dimension D=32"):
        run_pipeline(data, out, stages=default_stages(50), overrides={"image_size": 32})
    assert len(list((out / "cache").glob("preprocessed_*.npz"))) == 3  # train, val, test: reused by the stages
    assert not (out / "classifier").exists()
