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
"""Files that pipeline stages hand to each other: checkpoints found safely, and a small JSON per stage."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "latest_checkpoint",
    "require_file",
    "write_json_atomic",
    "write_stage_info",
    "read_stage_info",
    "load_weights",
]

logger = logging.getLogger(__name__)


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "state") -> str | None:
    """The newest complete checkpoint ``<prefix>_*.pt`` in ``directory``, or ``None``.

    Temporary files of an interrupted save (which never carry the prefix) are ignored, and so is any file that
    does not load with ``weights_only=True`` (a truncated or foreign file): resume falls back to the previous one.
    """
    root = Path(directory)
    if not root.is_dir():
        return None
    candidates = sorted(root.glob(f"{prefix}_*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, with its reason logged
            logger.warning("ignoring unreadable checkpoint %s: %s", path, err)
            continue
        return str(path)
    return None


def require_file(path: str | os.PathLike, what: str, run_first: str) -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` saying which stage to run first."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}: run {run_first} first with the same output_dir.")
    return str(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_stage_info(directory: str | os.PathLike, stage: str, info: dict) -> Path:
    """Write ``directory/stage.json`` describing what a stage produced (preset, classes, metrics...)."""
    return write_json_atomic(Path(directory) / f"{stage}.json", info)


def read_stage_info(directory: str | os.PathLike, stage: str, run_first: str) -> dict:
    """Read what :func:`write_stage_info` wrote, or say which stage to run first."""
    path = Path(require_file(Path(directory) / f"{stage}.json", f"{stage} stage information", run_first))
    return json.loads(path.read_text(encoding="utf-8"))


def load_weights(module: torch.nn.Module, path: str | os.PathLike, key: str | None = "network") -> torch.nn.Module:
    """Load a state dict saved by ``CheckpointSaver`` (``{key: state_dict}`` or a bare state dict) safely.

    ``torch.load(..., weights_only=True)``: a checkpoint that would run code when unpickled is refused.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    module.load_state_dict(state)
    return module
