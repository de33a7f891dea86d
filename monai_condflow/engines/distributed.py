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
"""Compatibility re-export: this module moved to :mod:`monai_condflow.utils.distributed` (a lower layer).

Import it from there; the names stay importable from here.
"""

from __future__ import annotations

from monai_condflow.utils.distributed import (  # noqa: F401  # noqa: F401
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    all_gather_tensors,
    any_across_ranks,
    barrier,
    broadcast_module,
    cleanup_distributed,
    create_loader,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    process_group_timeout,
    unwrap_model,
    wrap_ddp,
)

__all__ = [
    "init_distributed",
    "process_group_timeout",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "wrap_ddp",
    "unwrap_model",
    "create_loader",
    "any_across_ranks",
    "broadcast_module",
    "all_gather_tensors",
    "barrier",
    "cleanup_distributed",
]
