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
"""Unknown ids on the ``python -m monai.bundle run`` command line (typos) are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from monai_condflow.utils.bundle import BUNDLE_ROOT, check_command_line_ids
from monai_condflow.utils.checks import ConfigValueError

MAIN = os.path.join("site-packages", "monai", "bundle", "__main__.py")
CONFIGS = [str(BUNDLE_ROOT / "configs" / f) for f in ("common.json", "train_classifier.json")]


def _argv(*options: str, config: str | None = None) -> list[str]:
    config = json.dumps(CONFIGS) if config is None else config
    return [MAIN, "run", "--config_file", config, "--bundle_root", str(BUNDLE_ROOT), *options]


def test_a_typo_is_named_with_the_closest_ids():
    with pytest.raises(ConfigValueError, match=r"'max_epoch' \(--max_epoch .* \(common.json, train_classifier.json\).*"
                                               r"did you mean 'max_epochs'"):  # fmt: skip
        check_command_line_ids(_argv("--max_epochs", "2", "--max_epoch", "1"))
    with pytest.raises(ConfigValueError, match="'batch_sise'.*'batch_size'"):
        check_command_line_ids(_argv("--batch_sise=4"))
    with pytest.raises(ConfigValueError, match="'zzz_unknown'.*ignored.$"):
        check_command_line_ids(_argv("--zzz_unknown", "1"))


def test_known_ids_run_arguments_nested_ids_and_other_commands_pass():
    options = ["--max_epochs", "1", "--image_size=32", "--records#train", "x", "--records::val", "y", "--fresh", "True",
               "--logging_file", "l.conf", "--hu_window", "[-600, 1500]"]  # fmt: skip
    assert check_command_line_ids(_argv(*options))
    assert check_command_line_ids(_argv("--max-epochs", "1"))  # fire reads hyphens as underscores
    assert check_command_line_ids(["pytest", "run", "--max_epoch", "1"])  # not monai.bundle: not checked
    assert check_command_line_ids(_argv("--max_epoch", "1", "--args_file", "a.json"))  # ids in a file: not checked


def test_ids_of_the_tracking_settings_are_known(tmp_path):
    """``--tracking mlflow`` adds MONAI's MLflow ids (``tracking_uri``, ``experiment_name`` ...); a settings file its
    ``configs``."""
    assert check_command_line_ids(_argv("--tracking", "mlflow", "--tracking_uri", "file:///tmp/x"))
    with pytest.raises(ConfigValueError, match="'tracking_uri'"):
        check_command_line_ids(_argv("--tracking_uri", "file:///tmp/x"))  # without --tracking: not an id of the run
    settings = tmp_path / "track.json"
    settings.write_text(json.dumps({"handlers_id": {}, "configs": {"my_tracker_uri": "x"}}))
    assert check_command_line_ids(_argv(f"--tracking={settings}", "--my_tracker_uri", "y"))


def test_a_single_config_file_is_read_too():
    with pytest.raises(ConfigValueError, match="'dataset_dirr'.*'dataset_dir'"):
        check_command_line_ids(_argv("--dataset_dirr", "d", config=CONFIGS[0]))


def test_monai_bundle_run_refuses_a_typo_before_training(tmp_path):
    """Through the real command line: the stage stops in its initialisation, naming the id (it trained 30 epochs)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS), "--bundle_root",
           str(BUNDLE_ROOT), "--dataset_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"),
           "--max_epoch", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config id 'max_epoch' (--max_epoch on the command line) is in none of the configs" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_failed_bundle_run_ends_with_the_error_behind_monais_wrapper(tmp_path):
    """MONAI wraps a config expression's error in ``RuntimeError: Failed to evaluate ConfigExpression`` and prints the
    expression last; the run's last line now names the error behind it (the typo refusal and a bad value)."""
    base = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(CONFIGS), "--bundle_root",
            str(BUNDLE_ROOT), "--dataset_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]  # fmt: skip
    for extra, cause in (
        (["--max_epoch", "1"], "ConfigValueError: config id 'max_epoch' (--max_epoch on the command line)"),
        (["--max_epochs", "0"], "ConfigValueError: config id 'max_epochs' must be an integer >= 1, got 0."),
    ):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "Failed to evaluate ConfigExpression" in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"[monai_condflow] the error behind the traceback above: {cause}"), last


def test_the_cause_hook_names_the_root_of_a_chain_once_and_leaves_plain_errors_alone(capsys, monkeypatch):
    from monai_condflow.utils import bundle

    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: printed.append(type(e).__name__))
    bundle.install_cause_hook()
    bundle.install_cause_hook()  # installed once: one line per error
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("Failed to evaluate") from inner
    except RuntimeError as outer:
        sys.excepthook(RuntimeError, outer, outer.__traceback__)
    sys.excepthook(ValueError, ValueError("plain"), None)
    err = capsys.readouterr().err
    assert printed == ["RuntimeError", "ValueError"]  # the traceback printer still runs first
    assert err.count("the error behind the traceback above") == 1 and "KeyError: 'inner'" in err
