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
"""Where the MONAI bundle that ships with the package lives, and how to read its configs from Python.

The bundle's configs are the one wiring of every stage: the pipeline runs them with ``monai.bundle run``, and the
Python builders (e.g. :func:`monai_condflow.engines.flow_trainer.create_flow_trainer`) parse the same files with
:func:`read_bundle_config` and override ids with Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = ["BUNDLE_ROOT", "COMMON_CONFIG", "read_bundle_config"]


def _find_bundle_root() -> Path:
    """The bundle shipped with the package: ``monai_condflow/bundle`` in an installed wheel (package data, see
    ``setup.py``), else the checkout's top-level ``bundle/`` (a source tree or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "bundle"
    if (packaged / "configs" / "metadata.json").is_file():
        return packaged
    return package.parent / "bundle"


BUNDLE_ROOT = _find_bundle_root()
"""The bundle (``configs/``, ``docs/``, ``LICENSE``) that ships with the package."""
COMMON_CONFIG = "common.json"
"""The config every stage stacks first: the shared ids (data, device, seed) and the ``records`` block."""


def read_bundle_config(files: Sequence[str], bundle_root: str | Path | None = None) -> ConfigParser:
    """A ``ConfigParser`` holding the bundle's ``configs/<file>`` for each of ``files``, stacked in order (later
    files override earlier ids, as ``monai.bundle run --config_file "[a, b]"`` does).

    Raises:
        FileNotFoundError: a config file is missing (the message names it).
    """
    folder = Path(BUNDLE_ROOT if bundle_root is None else bundle_root) / "configs"
    paths = [folder / name for name in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"bundle config not found: {path}")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    return parser
