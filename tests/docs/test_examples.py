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
"""The documentation's examples run and do what the docs say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_networks_in_your_pipeline():
    result = _load("networks_in_your_pipeline").main()
    assert abs(result["z_norm"] - 1.0) < 1e-5
    assert result["round_trip_error"] < 1e-4
    assert 0.0 <= result["sample_min"] <= result["sample_max"] <= 1.0
    assert result["chain_shape"] == (1, 64, 64)


def _documented_bundle_commands() -> list[tuple[str, list[str]]]:
    """``(page, argv)`` of every ``python -m monai.bundle run`` command in the README and docs (continuation lines
    joined, config paths taken from the repository)."""
    import re
    import shlex

    root = EXAMPLES.parents[1]
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))
        for line in text.splitlines():
            if "monai.bundle run --config_file" not in line:
                continue
            tokens = shlex.split(line[line.index("monai.bundle run") :].strip().strip("`"))
            argv = [str(Path("monai") / "bundle" / "__main__.py"), "run", *tokens[2:]]
            i = argv.index("--config_file") + 1
            argv[i] = argv[i].replace("bundle/configs/", f"{root / 'bundle' / 'configs'}/")
            found.append((page.name, argv))
    return found


def test_documented_bundle_commands_use_only_ids_their_configs_define():
    """A documented command with an id its configs do not have would now be refused (it used to be ignored)."""
    from monai_condflow.utils.bundle import check_command_line_ids

    commands = _documented_bundle_commands()
    assert len(commands) >= 15  # the README, configuration, counterfactuals, privacy, distributed ... pages
    for page, argv in commands:
        assert check_command_line_ids(argv), (page, argv)
