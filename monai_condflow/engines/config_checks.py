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
"""Validation of bundle configuration values (R9): every bad value stops the run with the id that holds it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ConfigValueError", "check_positive_int", "check_temperature", "check_preset", "check_common"]


class ConfigValueError(ValueError):
    """A configuration id holds a value the pipeline cannot use; the message names the id."""


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise :class:`ConfigValueError` naming the config id ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigValueError(f"config id '{name}' must be an integer >= {minimum}, got {value!r}.")
    return value


def check_temperature(value: object, name: str = "temperature") -> float:
    """Sampling temperature: a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigValueError(f"config id '{name}' must be a number > 0, got {value!r}.")
    return float(value)


def check_preset(value: object, valid: tuple[str, ...], name: str) -> str:
    """A preset name among ``valid``."""
    if value not in valid:
        raise ConfigValueError(f"config id '{name}' must be one of {list(valid)}, got {value!r}.")
    return str(value)


def check_common(
    max_epochs: object,
    batch_size: object,
    image_size: object,
    num_classes: object,
    dataset_dir: str | os.PathLike | None = None,
) -> bool:
    """Check the ids every training stage shares; returns True so configs can use it in ``initialize``.

    Raises:
        ConfigValueError: for a bad ``max_epochs``, ``batch_size``, ``image_size`` (must be divisible by 8) or
            ``num_classes``.
        FileNotFoundError: when ``dataset_dir`` is given and does not exist.
    """
    check_positive_int("max_epochs", max_epochs, minimum=0)
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_classes", num_classes, minimum=2)
    size = check_positive_int("image_size", image_size, minimum=8)
    if size % 8:
        raise ConfigValueError(f"config id 'image_size' must be divisible by 8, got {size}.")
    if dataset_dir is not None and not Path(dataset_dir).is_dir():
        raise FileNotFoundError(
            f"config id 'dataset_dir': folder {dataset_dir} does not exist. Give a COVIDx-CT-format folder "
            "(images + train.txt/val.txt/test.txt) or generate one with "
            "`python -m monai_condflow.data.phantom --out DIR`."
        )
    return True
