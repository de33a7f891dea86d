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
"""Reader for compact ``.npz`` slice datasets (e.g. ``ucsd_covid_ct_64.npz``, ``covid_ct_md_128.npz``).

Expected keys: ``images`` (uint8 ``[N, S, S]`` or ``[N, 1, S, S]``, or float in ``[0, 1]``), ``labels`` (ints
``[N]``); optional ``class_names`` ``[C]``, ``patient_ids`` ``[N]`` and ``official_split`` (or ``split``) ``[N]``
of strings such as ``"train"`` / ``"val"`` / ``"test"``. Files are opened with ``allow_pickle=False``: object
arrays are refused.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monai_condflow.data.errors import DataError, ReadReport, check_on_error

__all__ = ["SPLIT_KEYS", "PATIENT_KEYS", "load_npz_dataset", "class_names_from_npz"]

logger = logging.getLogger(__name__)

#: Keys looked up, in order, for the per-slice split name.
SPLIT_KEYS = ("official_split", "split")
#: Keys looked up, in order, for the per-slice patient id.
PATIENT_KEYS = ("patient_ids", "patient_id")


def load_npz_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    image_size: int | None = None,
    on_error: str = "raise",
    report: ReadReport | None = None,
) -> list[dict]:
    """Read an ``.npz`` slice dataset as records.

    Args:
        path: the ``.npz`` file.
        split: keep only slices whose ``official_split`` (or ``split``) value equals this (e.g. ``"train"``);
            ``None`` keeps every slice.
        image_size: side ``S`` of the returned images; when it differs from the stored side the images are
            resized (area averaging when shrinking, bilinear when enlarging). ``None`` keeps the stored side.
        on_error: ``"raise"`` raises at the first bad slice (NaN / Inf, values outside ``[0, 1]``, constant
            image); ``"skip"`` leaves such slices out and logs a warning with the count. Problems with whole
            arrays (missing keys, object arrays, shapes, dtypes) always raise.
        report: filled in with the number of records read and the skipped slices.

    Returns:
        Records ``{"image": float32 ndarray [1, S, S] in [0, 1], "label": int, "patient_id": str (when the file
        has patient ids), "source": "path#index"}`` in file order (``index`` is the slice's index in the file).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        DataError: naming the file and the key (or ``file#index``) for an unreadable file, a missing key, an
            object array, a wrong shape / channel count / dtype, labels outside ``class_names``, an unknown
            split, or (``on_error="raise"``) a bad slice.

    Example::

        train = load_npz_dataset("../shared/data/ucsd_covid_ct_64.npz", split="train")
    """
    check_on_error(on_error)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}.")
    file = Path(path)
    arrays = _load_arrays(file)
    name = str(file)
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"missing key {key!r} (keys present: {sorted(arrays)}).", name, "missing key")
    images = _check_images(arrays["images"], name)
    n = images.shape[0]
    labels = _check_labels(arrays["labels"], n, name)
    if "class_names" in arrays:
        n_classes = len(np.atleast_1d(arrays["class_names"]))
        bad = np.flatnonzero(labels >= n_classes)
        if bad.size:
            raise DataError(
                f"label {int(labels[bad[0]])} at index {int(bad[0])} is not below the {n_classes} class_names "
                f"({bad.size} such labels).",
                f"{name}#{int(bad[0])}",
                "unknown class",
            )
    patient_ids = _optional_strings(arrays, PATIENT_KEYS, n, name)
    indices = np.arange(n)
    if split is not None:
        splits = _optional_strings(arrays, SPLIT_KEYS, n, name)
        if splits is None:
            raise DataError(
                f"split={split!r} asked for but the file has none of the keys {SPLIT_KEYS}.", name, "no split"
            )
        available = sorted(set(splits.tolist()))
        if split not in available:
            raise DataError(f"unknown split {split!r}; the file has {available}.", name, "no split")
        indices = np.flatnonzero(splits == split)

    local = ReadReport()
    keep: list[int] = []
    for i in indices.tolist():
        try:
            _check_slice(images[i], f"{name}#{i}")
        except DataError as err:
            if on_error == "raise":
                raise
            local.add(err)
            continue
        keep.append(i)

    selected = _to_unit_float(images[keep])
    if image_size is not None and selected.shape[-1] != image_size and len(keep):
        selected = _resize(selected, image_size)
    records: list[dict] = []
    for row, i in enumerate(keep):
        record: dict = {"image": selected[row], "label": int(labels[i])}
        if patient_ids is not None:
            record["patient_id"] = str(patient_ids[i])
        record["source"] = f"{name}#{i}"
        records.append(record)
    local.n_read = len(records)
    local.log_summary(logger, name)
    if report is not None:
        report.merge(local)
    return records


def class_names_from_npz(path: str | os.PathLike) -> list[str]:
    """The ``class_names`` array of an ``.npz`` dataset, indexed by label.

    Args:
        path: the ``.npz`` file.

    Returns:
        Class names as Python strings.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        DataError: naming the file when it is unreadable, has no ``class_names`` key, or stores it as an object
            array.
    """
    file = Path(path)
    arrays = _load_arrays(file, keys=("class_names",))
    if "class_names" not in arrays:
        raise DataError("missing key 'class_names'.", str(file), "missing key")
    return [str(c) for c in np.atleast_1d(arrays["class_names"]).tolist()]


def _load_arrays(file: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of the file (or only ``keys``), loaded without pickle."""
    if not file.is_file():
        raise FileNotFoundError(f".npz file {file} does not exist.")
    try:
        handle = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"not a readable .npz file ({type(err).__name__}: {err}).", str(file), "unreadable file"
        ) from err
    if not isinstance(handle, np.lib.npyio.NpzFile):
        raise DataError("expected an .npz archive, found a single .npy array.", str(file), "unreadable file")
    arrays: dict[str, np.ndarray] = {}
    with handle:
        for key in handle.files:
            if keys is not None and key not in keys:
                continue
            try:
                arrays[key] = handle[key]
            except ValueError as err:
                if "allow_pickle" in str(err) or "Object arrays" in str(err):
                    raise DataError(
                        f"key {key!r} holds an object array, which would need pickle to load; refused for safety "
                        "(store strings as fixed-width unicode arrays).",
                        str(file),
                        "object array",
                    ) from err
                raise DataError(f"cannot read key {key!r} ({err}).", str(file), "unreadable file") from err
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise DataError(
                    f"cannot read key {key!r} ({type(err).__name__}: {err}).", str(file), "unreadable file"
                ) from err
    return arrays


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise DataError(
                f"'images' must have 1 channel, got shape {tuple(images.shape)} ({images.shape[1]} channels).",
                name,
                "bad shape",
            )
        images = images[:, 0]
    if images.ndim != 3:
        raise DataError(
            f"'images' must be [N, S, S] or [N, 1, S, S], got shape {tuple(images.shape)}.", name, "bad shape"
        )
    if images.shape[0] == 0:
        raise DataError("'images' is empty.", name, "bad shape")
    if images.shape[1] != images.shape[2]:
        raise DataError(
            f"'images' must be square, got height {images.shape[1]} and width {images.shape[2]}.", name, "bad shape"
        )
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise DataError(
            f"'images' dtype {images.dtype} is not supported; expected uint8 (0..255) or float in [0, 1].",
            name,
            "bad dtype",
        )
    return images


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    if labels.shape != (n,):
        raise DataError(
            f"'labels' must have shape ({n},) to match 'images', got {tuple(labels.shape)}.", name, "bad shape"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"'labels' must be integers, got dtype {labels.dtype}.", name, "bad dtype")
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        i = int(negative[0])
        raise DataError(f"negative label {int(labels[i])} at index {i}.", f"{name}#{i}", "unknown class")
    return labels.astype(np.int64)


def _optional_strings(arrays: dict[str, np.ndarray], keys: tuple[str, ...], n: int, name: str) -> np.ndarray | None:
    for key in keys:
        if key in arrays:
            values = arrays[key]
            if values.shape != (n,):
                raise DataError(
                    f"{key!r} must have shape ({n},) to match 'images', got {tuple(values.shape)}.", name, "bad shape"
                )
            return values.astype(str)
    return None


def _check_slice(image: np.ndarray, source: str) -> None:
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            n_bad = int((~np.isfinite(image)).sum())
            raise DataError(f"image holds {n_bad} NaN / Inf values.", source, "non-finite")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"float image values must lie in [0, 1], got [{low:g}, {high:g}].", source, "out of range")
    if image.min() == image.max():
        raise DataError(f"image is constant (every pixel = {image.flat[0]}).", source, "constant image")


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """``[N, S, S]`` uint8 or float -> float32 ``[N, 1, S, S]`` in [0, 1]."""
    out = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return np.ascontiguousarray(out[:, None])


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(images)
    if size < images.shape[-1]:
        tensor = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(tensor.clamp_(0.0, 1.0).numpy())
