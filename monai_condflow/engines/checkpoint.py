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
"""Compatibility re-export: this module moved to :mod:`monai_condflow.handlers.checkpoint` (a lower layer).

Import it from there; the names stay importable from here.
"""

from __future__ import annotations

from monai_condflow.handlers.checkpoint import (  # noqa: F401  # noqa: F401
    _STEP_RE,
    TEMP_SUFFIX,
    AtomicDiskSaver,
    CheckpointError,
    LoaderRandomState,
    RandomStateTracker,
    atomic_torch_save,
    atomic_write_bytes,
    create_checkpoint_handler,
    find_latest_checkpoint,
    load_checkpoint,
    load_module_weights,
    prune_missing_files,
    remove_temp_files,
)

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_torch_save",
    "load_checkpoint",
    "load_module_weights",
    "find_latest_checkpoint",
    "AtomicDiskSaver",
    "create_checkpoint_handler",
    "prune_missing_files",
    "remove_temp_files",
    "RandomStateTracker",
    "LoaderRandomState",
]
