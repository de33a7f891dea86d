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
"""Validation of bundle configuration values: every bad value stops the run with the id that holds it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from monai_condflow.utils.checks import (
    ConfigValueError,
    check_flag,
    check_fractions,
    check_positive_int,
    check_temperature,
)
from monai_condflow.utils.distributed import is_distributed

__all__ = [
    "ConfigValueError",
    "check_positive_int",
    "check_temperature",
    "check_preset",
    "check_device",
    "check_output_dir",
    "check_common",
    "check_single_process",
    "check_flag",
    "check_flags",
    "check_fractions",
    "check_preprocessing",
    "check_run_classes",
]


def check_flags(flags: Mapping[str, object]) -> bool:
    """Check every switch of a config, ``{"config id": value}``, with :func:`check_flag` (``True`` / ``False``
    only: the text ``"false"`` that ``python -m monai.bundle run --id false`` passes would otherwise read as on);
    returns True so configs can use it in ``check_config``.

    Raises:
        ConfigValueError: naming the first id whose value is not a bool.
    """
    for name, value in flags.items():
        check_flag(value, name)
    return True


def check_preset(value: object, valid: tuple[str, ...], name: str) -> str:
    """A preset name among ``valid``."""
    if value not in valid:
        raise ConfigValueError(f"config id '{name}' must be one of {list(valid)}, got {value!r}.")
    return str(value)


def check_device(device: object, name: str = "device") -> torch.device:
    """A device this machine has: ``"cuda"`` (or ``"cuda:N"``) needs CUDA (and GPU ``N``).

    Raises:
        ConfigValueError: naming the config id for an unknown device string or a GPU the machine does not have.
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigValueError(f"config id '{name}' is not a device: {device!r} ({err}).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigValueError(
                f"config id '{name}' is {str(dev)!r} but CUDA is not available on this machine; use "
                f"--{name} cpu (or leave '{name}' at its default, which picks CUDA only when present)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigValueError(
                f"config id '{name}' is {str(dev)!r} but this machine has {torch.cuda.device_count()} GPU(s)."
            )
    return dev


def check_output_dir(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """An output folder that is (or can be made) a writable folder: not a file, not read-only.

    Raises:
        ConfigValueError: naming the config id and the path when it (or the nearest existing folder above it) is
            a file or cannot be written by this user.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigValueError(f"config id '{name}': {folder} is a file, not a folder; give a folder for the outputs.")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigValueError(f"config id '{name}': {probe} (a parent of {folder}) is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigValueError(
            f"config id '{name}': {probe} is read-only for this user, so {folder} cannot be written; choose another "
            "output folder."
        )
    return folder


def check_common(
    max_epochs: object,
    batch_size: object,
    image_size: object,
    num_classes: object,
    dataset_dir: str | os.PathLike | None = None,
    device: object = None,
    output_dir: str | os.PathLike | None = None,
) -> bool:
    """Check the ids every training stage shares; returns True so configs can use it in ``initialize``.

    Raises:
        ConfigValueError: for a bad ``max_epochs`` (must be >= 1), ``batch_size``, ``image_size`` (must be
            divisible by 8) or ``num_classes``; a ``device`` the machine does not have (:func:`check_device`); an
            ``output_dir`` that is a file or read-only (:func:`check_output_dir`).
        FileNotFoundError: when ``dataset_dir`` is given and does not exist.
    """
    check_positive_int("max_epochs", max_epochs, minimum=1)
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
    if device is not None:
        check_device(device)
    if output_dir is not None:
        check_output_dir(output_dir)
    return True


def check_preprocessing(intensity: object, hu_window: object, crop: object) -> bool:
    """The preprocessing ids: ``intensity`` one of the intensity modes, ``hu_window`` ``[level, width]`` (finite
    numbers, width > 0), ``crop`` one of the crop modes; returns True so configs can use it in an expression.

    Raises:
        ConfigValueError: naming the id, its value and what it accepts.
    """
    from monai_condflow.transforms.array import INTENSITY_MODES  # the transforms import the data readers
    from monai_condflow.transforms.chains import CROP_MODES

    check_preset(intensity, INTENSITY_MODES, "intensity")
    check_preset(crop, CROP_MODES, "crop")
    numbers = isinstance(hu_window, (list, tuple)) and len(hu_window) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in hu_window
    )
    if not numbers or not hu_window[1] > 0:
        raise ConfigValueError(
            f"config id 'hu_window' must be [level, width] in HU with width > 0 (e.g. [-600, 1500], the lung window; "
            f"on the command line --hu_window \"[-600, 1500]\"), got {hu_window!r}."
        )
    return True


def _class_map_labels(class_map: object) -> dict[int, int] | None:
    """``{raw class id: label}`` of a ``class_map`` id or of one recorded in ``run_settings.json`` (JSON keys are
    strings), ``None`` when it is not a class map."""
    from monai_condflow.data.readers import resolve_class_map

    if isinstance(class_map, Mapping):
        try:
            class_map = {int(k): v for k, v in class_map.items()}
        except (TypeError, ValueError):
            return None
    try:
        return resolve_class_map(class_map)  # type: ignore[arg-type]
    except ValueError:
        return None


def _class_map_arg(class_map: object) -> str:
    """``class_map`` as it is written on a command line (``three``, ``"{0: 0, 2: 1}"``)."""
    labels = None if isinstance(class_map, str) else _class_map_labels(class_map)
    return str(class_map) if labels is None else '"' + str(labels) + '"'


def check_run_classes(
    output_dir: str | os.PathLike,
    num_classes: object,
    class_map: object,
    stages: tuple[str, ...] = ("classifier", "flow"),
) -> bool:
    """``num_classes`` and ``class_map`` must be those the run's trained stages recorded (``<stage>/run_settings.json``,
    section ``stage``): a stage that reads a three-class run with the default ``binary`` map would label its records
    0 / 1 (COVID-19 as 1, pneumonia as 0) for a classifier and a flow that know three classes, and write wrong
    classes without an error. Returns True (also for a stage that has not run, or that recorded neither id), so
    configs can use it in an expression.

    Raises:
        ConfigValueError: naming the id that differs, the stage folder, both values and what to pass.
        RunSettingsError: a stage's settings file cannot be read.
    """
    from monai_condflow.engines.run_folder import SETTINGS_NAME, recorded_difference

    def same(key: str, value: object, was: object) -> bool:
        if key == "class_map":
            return _class_map_labels(value) == _class_map_labels(was)
        return not isinstance(value, bool) and value == was

    found = recorded_difference(output_dir, stages, {"num_classes": num_classes, "class_map": class_map}, same)
    if found is not None:
        stage, folder, key, value, recorded = found
        shown = {"num_classes": recorded.get("num_classes"), "class_map": recorded.get("class_map")}
        shown["class_map"] = None if shown["class_map"] is None else _class_map_arg(shown["class_map"])
        hint = " ".join(f"--{k} {v}" for k, v in shown.items() if v is not None)
        raise ConfigValueError(
            f"config id '{key}' is {value!r} but the {stage} in {folder} was trained with {key} {recorded[key]!r} "
            f"({SETTINGS_NAME}): its classes would be read otherwise, and outputs labelled wrongly. Pass {hint} "
            "(the ids the run was trained with; the pipeline's --set num_classes=... --set class_map=...)."
        )
    return True


def check_single_process(what: str) -> bool:
    """Refuse a run started with several processes (``torchrun``) for a stage that runs in one process only;
    returns True so configs can use it in an expression.

    Raises:
        ConfigValueError: when ``torch.distributed`` is initialised with more than one process.
    """
    if is_distributed():
        raise ConfigValueError(f"{what} runs in one process; start it without torchrun.")
    return True
