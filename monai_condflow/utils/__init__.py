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
"""monai_condflow.utils: the lowest layer: atomic file writes (:mod:`.io`), distributed helpers (:mod:`.distributed`).

Everything else in the package may import from here; nothing here imports the rest of the package.
"""

from __future__ import annotations

from .io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_png,
    atomic_write_text,
    shareable_file_mode,
)

__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_write_text",
    "shareable_file_mode",
]
