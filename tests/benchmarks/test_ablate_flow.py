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
"""benchmarks/ablate_flow.py without training a flow: arguments, seed folders, the command, the figures' arithmetic."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def ablate():
    return load_benchmark("ablate_flow")


def test_arguments(ablate, tmp_path):
    args = ablate.parse_args([str(tmp_path), "--name", "base"])
    assert args.seeds == [0, 1] and args.overrides == {} and args.bundle_args == []
    assert args.out == (tmp_path / "ablations").resolve() and args.temperatures == [0.7, 0.9]
    assert args.priors == ["auto"] and args.fit_shrinkage is None and args.tstr_seeds == [0]
    assert args.second_judge is False
    assert ablate.parse_args([str(tmp_path), "--name", "b", "--second-judge"]).second_judge is True
    args = ablate.parse_args(
        [str(tmp_path), "--name", "n05", "--seeds", "3", "--overrides", '{"noise_std": 0.05}', "--bundle-args",
         "--max_epochs", "15"]
    )  # fmt: skip
    assert args.seeds == [3] and args.overrides == {"noise_std": 0.05}
    assert args.bundle_args == ["--max_epochs", "15"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--name", "x", "--overrides", "{noise"], "--overrides is not JSON"),
        (["--name", "x", "--overrides", "[1, 2]"], "must be a JSON object"),
        (["--name", "a/b"], "plain folder name"),
        (["--name", "x", "--tstr-temperature", "1.0"], "is not one of --temperatures"),
        (["--name", "x", "--priors", "empirical"], "invalid choice: 'empirical'"),
    ],
)
def test_bad_arguments_name_the_argument(ablate, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        ablate.parse_args([str(tmp_path), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_summary_is_mean_and_std_over_seeds(ablate):
    per_seed = {
        0: {"mia_auc": 0.8, "T0.9": {"class_agreement": 0.2, "tstr": 0.6, "agreement_per_class": {"0": 0.0}}},
        1: {"mia_auc": 0.6, "T0.9": {"class_agreement": 0.4, "tstr": float("nan"), "agreement_per_class": {"0": 1.0}}},
        2: {"mia_auc": 0.7, "T0.9": {"class_agreement": 0.6, "fid_ratio": None, "agreement_per_class": {"0": 0.5}}},
    }
    summary = ablate.summarize(per_seed)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["mean"]["mia_auc"] == pytest.approx(0.7)
    assert summary["std"]["mia_auc"] == pytest.approx(math.sqrt(2 / 3) * 0.1)
    assert summary["mean"]["T0.9"]["class_agreement"] == pytest.approx(0.4)
    assert summary["std"]["T0.9"]["class_agreement"] == pytest.approx(math.sqrt(8 / 3) * 0.1)
    # a non-finite value leaves the statistics of its figure (one finite TSTR: mean 0.6, std 0)
    assert summary["mean"]["T0.9"]["tstr"] == pytest.approx(0.6) and summary["std"]["T0.9"]["tstr"] == 0.0
    assert summary["mean"]["T0.9"]["agreement_per_class"]["0"] == pytest.approx(0.5)
    assert "fid_ratio" not in summary["mean"]["T0.9"]  # None in every seed: no statistic


def test_judge_rows_count_agreement_per_class_and_overflow(ablate):
    labels = torch.tensor([0, 0, 0, 1, 1])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    overflow = torch.tensor([0, 3, 0, 0, 1])
    row = ablate.judge_rows(torch.zeros(5, 1, 4, 4), overflow, labels, predicted)
    assert row["class_agreement"] == pytest.approx(2 / 5)
    assert row["agreement_per_class"] == {"0": pytest.approx(1 / 3), "1": pytest.approx(1 / 2)}
    assert row["images_with_overflow"] == 2 and row["overflow_pixels"] == 4 and row["n_images"] == 5


def test_seed_folder_links_the_base_run_and_refuses_foreign_folders(ablate, tmp_path):
    base = tmp_path / "base"
    with pytest.raises(FileNotFoundError, match="no data/ folder"):
        ablate.prepare_seed_dir(base, tmp_path / "out" / "a_s0")
    for name in ("data", "classifier"):
        (base / name).mkdir(parents=True)
    seed_dir = tmp_path / "out" / "a_s0"
    ablate.prepare_seed_dir(base, seed_dir)
    ablate.prepare_seed_dir(base, seed_dir)  # again: the links are kept
    assert (seed_dir / "data").resolve() == (base / "data").resolve() and (seed_dir / "classifier").is_symlink()
    other = tmp_path / "out" / "b_s0"
    (other / "data").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="b_s0/data exists"):
        ablate.prepare_seed_dir(base, other)


def test_flow_stage_command_carries_seed_overrides_and_ids(ablate, tmp_path):
    cmd = ablate.flow_stage_command(tmp_path, 7, {"noise_std": 0.05, "denoise": True}, ["--max_epochs", "15"])
    assert cmd[1:4] == ["-m", "monai.bundle", "run"]
    files = json.loads(cmd[cmd.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["common.json", "train_flow.json"] and all(Path(f).is_file() for f in files)
    assert cmd[cmd.index("--seed") + 1] == "7" and cmd[cmd.index("--output_dir") + 1] == str(tmp_path)
    assert ast.literal_eval(cmd[cmd.index("--flow_overrides") + 1]) == {"noise_std": 0.05, "denoise": True}
    assert cmd[-2:] == ["--max_epochs", "15"]


def test_second_judge_is_another_architecture_and_is_trained_once(ablate, tmp_path):
    """The plain CNN maps [B, 1, S, S] to [B, 2] logits with no PEPX block; trained on a separable toy split, it is
    saved to judge_cnn.pt and loaded (not retrained) the second time."""
    from monai_condflow.networks.blocks.pepx import PEPXBlock

    net = ablate.plain_cnn()
    assert net(torch.rand(3, 1, 32, 32)).shape == (3, 2)
    assert not any(isinstance(m, PEPXBlock) for m in net.modules())
    gen = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 2
        images = torch.rand(n, 1, 16, 16, generator=gen) * 0.3 + labels.view(-1, 1, 1, 1) * 0.6
        return images, labels

    splits = {"train": split(48), "val": split(16), "test": split(16)}
    judge = ablate.load_or_train_second_judge(tmp_path, splits, epochs=15)
    assert (tmp_path / "judge_cnn.pt").is_file()
    from monai_condflow.evaluation.tstr import predict

    assert float((predict(judge, splits["test"][0]) == splits["test"][1]).float().mean()) >= 0.9
    stamp = (tmp_path / "judge_cnn.pt").stat().st_mtime_ns
    again = ablate.load_or_train_second_judge(tmp_path, splits, epochs=15)
    assert (tmp_path / "judge_cnn.pt").stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), again.state_dict().values()))
