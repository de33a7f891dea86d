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
"""The package's one way to write a file: atomically (temporary file in the target folder, fsync, ``os.replace``).

A reader never sees a partial file under the target name, and a crash leaves at most a ``.<name>.*.tmp`` file beside
it. ``os.replace`` swaps the directory entry, so a symlink planted under the target name is replaced and its target
never written.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODEL_FILE",
    "STATE_PREFIX",
    "TEMP_SUFFIX",
    "shareable_file_mode",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_torch_save",
]

MODEL_FILE = "model.pt"
"""File name of a stage's model in its folder (the model-zoo name): ``{"network": state_dict, ...}``, or the bare
state dict MONAI's ``CheckpointSaver`` writes for a single object (the supervised classifier's best epoch)."""
STATE_PREFIX = "state"
"""File-name prefix of a stage's resumable training state in its folder: ``state_checkpoint_epoch=N.pt`` (MONAI
``CheckpointSaver``'s interval name with ``file_prefix=STATE_PREFIX``; the classifier keeps the latest epoch, the
flow its last ``n_saved``), found with ``handlers.checkpoint.find_latest_checkpoint(folder, STATE_PREFIX)``. The
classifier's and the flow's bundle configs and Python APIs
(:func:`monai_condflow.engines.classifier.create_classifier_trainer`,
:func:`monai_condflow.engines.flow.create_flow_trainer`) all write it."""
TEMP_SUFFIX = ".tmp"
"""Suffix of the temporary files of :func:`atomic_write_bytes` (``.<name>.<random>.tmp``)."""


def shareable_file_mode() -> int:
    """``0o666`` under the process umask (``0o644`` with the usual ``022``): the mode of an ordinary new file, for
    results meant to be read by others (temporary files are created ``0600``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    Args:
        path: the target file (parent folders are created).
        data: the bytes to write.
        mode: permission bits of the file; ``None`` keeps the temporary file's ``0600`` (checkpoints, private data),
            :func:`shareable_file_mode` gives an ordinary file's.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically with an ordinary file's permissions (:func:`shareable_file_mode`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=shareable_file_mode())


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (values JSON cannot hold are written as ``str``)."""
    return atomic_write_bytes(path, json.dumps(data, indent=2, default=str).encode("utf-8"))


def atomic_write_png(image: Any, path: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Save a PIL image as PNG atomically, with an ordinary file's permissions.

    Args:
        image: a ``PIL.Image.Image``.
        path: the target ``.png``.
        save_kwargs: passed to ``Image.save`` (e.g. ``compress_level``).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return atomic_write_bytes(path, buffer.getvalue(), mode=shareable_file_mode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
