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
"""Tests for the quiet LoadImage helpers: only MONAI's two CPU notices are dropped, and the image is a copy."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image

from monai_condflow.transforms.array import LoadCTSlice
from monai_condflow.utils.loading import NVIMGCODEC_LOGGER, _without_nvimgcodec_notice, load_writable, make_load_image


def _notices(build, caplog):
    """The nvImageCodec log records and UserWarnings that ``build()`` emits."""
    caplog.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    logged = [r.getMessage() for r in caplog.records if "nvImageCodec" in r.getMessage()]
    warned = [str(w.message) for w in caught if "nvImageCodec" in str(w.message)]
    return logged, warned


def test_the_loader_is_built_without_the_nvimgcodec_notice(caplog):
    logged, warned = _notices(lambda: LoadImage(reader="PILReader", image_only=True), caplog)
    if not (logged or warned):
        pytest.skip("this MONAI install prints no nvImageCodec notice (nvImageCodec present?): nothing to hide")
    assert _notices(lambda: make_load_image(reader="PILReader", image_only=True), caplog) == ([], [])
    assert _notices(LoadCTSlice, caplog) == ([], [])


def test_only_the_notice_is_dropped_and_the_logger_level_comes_back(caplog):
    logger = logging.getLogger(NVIMGCODEC_LOGGER)
    logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _without_nvimgcodec_notice():
                warnings.warn("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", stacklevel=1)
                warnings.warn("another warning", stacklevel=1)
                logger.warning("a plugin warning")
                logger.error("a plugin error")
        assert [str(w.message) for w in caught] == ["another warning"]
        messages = [r.getMessage() for r in caplog.records if r.name == NVIMGCODEC_LOGGER]
        assert messages == ["a plugin error"]
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(logging.NOTSET)


def test_load_writable_gives_a_copy_that_owns_its_memory(tmp_path):
    pixels = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    path = tmp_path / "slice.png"
    Image.fromarray(pixels).save(path)
    loader = make_load_image(reader="PILReader", image_only=True, dtype=None, reverse_indexing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_writable(loader, path)
        again = load_writable(loader, path)
    assert not [w for w in caught if "not writable" in str(w.message)]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8
    np.testing.assert_array_equal(img.numpy(), pixels)
    assert str(path) in str(img.meta["filename_or_obj"])
    img += 1  # a write to one load must not show in another
    np.testing.assert_array_equal(again.numpy(), pixels)
    np.testing.assert_array_equal(img.numpy(), pixels + 1)
