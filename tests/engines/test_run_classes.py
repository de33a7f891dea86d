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
"""The stages that read a trained run (counterfactuals, novelty, generation, the classifier's test metrics) refuse a
``num_classes`` / ``class_map`` other than the run's, by name, before reading any image: a three-class run read with
the default ``binary`` map labelled COVID-19 as 1 and pneumonia as 0 for a three-class classifier and flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from monai_condflow.engines.config_checks import ConfigValueError, check_run_classes
from monai_condflow.utils.bundle import root_cause

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _run(tmp_path: Path, class_map: object = "three", num_classes: int = 3) -> Path:
    run = tmp_path / "run"
    for stage in ("classifier", "flow"):
        (run / stage).mkdir(parents=True)
        settings = {"stage": {"num_classes": num_classes, "class_map": class_map, "image_size": 64}}
        (run / stage / "run_settings.json").write_text(json.dumps(settings))
    return run


def test_check_run_classes_refuses_another_class_count_or_map_by_name(tmp_path):
    run = _run(tmp_path)
    assert check_run_classes(run, 3, "three")
    assert check_run_classes(run, 3, {0: 0, 1: 1, 2: 2})  # the same labels written as a dict
    with pytest.raises(ConfigValueError, match=r"'num_classes' is 2 .* classifier .*--num_classes 3 --class_map three"):
        check_run_classes(run, 2, "binary")
    with pytest.raises(ConfigValueError, match=r"'class_map' is \{0: 0, 1: 1, 2: 0\} .* flow"):
        check_run_classes(run, 3, {0: 0, 1: 1, 2: 0}, ("flow",))
    assert check_run_classes(tmp_path / "not_trained", 2, "binary")  # nothing recorded: nothing to compare


def test_check_run_classes_reads_a_recorded_dict_map(tmp_path):
    run = _run(tmp_path, class_map={0: 0, 1: 1}, num_classes=2)  # recorded with JSON's string keys
    assert check_run_classes(run, 2, {0: 0, 1: 1})
    with pytest.raises(ConfigValueError, match=r"'class_map' is 'binary' .*--class_map \"\{0: 0, 1: 1\}\""):
        check_run_classes(run, 2, "binary")


def _parser_and_refusal(tmp_path: Path, config: str, content: str) -> tuple[ConfigParser, BaseException]:
    """``config`` parsed on a three-class run with the default ids, and the error behind resolving ``content``
    (MONAI wraps what a config expression raises in RuntimeError)."""
    run = _run(tmp_path)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / config)])
    parser.update({"bundle_root": str(CONFIGS.parent), "output_dir": str(run), "dataset_dir": str(tmp_path)})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(content)
    return parser, root_cause(info.value)


@pytest.mark.parametrize(
    "config", ["counterfactual.json", "novelty.json", "generate.json", "inference_classifier.json"]
)
def test_stages_reading_a_run_refuse_the_default_binary_map_on_a_three_class_run(tmp_path, config):
    parser, cause = _parser_and_refusal(tmp_path, config, "initialize")
    assert isinstance(cause, ConfigValueError) and "'num_classes' is 2" in str(cause)
    parser.update({"num_classes": 3, "class_map": "three"})
    parser.get_parsed_content("initialize")  # the run's own ids pass


@pytest.mark.parametrize("config", ["train_flow.json", "evaluate.json"])
def test_the_flow_and_the_evaluation_refuse_the_default_binary_map_on_a_three_class_run(tmp_path, config):
    """With the default ids on a three-class run, train_flow.json trained and recorded a two-class flow, and
    evaluate.json scored the three-class classifier against binary labels (per-class agreement [1.0, 0.0]), both
    with rc 0; now their check_config refuses by name, before reading an image."""
    _, cause = _parser_and_refusal(tmp_path, config, "check_config")
    assert isinstance(cause, ConfigValueError) and "'num_classes' is 2 but the classifier" in str(cause)
    assert "--num_classes 3 --class_map three" in str(cause)
