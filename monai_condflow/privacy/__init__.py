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
"""monai_condflow.privacy: memorisation and membership-inference audits and DP-SGD wiring.

The DP-SGD helpers need Opacus; they are imported lazily so the audits work without it.
"""

from __future__ import annotations

from typing import Any

from .audits import (
    dcr_audit,
    dcr_statistics,
    distance_to_closest_record,
    membership_inference_auc,
    membership_inference_scores,
    privacy_section,
    privacy_summary,
)

__all__ = [
    "dcr_audit",
    "dcr_statistics",
    "distance_to_closest_record",
    "membership_inference_auc",
    "membership_inference_scores",
    "privacy_section",
    "privacy_summary",
    "make_private",
    "prepare_module",
    "per_sample_gradients",
    "dp_flow_step",
    "flow_nll",
    "dp_summary",
    "coverage_note",
    "covered_parameters",
]

_DP_NAMES = {"make_private", "prepare_module", "per_sample_gradients", "dp_flow_step", "flow_nll", "dp_summary",
             "coverage_note", "covered_parameters"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _DP_NAMES:
        from . import dp

        return getattr(dp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
