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
"""Ready-made :class:`monai.transforms.Compose` chains from reader records to the tensors of
``docs/architecture.md``: ``image`` float32 ``[1, S, S]`` in ``[0, 1]`` (S divisible by 8), ``label`` int.

Example::

    records = [{"image": "COVID-19/P001_slice026.png", "label": 2, "box": (114, 166, 394, 328), "source": "a:1"}]
    chain = get_preprocess_transforms(image_size=64)
    out = chain(records[0])  # out["image"]: torch.float32 [1, 64, 64]

Errors raised inside a chain (bad box, NaN, unreadable file, ...) surface as MONAI's
``RuntimeError("applying transform ...")``; the original exception, whose message names the record's
``source`` and key, is its ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.transforms import Compose, EnsureTyped, MapTransform, Resized, SelectItemsd

from monai_condflow.transforms.array import INTENSITY_MODES
from monai_condflow.transforms.dictionary import (
    AutoBodyCropd,
    CTIntensityd,
    Dequantized,
    LoadCTSliced,
    LungBoxCropd,
    ToGrayscaled,
    ValidateImaged,
)

__all__ = ["CROP_MODES", "get_preprocess_transforms", "get_flow_train_transforms", "get_array_transforms"]

CROP_MODES = ("box_or_auto", "box", "auto", "none")
"""Crop modes of :func:`get_preprocess_transforms`."""


def _check_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % 8:
        raise ValueError(
            f"image_size must be a positive int divisible by 8 (the flow squeezes 3 times), got {image_size!r}"
        )


def _tail(
    keys: Sequence[str],
    image_size: int | None,
    resize_mode: str,
    validate: bool,
    keep_keys: Sequence[str] | None,
    n_bits: int | None,
) -> list[MapTransform]:
    """Resize -> float32 tensor -> (dequantise) -> final validation -> key selection."""
    steps: list[MapTransform] = []
    if image_size is not None:
        steps.append(Resized(keys, spatial_size=(image_size, image_size), mode=resize_mode))
    steps.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    if validate:
        steps.append(
            ValidateImaged(
                keys, channels=1, divisible_by=8, value_range=(0.0, 1.0), allow_constant=True, float_only=True
            )
        )
    if n_bits is not None:
        steps.append(Dequantized(keys, n_bits=n_bits))
    if keep_keys is not None:
        steps.append(SelectItemsd([*keys, *keep_keys], allow_missing_keys=True))
    return steps


def get_preprocess_transforms(
    image_size: int = 64,
    intensity: str = "auto",
    window: Sequence[float] = (-600.0, 1500.0),
    crop: str = "box_or_auto",
    keys: Sequence[str] = ("image",),
    validate: bool = True,
    box_key: str = "box",
    box_margin: int = 0,
    resize_mode: str = "area",
    keep_keys: Sequence[str] | None = ("label",),
    auto_crop_kwargs: dict[str, Any] | None = None,
) -> Compose:
    """The pre-processing chain of the paper (crop to the lung box, resize to ``image_size``) plus
    COVIDNet-CT's HU window and automatic body crop.

    Steps, in order:
        1. :class:`LoadCTSliced`: a path is read (PNG / JPG with PIL, DICOM in HU with pydicom, NIfTI) in its
           stored dtype; an array ``[H, W]`` / ``[C, H, W]`` is taken as it is; the result is channel-first
           ``[C, H, W]`` in row-major order (y = row, x = column).
        2. :class:`ToGrayscaled`: RGB / RGBA / gray + alpha -> one channel (BT.601 luminance).
        3. :class:`ValidateImaged` (if ``validate``): refuse NaN / Inf, constant images, bad shapes.
        4. :class:`CTIntensityd`: to float32 ``[0, 1]`` following ``intensity`` (``"auto"`` decides per image:
           uint8 -> / 255; uint16 -> HU + 1024 then the HU window; other integers and floats outside ``[0, 1]``
           -> HU window; floats in ``[0, 1]`` kept).
        5. crop (``crop``): ``"box"`` -> :class:`LungBoxCropd` to ``d[box_key]`` (required, validated);
           ``"auto"`` -> :class:`AutoBodyCropd`; ``"box_or_auto"`` -> the box when the record has one, else the
           automatic crop; ``"none"`` -> no crop.
        6. :class:`~monai.transforms.Resized` to ``image_size`` x ``image_size`` (aspect ratio not kept, as in the
           paper); ``resize_mode`` ``"area"`` averages when shrinking.
        7. :class:`~monai.transforms.EnsureTyped`: plain ``torch.float32`` tensor (no MetaTensor).
        8. :class:`ValidateImaged` (if ``validate``): ``[1, S, S]``, float, values in ``[0, 1]``.
        9. :class:`~monai.transforms.SelectItemsd`: keep ``keys`` + ``keep_keys`` (None keeps every key), so that
           records with and without ``box`` collate together.

    Args:
        image_size: output side S (divisible by 8).
        intensity: one of ``"auto"``, ``"hu"``, ``"hu_offset"``, ``"uint8"``, ``"uint16"``, ``"unit"``.
        window: ``(level, width)`` of the HU window.
        crop: one of ``"box_or_auto"``, ``"box"``, ``"auto"``, ``"none"``.
        keys: image keys.
        validate: add the validation steps 3 and 8.
        box_key: record key of the lung box ``(xmin, ymin, xmax, ymax)``.
        box_margin: pixels added around the lung box.
        resize_mode: interpolation mode of ``Resized`` (``"area"``, ``"bilinear"``, ``"nearest"``).
        keep_keys: other record keys to keep in the output.
        auto_crop_kwargs: settings of :class:`AutoBodyCrop`.

    Returns:
        the chain; applied to a record it returns ``{"image": Tensor [1, S, S], "label": int, ...}``.

    Raises:
        ValueError: ``image_size`` not a positive multiple of 8, unknown ``intensity`` or ``crop``.
    """
    _check_size(image_size)
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity {intensity!r}; expected one of {INTENSITY_MODES}")
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_MODES}")
    keys = tuple(keys)
    auto_kwargs = dict(auto_crop_kwargs or {})
    steps: list[MapTransform] = [LoadCTSliced(keys), ToGrayscaled(keys)]
    if validate:
        steps.append(ValidateImaged(keys, channels=1))
    steps.append(CTIntensityd(keys, mode=intensity, window=window))
    if crop in ("box", "box_or_auto"):
        steps.append(LungBoxCropd(keys, box_key=box_key, margin=box_margin, allow_missing_box=crop == "box_or_auto"))
    if crop == "auto":
        steps.append(AutoBodyCropd(keys, **auto_kwargs))
    if crop == "box_or_auto":
        steps.append(AutoBodyCropd(keys, skip_if_key=box_key, **auto_kwargs))
    steps += _tail(keys, image_size, resize_mode, validate, keep_keys, None)
    return Compose(steps)


def get_flow_train_transforms(image_size: int = 64, n_bits: int = 8, **kwargs: Any) -> Compose:
    """:func:`get_preprocess_transforms` followed by :class:`Dequantized`
    (``x = (round(x * (2**n - 1)) + u) / 2**n``, u ~ U[0, 1)), the flow's training chain.

    Args:
        image_size: output side S (divisible by 8).
        n_bits: bits per pixel of the dequantisation.
        kwargs: other arguments of :func:`get_preprocess_transforms`.

    Returns:
        the chain (random: seed it with ``chain.set_random_state(seed)``).
    """
    preprocess = get_preprocess_transforms(image_size=image_size, **kwargs)
    steps = list(preprocess.transforms)
    keys = tuple(kwargs.get("keys", ("image",)))
    insert_at = len(steps) - 1 if isinstance(steps[-1], SelectItemsd) else len(steps)
    steps.insert(insert_at, Dequantized(keys, n_bits=n_bits))
    return Compose(steps)


def get_array_transforms(
    image_size: int | None = None,
    keys: Sequence[str] = ("image",),
    intensity: str = "auto",
    validate: bool = True,
    n_bits: int | None = None,
    resize_mode: str = "area",
    keep_keys: Sequence[str] | None = ("label",),
) -> Compose:
    """Chain for records whose image is already an array (``.npz`` data): ``[1, S, S]`` or ``[S, S]``, float in
    ``[0, 1]`` (or uint8, scaled by ``/ 255`` under ``intensity="auto"``).

    Steps: :class:`LoadCTSliced` (adds the channel axis of ``[S, S]``) -> :class:`ValidateImaged` (one channel,
    finite, sides divisible by 8 unless ``image_size`` resizes) -> :class:`CTIntensityd` -> optional
    :class:`~monai.transforms.Resized` -> ``EnsureTyped`` float32 -> final validation -> optional
    :class:`Dequantized` (``n_bits``) -> ``SelectItemsd``.

    Args:
        image_size: resize to this side (divisible by 8); None keeps the stored size.
        keys: image keys.
        intensity: see :func:`get_preprocess_transforms`.
        validate: add the validation steps.
        n_bits: add :class:`Dequantized` with this many bits (flow training); None for no dequantisation.
        resize_mode: interpolation mode of ``Resized``.
        keep_keys: other record keys to keep in the output (None keeps every key).

    Returns:
        the chain.
    """
    _check_size(image_size)
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity {intensity!r}; expected one of {INTENSITY_MODES}")
    keys = tuple(keys)
    steps: list[MapTransform] = [LoadCTSliced(keys)]
    if validate:
        steps.append(ValidateImaged(keys, channels=1, divisible_by=8 if image_size is None else 1, allow_constant=True))
    steps.append(CTIntensityd(keys, mode=intensity))
    steps += _tail(keys, image_size, resize_mode, validate, keep_keys, n_bits)
    return Compose(steps)
