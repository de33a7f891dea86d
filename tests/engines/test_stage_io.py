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
"""Tests for stage hand-over files: safe checkpoint discovery, atomic JSON, clear 'run X first' errors."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from monai_condflow.engines.config_checks import ConfigValueError, check_common, check_preset, check_temperature
from monai_condflow.engines.stage_io import (
    latest_checkpoint,
    load_weights,
    read_stage_info,
    require_file,
    write_json_atomic,
    write_stage_info,
)


class _Sentinel:
    """Unpickling this object would create a file: a malicious checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_latest_checkpoint_skips_truncated_and_tmp(tmp_path: Path):
    good = tmp_path / "state_checkpoint_epoch=1.pt"
    torch.save({"network": {"w": torch.ones(2)}}, good)
    time.sleep(0.01)
    newer = tmp_path / "state_checkpoint_epoch=2.pt"
    newer.write_bytes(good.read_bytes()[:20])  # a save killed half-way
    (tmp_path / "tmpabc123").write_bytes(b"partial")
    os.utime(newer, (time.time() + 5, time.time() + 5))
    assert latest_checkpoint(tmp_path, "state") == str(good)
    assert latest_checkpoint(tmp_path / "missing", "state") is None


def test_malicious_checkpoint_is_refused(tmp_path: Path):
    sentinel = tmp_path / "sentinel"
    bad = tmp_path / "state_checkpoint_epoch=9.pt"
    torch.save({"network": _Sentinel(str(sentinel))}, bad)
    assert latest_checkpoint(tmp_path, "state") is None
    with pytest.raises(pickle.UnpicklingError):
        load_weights(torch.nn.Linear(2, 2), bad)
    assert not sentinel.exists()


def test_load_weights_roundtrip(tmp_path: Path):
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save({"network": src.state_dict()}, tmp_path / "model.pt")
    load_weights(dst, tmp_path / "model.pt")
    assert torch.equal(src.weight, dst.weight)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    load_weights(torch.nn.Linear(3, 2), tmp_path / "bare.pt")


def test_json_and_stage_info(tmp_path: Path):
    write_json_atomic(tmp_path / "a" / "x.json", {"k": 1})
    assert (tmp_path / "a" / "x.json").read_text().count('"k": 1') == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    write_stage_info(tmp_path, "flow", {"preset": "small"})
    assert read_stage_info(tmp_path, "flow", "train_flow.json")["preset"] == "small"
    with pytest.raises(FileNotFoundError, match="run train_classifier.json first"):
        read_stage_info(tmp_path, "classifier", "train_classifier.json")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        require_file(tmp_path / "model.pt", "classifier checkpoint", "train_classifier.json")


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"max_epochs": -1}, "max_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 60}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_check_common_names_the_bad_id(kwargs, key):
    args = {"max_epochs": 1, "batch_size": 4, "image_size": 64, "num_classes": 2}
    args.update(kwargs)
    with pytest.raises(ConfigValueError, match=f"'{key}'"):
        check_common(**args)


def test_check_common_ok_and_missing_dataset(tmp_path: Path):
    assert check_common(0, 4, 64, 2, tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        check_common(1, 4, 64, 2, tmp_path / "nope")


def test_temperature_and_preset():
    assert check_temperature(0.9) == 0.9
    for bad in (0, -1.0, float("inf"), "0.9", True):
        with pytest.raises(ConfigValueError, match="'temperature'"):
            check_temperature(bad)
    assert check_preset("small", ("small", "paper"), "flow_preset") == "small"
    with pytest.raises(ConfigValueError, match="'flow_preset'.*'huge'"):
        check_preset("huge", ("small", "paper"), "flow_preset")
