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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_condflow.data.splits import patient_disjoint_split
from monai_condflow.handlers.checkpoint import find_latest_checkpoint, load_module_weights
from monai_condflow.utils.io import atomic_write_json

__all__ = [
    "AUDIT_HOLDOUT",
    "split_audit_holdout",
    "audit_holdout_mask",
    "latest_checkpoint",
    "require_file",
    "write_json_atomic",
    "remove_training_labels",
    "presumptive_label_summary",
    "write_stage_info",
    "read_stage_info",
    "load_weights",
]

logger = logging.getLogger(__name__)


def latest_checkpoint(directory: str | os.PathLike, prefix: str | Sequence[str] = "state") -> str | None:
    """The newest complete checkpoint ``<prefix>_*_epoch=<step>.pt`` in ``directory`` as a string, or ``None``.

    A thin wrapper of :func:`monai_condflow.handlers.checkpoint.find_latest_checkpoint` for config expressions:
    temporary files of an interrupted save never match, and a file that does not load with ``weights_only=True``
    (truncated or unsafe) is skipped, so resume falls back to the previous one. ``prefix`` may list several prefixes
    (the flow's :data:`~monai_condflow.engines.flow.FLOW_STATE_PREFIXES` also resume older runs' files).
    """
    found = find_latest_checkpoint(directory, prefix)
    return None if found is None else str(found[0])


def require_file(path: str | os.PathLike, what: str, run_first: str) -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` saying which stage to run first."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found at {path}: run {run_first} first with the same output_dir.")
    return str(path)


write_json_atomic = atomic_write_json
"""Write ``data`` as JSON atomically (:func:`monai_condflow.utils.io.atomic_write_json`)."""


def write_stage_info(directory: str | os.PathLike, stage: str, info: dict) -> Path:
    """Write ``directory/stage.json`` describing what a stage produced (preset, classes, metrics...)."""
    return write_json_atomic(Path(directory) / f"{stage}.json", info)


def read_stage_info(directory: str | os.PathLike, stage: str, run_first: str) -> dict:
    """Read what :func:`write_stage_info` wrote, or say which stage to run first."""
    path = Path(require_file(Path(directory) / f"{stage}.json", f"{stage} stage information", run_first))
    return json.loads(path.read_text(encoding="utf-8"))


def load_weights(module: torch.nn.Module, path: str | os.PathLike, key: str = "network") -> torch.nn.Module:
    """Load a stage's ``model.pt`` (``{key: state_dict}`` as ``CheckpointSaver`` writes it, or a bare state dict).

    :func:`~monai_condflow.handlers.checkpoint.load_module_weights`: ``weights_only=True`` (a checkpoint that would run
    code when unpickled is refused) and every tensor must fit; errors name the file and the offending keys.

    Raises:
        CheckpointError: missing, unsafe or unreadable file, or weights of another network.
    """
    return load_module_weights(module, path, key)


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


def presumptive_label_summary(
    directory: str | os.PathLike, true_records: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any] | None:
    """How right the presumptive labels of a semi-supervised classifier stage were (``None`` without any).

    Reads ``directory/train_labels.json`` (:func:`write_training_labels`) and compares each presumptive label with the
    true label of the same record in ``true_records`` (matched by ``source``, else by image path). Without
    ``true_records`` (or no match) it falls back to the last label-propagation round's ``presumptive_accuracy`` in
    ``directory/classifier.json``.

    Args:
        directory: the classifier stage's folder.
        true_records: the training split's records with their true ``label`` (e.g. ``load_covidx_split``).

    Returns:
        ``{"accuracy": float | None, "n_labelled": int, "n_presumptive": int, "n_compared": int, "source": str |
        None}``, or ``None`` when the stage wrote no presumptive labels (a fully supervised run).
    """
    path = Path(directory) / TRAINING_LABELS
    if not path.is_file():
        return None
    entries = json.loads(path.read_text(encoding="utf-8"))
    guesses = [e for e in entries if e.get("presumptive")]
    if not guesses:
        return None
    out: dict[str, Any] = {
        "accuracy": None,
        "n_labelled": len(entries) - len(guesses),
        "n_presumptive": len(guesses),
        "n_compared": 0,
        "source": None,
    }
    by_source: dict[str, int] = {}
    by_image: dict[str, int] = {}
    for r in true_records or []:
        if r.get("label") is None:
            continue
        if isinstance(r.get("source"), str):
            by_source.setdefault(r["source"], int(r["label"]))
        for key in ("image_path", "image"):
            if isinstance(r.get(key), (str, os.PathLike)):
                by_image.setdefault(str(r[key]), int(r["label"]))
    correct = compared = 0
    for e in guesses:
        truth = by_source.get(e["source"]) if isinstance(e.get("source"), str) else None
        if truth is None:
            truth = by_image.get(str(e.get("image")))
        if truth is not None:
            compared += 1
            correct += int(int(e["label"]) == truth)
    if compared:
        out.update(accuracy=correct / compared, n_compared=compared, source=f"{TRAINING_LABELS} vs true labels")
        return out
    info = Path(directory) / "classifier.json"
    if info.is_file():
        rounds = json.loads(info.read_text(encoding="utf-8")).get("rounds") or []
        value = rounds[-1].get("presumptive_accuracy") if rounds and isinstance(rounds[-1], Mapping) else None
        if isinstance(value, (int, float)):
            out.update(accuracy=float(value), source="classifier.json (last label-propagation round)")
    return out


def remove_training_labels(directory: str | os.PathLike) -> bool:
    """Delete ``directory/train_labels.json`` left by an earlier semi-supervised run: a stage that trains on the true
    labels only writes none, and a stale list would give the flow stage the old presumptive labels.

    Returns:
        whether a file was deleted.
    """
    path = Path(directory) / TRAINING_LABELS
    if path.is_file() or path.is_symlink():
        path.unlink()
        logger.info("removed the label list %s of an earlier run.", path)
        return True
    return False


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


AUDIT_HOLDOUT = "audit_holdout.json"


def _record_key(record: dict) -> str:
    return str(record.get("source") or record.get("image_path") or record.get("image"))


def split_audit_holdout(
    records: list[dict], fraction: float, seed: int = 0, directory: str | os.PathLike | None = None
) -> list[dict]:
    """Keep a patient-disjoint, class-stratified ``fraction`` of the training records out of flow training.

    The held-back images are non-members from the training distribution itself, so the membership-inference audit
    (train vs held-back) is not confounded by a shift between the training and test splits. Their annotation
    sources (``file:line``) are written to ``directory/audit_holdout.json`` for the evaluation stage.

    Args:
        records: the flow's training records (with ``label`` and, when known, ``patient_id``).
        fraction: share held back, in ``[0, 0.5]``; 0 holds back nothing (and removes a stale list).
        seed: seed of the split.
        directory: the flow stage's folder (``None``: write nothing).

    Returns:
        the records to train on.

    Raises:
        ValueError: ``fraction`` outside ``[0, 0.5]`` (config id ``audit_holdout``).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 0.5:
        raise ValueError(f"config id 'audit_holdout' must be a fraction in [0, 0.5], got {fraction!r}.")
    path = None if directory is None else Path(directory) / AUDIT_HOLDOUT
    if fraction == 0:
        if path is not None and path.is_file():
            path.unlink()
        return list(records)
    parts = patient_disjoint_split(records, (1 - fraction, fraction), seed=seed, names=("members", "holdout"))
    if path is not None:
        write_json_atomic(
            path, {"fraction": fraction, "seed": seed, "sources": [_record_key(r) for r in parts["holdout"]]}
        )
    return parts["members"]


def audit_holdout_mask(output_dir: str | os.PathLike, records: list[dict]) -> torch.Tensor | None:
    """``[N]`` bool mask of the ``records`` the flow stage held back (``flow/audit_holdout.json``), or ``None``."""
    path = Path(output_dir) / "flow" / AUDIT_HOLDOUT
    if not path.is_file():
        return None
    held = set(json.loads(path.read_text(encoding="utf-8"))["sources"])
    mask = torch.tensor([_record_key(r) in held for r in records], dtype=torch.bool)
    if int(mask.sum()) != len(held):
        raise ValueError(
            f"{path} lists {len(held)} held-back images but {int(mask.sum())} of them are in the training records: "
            "the flow stage ran on a different training list."
        )
    return mask
