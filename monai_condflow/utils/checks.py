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
"""Validation of the values that reach the package from configs and callers, one function per kind of value."""

from __future__ import annotations

import math

__all__ = [
    "ConfigValueError",
    "check_flag",
    "check_fractions",
    "check_positive_int",
    "check_shrinkage",
    "check_temperature",
]


class ConfigValueError(ValueError):
    """A configuration id holds a value the pipeline cannot use; the message names the id."""


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum`` (``max_epochs``, ``batch_size``, ...).

    Raises:
        ConfigValueError: naming the config id ``name`` for a non-integer (or a ``bool``) or a smaller value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigValueError(f"config id '{name}' must be an integer >= {minimum}, got {value!r}.")
    return value


def check_temperature(value: object, name: str = "temperature") -> float:
    """A sampling temperature: a finite number > 0.

    Raises:
        ConfigValueError: naming the config id ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigValueError(f"config id '{name}' must be a number > 0, got {value!r}.")
    return float(value)


def check_shrinkage(value: object, name: str = "sampling_prior_shrinkage") -> float | None:
    """A covariance shrinkage in ``(0, 1]``, or ``None`` (no fitted sampling prior).

    Raises:
        ConfigValueError: naming the config id ``name`` otherwise.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigValueError(f"config id '{name}' must be a number in (0, 1] or null, got {value!r}.")
    return float(value)


def check_fractions(value: object, name: str) -> list[float]:
    """A non-empty list of finite numbers >= 0 (the augmentation study's fractions of the class gap).

    Raises:
        ConfigValueError: naming the config id ``name`` for a bare number, an empty list or a bad entry.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigValueError(f"config id '{name}' must be a non-empty list of numbers >= 0, got {value!r}.")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigValueError(f"config id '{name}' must hold finite numbers >= 0, got {v!r} in {list(value)}.")
    return [float(v) for v in value]


def check_flag(value: object, name: str) -> bool:
    """A switch: ``true`` or ``false`` (on the bundle's command line ``True`` / ``False``), nothing else.

    Raises:
        ConfigValueError: naming the config id ``name`` for a string, a number or ``None`` (``"false"`` would
            otherwise read as on). For the text ``"true"`` / ``"false"`` (what ``python -m monai.bundle run``
            passes for ``--name false``: its command line reads only ``True`` / ``False`` as switches) the
            message says what to write instead.
    """
    if not isinstance(value, bool):
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            word = value.strip().lower().capitalize()
            hint = (f" (the text {value!r}: on the `python -m monai.bundle run` command line write --{name} {word}; "
                    "it reads lowercase true / false as text)")  # fmt: skip
        raise ConfigValueError(f"config id '{name}' must be true or false, got {value!r}{hint}.")
    return value
