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
"""Reader + pre-processing chain on the real raw COVID-CT-MD PNGs (uint16, value = HU + 1024)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from monai_condflow.data.readers import read_covidx_annotations
from monai_condflow.transforms.chains import get_preprocess_transforms

WINDOW = (-600.0, 1500.0)  # level, width -> [-1350, 150] HU


def _manual(path: str, box: tuple[int, int, int, int], size: int = 64) -> torch.Tensor:
    """HU window of the PNG, crop to ``box``, area resize: computed here without the package."""
    raw = np.asarray(Image.open(path)).astype(np.float32)
    low = WINDOW[0] - WINDOW[1] / 2
    unit = np.clip((raw - 1024.0 - low) / WINDOW[1], 0.0, 1.0)
    xmin, ymin, xmax, ymax = box
    crop = torch.from_numpy(np.ascontiguousarray(unit[ymin:ymax, xmin:xmax]))[None, None]
    return F.interpolate(crop, size=(size, size), mode="area")[0]


@pytest.fixture
def annotations(shared_data: Path) -> Path:
    return shared_data / "raw_samples" / "covid_ct_md" / "annotations_covidx_format.txt"


def test_raw_pngs_to_box_crops(annotations: Path):
    records = read_covidx_annotations(annotations, class_map="binary")
    chain = get_preprocess_transforms(image_size=64, window=WINDOW)
    for record in records[::3]:
        out = chain(dict(record))
        image = out["image"]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (1, 64, 64)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert out["label"] == record["label"]
        expected = _manual(record["image"], record["box"])
        torch.testing.assert_close(image, expected, atol=1e-4, rtol=0)
        # the comparison has power: a box shifted by 24 px, or no crop at all, gives clearly different pixels
        xmin, ymin, xmax, ymax = record["box"]
        shifted = _manual(record["image"], (xmin + 24, ymin, min(xmax + 24, 512), ymax))
        assert float((image - shifted).abs().mean()) > 0.02
        whole = _manual(record["image"], (0, 0, 512, 512))
        assert float((image - whole).abs().mean()) > 0.1


def test_out_of_image_box_names_the_annotation_line(annotations: Path):
    record = read_covidx_annotations(annotations)[3]
    record["box"] = (10, 10, 600, 400)
    with pytest.raises(Exception) as info:  # MONAI's Compose wraps the transform's ValueError in a RuntimeError
        get_preprocess_transforms(image_size=64)(record)
    messages = " ".join(str(e) for e in (info.value, info.value.__cause__) if e is not None)
    assert f"{annotations}:4" in messages and "600" in messages
