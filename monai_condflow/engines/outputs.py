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
"""The output of one training step of the trainers that do not decollate (flow, ACGAN), shaped for MONAI's handlers.

MONAI's handlers read a trainer's ``engine.state.output`` through ``from_engine(keys, first=True)``, which expects a
*decollated* output: a list of per-sample dicts whose scalars (the loss) are replicated in every item. MONAI's
experiment-tracking settings (``monai.bundle run ... --tracking mlflow``) add an ``MLFlowHandler`` whose
``output_transform`` is exactly ``from_engine(['loss'], first=True)``. On a plain dict that function returns a
one-element tuple, which no tracker can log. :class:`StepOutput` is a one-item list ``[record]`` (what
``from_engine(..., first=True)`` reads) that also answers the record's keys like the dict it wraps, so
``engine.state.output["loss"]`` keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["StepOutput", "output_value"]


class StepOutput(list):
    """
    ``[record]``: one training step's output as a one-item list that also reads and writes like ``record``.

    - ``from_engine(["loss"], first=True)(output)`` (MONAI's tracking and stats handlers) -> ``record["loss"]``;
    - ``output["loss"]``, ``output["loss"] = v``, ``"loss" in output``, ``output.get("skipped", False)``,
      ``keys()`` / ``items()`` / ``values()`` -> the record's;
    - ``output[0]`` -> ``record`` (an integer index is a list index).

    Args:
        record: the step's values (``image``, ``label``, ``pred``, ``loss`` ...); kept by reference.

    Example::

        out = StepOutput({"loss": torch.tensor(3.2)})
        out["loss"], out[0]["loss"], monai.handlers.from_engine(["loss"], first=True)(out)  # the same tensor
    """

    def __init__(self, record: Mapping[str, Any] | None = None) -> None:
        self.record: dict[str, Any] = dict(record or {})
        super().__init__([self.record])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.record[key]
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str):
            self.record[key] = value
        else:
            super().__setitem__(key, value)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return key in self.record
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``record.get(key, default)``."""
        return self.record.get(key, default)

    def keys(self) -> Any:
        """The record's keys."""
        return self.record.keys()

    def values(self) -> Any:
        """The record's values."""
        return self.record.values()

    def items(self) -> Any:
        """The record's items."""
        return self.record.items()


def output_value(output: Any, key: str, default: Any = None) -> Any:
    """``output[key]`` of a dict, a :class:`StepOutput` or a decollated list of dicts (its first item); ``default``
    when absent."""
    if isinstance(output, (Mapping, StepOutput)):
        return output.get(key, default)
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        return output[0].get(key, default)
    return default
