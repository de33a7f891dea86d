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

import json
import os
import time
from pathlib import Path

import pytest
import torch

from monai_condflow.engines.config_checks import ConfigValueError, check_common, check_preset, check_temperature
from monai_condflow.engines.stage_io import (
    AUDIT_HOLDOUT,
    audit_holdout_mask,
    latest_checkpoint,
    load_weights,
    read_stage_info,
    require_file,
    split_audit_holdout,
    write_json_atomic,
    write_stage_info,
)
from monai_condflow.handlers.checkpoint import CheckpointError


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
    with pytest.raises(CheckpointError, match=r"state_checkpoint_epoch=9\.pt safely \(weights_only=True\)"):
        load_weights(torch.nn.Linear(2, 2), bad)
    assert not sentinel.exists()


def test_load_weights_roundtrip(tmp_path: Path):
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save({"network": src.state_dict()}, tmp_path / "model.pt")
    load_weights(dst, tmp_path / "model.pt")
    assert torch.equal(src.weight, dst.weight)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    bare = load_weights(torch.nn.Linear(3, 2), tmp_path / "bare.pt")
    assert torch.equal(src.bias, bare.bias)


def test_load_weights_of_another_network_names_the_file_and_keys(tmp_path: Path):
    torch.save({"network": torch.nn.Linear(3, 2).state_dict()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt does not fit the Linear: shape mismatch: weight"):
        load_weights(torch.nn.Linear(4, 2), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt does not fit the Sequential: missing: 0\.weight"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_weights(torch.nn.Linear(3, 2), tmp_path / "absent.pt")


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
        ({"max_epochs": 0}, "max_epochs"),
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
    assert check_common(1, 4, 64, 2, tmp_path)  # max_epochs 0 is refused (see test_check_common_names_the_bad_id)
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        check_common(1, 4, 64, 2, tmp_path / "nope")


def test_device_without_cuda_and_unusable_output_dir_are_named(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ConfigValueError, match="'device'.*CUDA is not available"):
            check_common(1, 4, 64, 2, device=device)
    with pytest.raises(ConfigValueError, match="'device' is not a device"):
        check_common(1, 4, 64, 2, device="gpu0")
    assert check_common(1, 4, 64, 2, device="cpu", output_dir=tmp_path / "new" / "run")
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigValueError, match="'output_dir'.*afile.*is a file"):
            check_common(1, 4, 64, 2, output_dir=bad)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ConfigValueError, match="'output_dir'.*locked.*read-only"):
            check_common(1, 4, 64, 2, output_dir=locked / "run")


def test_temperature_and_preset():
    assert check_temperature(0.9) == 0.9
    for bad in (0, -1.0, float("inf"), "0.9", True):
        with pytest.raises(ConfigValueError, match="'temperature'"):
            check_temperature(bad)
    assert check_preset("small", ("small", "paper"), "flow_preset") == "small"
    with pytest.raises(ConfigValueError, match="'flow_preset'.*'huge'"):
        check_preset("huge", ("small", "paper"), "flow_preset")


def _holdout_records() -> list[dict]:
    """16 records of 8 patients (2 images each); patients alternate between class 0 and class 1."""
    return [
        {"image": f"/d/img{i}.png", "label": (i // 2) % 2, "patient_id": f"p{i // 2}", "source": f"train.txt:{i + 1}"}
        for i in range(16)
    ]


def test_audit_holdout_fraction_zero_keeps_everything_and_removes_a_stale_list(tmp_path: Path):
    records = _holdout_records()
    stale = tmp_path / AUDIT_HOLDOUT
    stale.write_text('{"sources": ["train.txt:1"]}')
    kept = split_audit_holdout(records, 0, directory=tmp_path)
    assert kept == records and kept is not records
    assert not stale.exists()
    assert audit_holdout_mask(tmp_path.parent / "nothing", records) is None  # no list: no mask
    assert split_audit_holdout(records, 0.0) == records  # no directory: nothing to remove


def test_audit_holdout_split_is_patient_disjoint_stratified_and_listed(tmp_path: Path):
    records = _holdout_records()
    folder = tmp_path / "flow"
    members = split_audit_holdout(records, 0.25, seed=0, directory=folder)
    held = [r for r in records if r not in members]
    assert len(members) + len(held) == 16 and len(held) == 4
    assert not {r["patient_id"] for r in members} & {r["patient_id"] for r in held}
    assert {r["label"] for r in held} == {0, 1}
    listing = json.loads((folder / AUDIT_HOLDOUT).read_text())
    assert listing == {"fraction": 0.25, "seed": 0, "sources": [r["source"] for r in held]}
    mask = audit_holdout_mask(tmp_path, records)
    assert mask.dtype == torch.bool and mask.shape == (16,)
    assert [records[i]["source"] for i in mask.nonzero().flatten().tolist()] == listing["sources"]
    # the same seed gives the same split
    assert split_audit_holdout(records, 0.25, seed=0) == members


def test_audit_holdout_mask_refuses_a_different_training_list(tmp_path: Path):
    records = _holdout_records()
    split_audit_holdout(records, 0.25, seed=0, directory=tmp_path / "flow")
    held = json.loads((tmp_path / "flow" / AUDIT_HOLDOUT).read_text())["sources"]
    fewer = [r for r in records if r["source"] != held[0]]
    with pytest.raises(ValueError, match="lists 4 held-back images but 3 of them are in the training records"):
        audit_holdout_mask(tmp_path, fewer)


@pytest.mark.parametrize("fraction", [0.7, -0.1, True, 0.51, "0.2", None])
def test_audit_holdout_bad_fraction_names_the_config_id(tmp_path: Path, fraction):
    with pytest.raises(ValueError, match="config id 'audit_holdout' must be a fraction in"):
        split_audit_holdout(_holdout_records(), fraction, directory=tmp_path)
    assert not (tmp_path / AUDIT_HOLDOUT).exists()


def test_check_flow_classifier_compares_the_recorded_fingerprint(tmp_path: Path):
    """Nothing recorded (no flow settings, or a flow from before the fingerprint): accepted; a recorded fingerprint
    that differs from the classifier's: refused naming both; unreadable settings: refused naming the file."""
    from monai_condflow.engines.run_folder import RunSettingsError
    from monai_condflow.engines.stages import check_flow_classifier, classifier_fingerprint

    (tmp_path / "classifier").mkdir()
    torch.save({"network": {"w": torch.arange(4.0)}}, tmp_path / "classifier" / "model.pt")
    current = classifier_fingerprint(tmp_path)
    assert check_flow_classifier(tmp_path)  # no flow folder yet
    settings = tmp_path / "flow" / "run_settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"stage": {"seed": 0}}))
    assert check_flow_classifier(tmp_path)  # recorded before the fingerprint existed
    settings.write_text(json.dumps({"stage": {"classifier": current}}))
    assert check_flow_classifier(tmp_path)
    settings.write_text(json.dumps({"stage": {"classifier": "0123456789abcdef"}}))
    with pytest.raises(RunSettingsError, match=f"weights {current}.*weights 0123456789abcdef"):
        check_flow_classifier(tmp_path)
    settings.write_text("{not json")
    with pytest.raises(RunSettingsError, match="run_settings.json"):
        check_flow_classifier(tmp_path)
