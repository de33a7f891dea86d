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
"""Finding and loading a stage's model (``OUTPUT_DIR/<stage>/model.pt``) for the evaluation."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from monai_condflow.handlers.checkpoint import load_module_weights
from monai_condflow.utils.io import MODEL_FILE

__all__ = ["find_model_checkpoint", "load_module"]


def find_model_checkpoint(directory: str | os.PathLike, name: str) -> Path:
    """The model of a stage folder: ``directory/model.pt``, the one name every stage saves its model under.

    Raises:
        FileNotFoundError: naming ``name`` and the folder when the stage has not written its model.
    """
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {name} model at {path}: run the {name} stage first with this output_dir.")
    return path


def load_module(
    spec: nn.Module | str | os.PathLike, factory: Callable[[], nn.Module], name: str, device: str | torch.device = "cpu"
) -> nn.Module:
    """A module given as itself, a checkpoint file, or a stage folder (its ``model.pt``), in eval mode.

    The weights are the checkpoint's ``network`` entry (how every stage saves its model), or the checkpoint itself
    when it is a bare state dict (the supervised classifier's best epoch); they are loaded by the package's one
    weights loader, :func:`~monai_condflow.handlers.checkpoint.load_module_weights` (``weights_only=True``, every
    tensor must fit).

    Raises:
        FileNotFoundError: a stage folder without ``model.pt``.
        CheckpointError: an unreadable or unsafe file, or weights of another network.
    """
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    path = Path(spec)
    if path.is_dir():
        path = find_model_checkpoint(path, name)
    module = load_module_weights(factory(), path, what=f"{name} checkpoint")
    return module.to(device).eval()
