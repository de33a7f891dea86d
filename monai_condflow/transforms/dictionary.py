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
"""Dictionary twins of :mod:`monai_condflow.transforms.array`, for MONAI-style records
(``image``, ``label``, optional ``box``, ``source``; see ``docs/architecture.md``).

Each ``Xd`` holds an ``X``, takes ``keys, ..., allow_missing_keys=False``, copies the record and loops
``self.key_iterator(d)``. Error messages name the record's ``source`` and the key.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform

from monai_condflow.transforms.array import (
    DEFAULT_MAX_PIXELS,
    AutoBodyCrop,
    CTIntensity,
    CTWindow,
    Dequantize,
    HUOffset,
    LoadCTSlice,
    LungBoxCrop,
    ToGrayscale,
    ValidateImage,
)

__all__ = [
    "LoadCTSliced",
    "ToGrayscaled",
    "HUOffsetd",
    "CTWindowd",
    "CTIntensityd",
    "LungBoxCropd",
    "AutoBodyCropd",
    "Dequantized",
    "ValidateImaged",
]

logger = logging.getLogger(__name__)


def _describe(d: Mapping[Hashable, Any], key: Hashable, source_key: str | None) -> str:
    """``"<source> (key '<key>')"`` for error messages, or ``"key '<key>'"`` when the record has no source."""
    source = d.get(source_key) if source_key is not None else None
    return f"{source} (key '{key}')" if source is not None else f"key '{key}'"


class LoadCTSliced(MapTransform):
    """Dictionary twin of :class:`LoadCTSlice`: file paths are loaded, arrays made channel-first.

    Args:
        keys: keys of the images.
        source_key: key of the record's source (named in errors).
        check_exists: see :class:`LoadCTSlice`.
        max_pixels: see :class:`LoadCTSlice` (images above it are refused by name before decoding).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str | None = "source",
        check_exists: bool = True,
        allow_missing_keys: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.loader = LoadCTSlice(check_exists=check_exists, max_pixels=max_pixels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], source=_describe(d, key, self.source_key))
        return d


class ToGrayscaled(MapTransform):
    """Dictionary twin of :class:`ToGrayscale`.

    Args:
        keys: keys of the images.
        source_key: key of the record's source (named in errors).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, source_key: str | None = "source", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.converter = ToGrayscale()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key], source=_describe(d, key, self.source_key))
        return d


class HUOffsetd(MapTransform):
    """Dictionary twin of :class:`HUOffset`.

    Args:
        keys: keys of the images.
        offset: the stored offset (1024 for HU + 1024 PNGs).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, offset: float = 1024.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.shifter = HUOffset(offset)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.shifter(d[key])
        return d


class CTWindowd(MapTransform):
    """Dictionary twin of :class:`CTWindow`.

    Args:
        keys: keys of the images (HU values).
        level: window centre in HU.
        width: window width in HU.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, level: float = -600.0, width: float = 1500.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = CTWindow(level, width)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class CTIntensityd(MapTransform):
    """Dictionary twin of :class:`CTIntensity`.

    Args:
        keys: keys of the images.
        mode: one of ``"auto"``, ``"hu"``, ``"hu_offset"``, ``"uint8"``, ``"uint16"``, ``"unit"``.
        window: ``(level, width)`` of the HU window.
        source_key: key of the record's source (named in errors).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "auto",
        window: Sequence[float] = (-600.0, 1500.0),
        source_key: str | None = "source",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.intensity = CTIntensity(mode, window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.intensity(d[key], source=_describe(d, key, self.source_key))
        return d


class LungBoxCropd(MapTransform):
    """Dictionary twin of :class:`LungBoxCrop`: crops every key to the record's lung box ``d[box_key]``.

    Args:
        keys: keys of the images to crop.
        box_key: key of the ``(xmin, ymin, xmax, ymax)`` box.
        margin: pixels added around the box.
        allow_missing_box: records without ``box_key`` pass unchanged (otherwise ``KeyError`` naming the source).
        source_key: key of the record's source (named in errors).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str = "box",
        margin: int = 0,
        allow_missing_box: bool = False,
        source_key: str | None = "source",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.allow_missing_box = allow_missing_box
        self.source_key = source_key
        self.cropper = LungBoxCrop(margin)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.box_key) is None:
            if self.allow_missing_box:
                return d
            source = d.get(self.source_key) if self.source_key is not None else None
            raise KeyError(f"record {source!r} has no lung box under key '{self.box_key}'")
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], d[self.box_key], source=_describe(d, key, self.source_key))
        return d


class AutoBodyCropd(MapTransform):
    """Dictionary twin of :class:`AutoBodyCrop`. The box is computed from the first key and applied to every key.

    Args:
        keys: keys of the images to crop.
        skip_if_key: records that hold this key (e.g. ``"box"``, already cropped by :class:`LungBoxCropd`) pass
            unchanged; None crops every record.
        source_key: key of the record's source (named in the fallback warning).
        allow_missing_keys: don't raise if a key is missing.
        kwargs: settings of :class:`AutoBodyCrop` (``threshold``, ``opening_radius``, ``margin``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        skip_if_key: str | None = None,
        source_key: str | None = "source",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.skip_if_key = skip_if_key
        self.source_key = source_key
        self.cropper = AutoBodyCrop(**kwargs)
        self.box_cropper = LungBoxCrop()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.skip_if_key is not None and d.get(self.skip_if_key) is not None:
            return d
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        box = self.cropper.compute_box(d[keys[0]])
        if box is None:
            logger.warning(
                "%s: automatic body crop found no body; keeping the whole image",
                _describe(d, keys[0], self.source_key),
            )
            return d
        for key in keys:
            d[key] = self.box_cropper(d[key], box, source=_describe(d, key, self.source_key))
        return d


class Dequantized(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`Dequantize`; each key gets its own noise draw.

    Args:
        keys: keys of the images (values in ``[0, 1]``).
        n_bits: bits per pixel of the data.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, n_bits: int = 8, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.dequantize = Dequantize(n_bits)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Dequantized:
        super().set_random_state(seed, state)
        self.dequantize.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        for key in self.key_iterator(d):
            d[key] = self.dequantize(d[key], randomize=True)
        return d


class ValidateImaged(MapTransform):
    """Dictionary twin of :class:`ValidateImage`; errors name the record's source and the key.

    Args:
        keys: keys of the images.
        source_key: key of the record's source.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: settings of :class:`ValidateImage` (``channels``, ``divisible_by``, ``value_range``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str | None = "source",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.validator = ValidateImage(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.validator(d[key], source=_describe(d, key, self.source_key))
        return d
