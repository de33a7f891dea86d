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
"""MONAI's :class:`~monai.transforms.LoadImage` without the two messages it prints on every stage of a CPU run.

- Building a ``LoadImage`` builds every reader MONAI registers, the GPU DICOM decoder (nvImageCodec) included, even
  when the readers it is given never use it. Without the ``nvimgcodec`` extra that prints a log warning and a
  ``UserWarning`` ("nvImageCodec is not available ...", "... Falling back to default pydicom decoders") in every
  process. The package reads DICOM with its own :class:`~monai.data.PydicomReader`, so nothing falls back.
- MONAI's ``PILReader`` hands ``LoadImage`` a read-only array, and torch warns that writing to the tensor made from
  it is undefined. :func:`load_writable` copies the image, so it is safe to write to.

Only these messages are silenced, and only around these calls; every other warning and log record goes through.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from monai.transforms import LoadImage

from monai_condflow.utils.logs import raised_log_level

__all__ = ["NVIMGCODEC_LOGGER", "make_load_image", "load_writable"]

#: the logger of MONAI's nvImageCodec DICOM plugin
NVIMGCODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"


@contextmanager
def _without_nvimgcodec_notice() -> Iterator[None]:
    with raised_log_level(NVIMGCODEC_LOGGER, logging.ERROR), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader: nvImageCodec decoder plugin")
        yield


def make_load_image(*args: Any, **kwargs: Any) -> LoadImage:
    """``LoadImage(*args, **kwargs)``, built without the nvImageCodec notice (see the module docstring)."""
    with _without_nvimgcodec_notice():
        return LoadImage(*args, **kwargs)


def load_writable(loader: LoadImage, path: str | os.PathLike) -> Any:
    """``loader(path)`` as a copy that owns its memory (torch's read-only-array warning is not shown: see the module
    docstring). Returns what the loader returns (a MetaTensor with ``image_only=True``), metadata kept."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable")
        img = loader(path)
    return img.clone() if hasattr(img, "clone") else img.copy()
