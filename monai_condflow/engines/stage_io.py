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
from pathlib import Path
from typing import Any

import torch

from monai_condflow.engines.checkpoint import atomic_write_bytes, find_latest_checkpoint

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
    """The newest complete checkpoint ``<prefix>_*_<step>.pt`` in ``directory`` as a string, or ``None``.

    A thin wrapper of :func:`monai_condflow.engines.checkpoint.find_latest_checkpoint` for config expressions:
    temporary files of an interrupted save never match, and a file that does not load with ``weights_only=True``
    (truncated or unsafe) is skipped, so resume falls back to the previous one.
    """
    found = find_latest_checkpoint(directory, prefix)
    return None if found is None else str(found[0])


def require_file(path: str | os.PathLike, what: str, run_first: str) -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` saying which stage to run first."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}: run {run_first} first with the same output_dir.")
    return str(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file and ``os.replace`` (never a half-written file)."""
    return atomic_write_bytes(path, json.dumps(data, indent=2, default=str).encode("utf-8"))


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


TRAINING_LABELS = "train_labels.json"


def write_training_labels(
    directory: str | os.PathLike,
    labelled: list[dict],
    unlabelled: list[dict] | None = None,
    presumptive: Any = None,
) -> Path:
    """Record the labels the classifier stage ended with, for the flow and generation stages.

    Each entry keeps the record's ``image``, ``box`` and ``source`` (internal paths: this file never leaves the
    output folder and nothing derived from it is written next to synthetic images), the ``label`` used for
    training, and ``presumptive`` (True for labels from label propagation).

    Args:
        directory: the classifier stage's folder.
        labelled: records with their true labels.
        unlabelled: records whose labels come from ``presumptive`` (their own ``label`` is ignored).
        presumptive: presumptive labels ``[len(unlabelled)]`` (a tensor, array or list).
    """
    unlabelled = unlabelled or []
    guesses = [] if presumptive is None else [int(v) for v in torch.as_tensor(presumptive).reshape(-1).tolist()]
    if len(guesses) != len(unlabelled):
        raise ValueError(f"{len(unlabelled)} unlabelled records but {len(guesses)} presumptive labels.")

    def _entry(record: dict, label: int, is_presumptive: bool) -> dict:
        keep = {k: record[k] for k in ("box", "source") if isinstance(record.get(k), (str, list, tuple))}
        image = record.get("image_path", record.get("image"))
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"record {record.get('source', '?')} has no image path to record in {TRAINING_LABELS}.")
        return {"image": str(image), **keep, "label": int(label), "presumptive": is_presumptive}

    entries = [_entry(r, r["label"], False) for r in labelled]
    entries += [_entry(r, g, True) for r, g in zip(unlabelled, guesses)]
    return write_json_atomic(Path(directory) / TRAINING_LABELS, entries)


def read_training_records(directory: str | os.PathLike, fallback: list[dict] | None = None) -> list[dict]:
    """The training records with the labels of :func:`write_training_labels`, or ``fallback`` when the
    classifier stage wrote none (a fully supervised run)."""
    path = Path(directory) / TRAINING_LABELS
    if not path.is_file():
        if fallback is None:
            raise FileNotFoundError(f"{path} not found: run train_classifier.json first with the same output_dir.")
        return list(fallback)
    records = json.loads(path.read_text(encoding="utf-8"))
    for r in records:
        if isinstance(r.get("box"), list):
            r["box"] = tuple(r["box"])
    return records
