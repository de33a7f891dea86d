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
"""privacy_spent: the (epsilon, delta) of a run from the classifier and flow stage files (basic composition)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_condflow.engines.stages import privacy_spent


def _stage(out: Path, stage: str, dp: dict | None) -> None:
    folder = out / stage
    folder.mkdir(parents=True, exist_ok=True)
    info = {"preset": "small"} if dp is None else {"preset": "small", "dp": dp}
    (folder / f"{stage}.json").write_text(json.dumps(info), encoding="utf-8")


def test_no_stage_files_or_no_dp_entry_is_none(tmp_path):
    assert privacy_spent(tmp_path) is None
    _stage(tmp_path, "classifier", None)
    _stage(tmp_path, "flow", None)
    assert privacy_spent(tmp_path) is None


def test_both_private_stages_add_up(tmp_path):
    clf = {"epsilon": 1.5, "delta": 5e-6, "steps": 10}
    flow = {"epsilon": 2.25, "delta": 2.5e-6}
    _stage(tmp_path, "classifier", clf)
    _stage(tmp_path, "flow", flow)
    spent = privacy_spent(tmp_path)
    assert set(spent) == {"epsilon", "delta", "classifier", "flow", "covers", "label"}
    assert spent["epsilon"] == pytest.approx(3.75) and spent["delta"] == pytest.approx(7.5e-6)
    assert spent["classifier"] == clf and spent["flow"] == flow
    assert spent["label"] == "3.75"
    assert spent["covers"] == "classifier and flow trained with DP-SGD; epsilons and deltas added (basic composition)"


def test_label_keeps_four_significant_digits(tmp_path):
    _stage(tmp_path, "classifier", {"epsilon": 1.23456, "delta": 1e-6})
    _stage(tmp_path, "flow", {"epsilon": 2, "delta": 1e-6})
    assert privacy_spent(tmp_path)["label"] == "3.235"


def test_only_the_classifier_private(tmp_path):
    _stage(tmp_path, "classifier", {"epsilon": 2.5, "delta": 5e-6})
    _stage(tmp_path, "flow", None)
    spent = privacy_spent(tmp_path)
    assert spent["epsilon"] is None and spent["delta"] == 5e-6 and spent["flow"] is None
    assert spent["label"] == "classifier only: 2.5"
    assert spent["covers"].startswith("only the classifier was trained with DP-SGD (epsilon 2.5); the flow was not")
    assert "no finite guarantee" in spent["covers"]


def test_only_the_flow_private_with_the_classifier_file_missing(tmp_path):
    _stage(tmp_path, "flow", {"epsilon": 4.0, "delta": 1e-5})
    spent = privacy_spent(tmp_path)
    assert spent["epsilon"] is None and spent["delta"] == 1e-5 and spent["classifier"] is None
    assert spent["label"] == "flow only: 4"
    assert "only the flow was trained with DP-SGD (epsilon 4)" in spent["covers"]
    assert "the conditioning classifier was not" in spent["covers"]


def test_privacy_noise_names_the_noise_source_of_the_private_stages(tmp_path):
    from monai_condflow.engines.stages import privacy_noise

    assert privacy_noise(tmp_path) is None
    _stage(tmp_path, "classifier", {"epsilon": 1.0, "delta": 1e-6, "noise": "os_entropy"})
    _stage(tmp_path, "flow", {"epsilon": 2.0, "delta": 1e-6, "noise": "os_entropy"})
    assert privacy_noise(tmp_path) == "os_entropy"
    _stage(tmp_path, "flow", {"epsilon": 2.0, "delta": 1e-6})  # a stage trained before the source was recorded
    assert privacy_noise(tmp_path) == "classifier: os_entropy; flow: unknown"
    _stage(tmp_path, "classifier", {"epsilon": 0.0, "delta": 0.0, "public": True})
    _stage(tmp_path, "flow", {"epsilon": 2.0, "delta": 1e-6, "noise": "secure_mode"})
    assert privacy_noise(tmp_path) == "secure_mode"


def test_a_dp_flow_on_a_classifier_trained_without_dp_is_warned_before_it_trains(tmp_path, caplog):
    """train_flow_dp.json warns at initialize (before the DP-SGD epochs) when the frozen classifier has no DP record;
    a DP-SGD or public classifier passes silently."""
    import logging

    from monai.bundle import ConfigParser

    from monai_condflow.engines.stages import warn_non_private_classifier
    from monai_condflow.utils.bundle import BUNDLE_ROOT

    _stage(tmp_path, "classifier", None)
    with caplog.at_level(logging.WARNING, logger="monai_condflow.engines.stages"):
        assert warn_non_private_classifier(tmp_path) is True
    assert f"classifier in {tmp_path / 'classifier'} was trained without DP-SGD" in caplog.text
    for dp in ({"epsilon": 1.0, "delta": 1e-6}, {"epsilon": 0.0, "delta": 0.0, "public": True}):
        caplog.clear()
        _stage(tmp_path, "classifier", dp)
        with caplog.at_level(logging.WARNING, logger="monai_condflow.engines.stages"):
            warn_non_private_classifier(tmp_path)
        assert caplog.text == ""
    parser = ConfigParser()
    configs = BUNDLE_ROOT / "configs"
    parser.read_config([str(configs / n) for n in ("common.json", "train_flow.json", "train_flow_dp.json")])
    assert "$monai_condflow.engines.stages.warn_non_private_classifier(@output_dir)" in parser["initialize"]
    parser = ConfigParser()
    parser.read_config([str(configs / n) for n in ("common.json", "train_flow.json")])
    assert not any("warn_non_private_classifier" in expr for expr in parser["initialize"])
