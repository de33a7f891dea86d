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
"""Tests of the dictionary twins in monai_condflow.transforms.dictionary."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from monai_condflow.transforms.dictionary import (
    AutoBodyCropd,
    CTIntensityd,
    CTWindowd,
    Dequantized,
    HUOffsetd,
    LoadCTSliced,
    LungBoxCropd,
    ToGrayscaled,
    ValidateImaged,
)


def _record(**extra):
    img = np.arange(6 * 8, dtype=np.float32).reshape(1, 6, 8)
    return {"image": img, "label": 1, "source": "ann.txt:5", **extra}


def test_missing_keys_allowed_and_refused():
    rec = {"image": np.array([[[-600.0, 150.0]]], np.float32), "label": 0}
    twins = [
        CTWindowd(["image", "mask"], allow_missing_keys=True),
        HUOffsetd(["image", "mask"], allow_missing_keys=True),
        CTIntensityd(["image", "mask"], allow_missing_keys=True),
        ToGrayscaled(["image", "mask"], allow_missing_keys=True),
        LoadCTSliced(["image", "mask"], allow_missing_keys=True),
        ValidateImaged(["image", "mask"], allow_missing_keys=True),
        Dequantized(["image", "mask"], allow_missing_keys=True),
    ]
    for t in twins:
        out = t(rec)
        assert "mask" not in out and out["label"] == 0
    with pytest.raises(KeyError):
        CTWindowd(["image", "mask"])(rec)


def test_window_offset_intensity_values_and_copy():
    rec = {"image": np.array([[[424, 1174]]], np.uint16), "other": np.array([[[-600.0]]])}
    out = CTIntensityd(["image", "other"])(rec)
    np.testing.assert_allclose(out["image"], [[[0.5, 1.0]]], atol=1e-6)
    np.testing.assert_allclose(out["other"], [[[0.5]]], atol=1e-7)
    assert rec["image"].dtype == np.uint16  # input record untouched
    np.testing.assert_array_equal(HUOffsetd("image")(rec)["image"], [[[-600.0, 150.0]]])
    np.testing.assert_allclose(CTWindowd("image", level=0, width=100)({"image": np.array([25.0])})["image"], [0.75])
    with pytest.raises(ValueError, match=r"^ann\.txt:5 \(key 'image'\): intensity mode 'unit'"):
        CTIntensityd("image", mode="unit")(_record())


def test_lung_box_cropd_and_errors():
    rec = _record(box=(2, 1, 5, 4))
    rec["mask"] = rec["image"] * 2
    out = LungBoxCropd(["image", "mask"])(rec)
    np.testing.assert_array_equal(np.asarray(out["image"]), rec["image"][:, 1:4, 2:5])
    np.testing.assert_array_equal(np.asarray(out["mask"]), rec["mask"][:, 1:4, 2:5])
    assert rec["image"].shape == (1, 6, 8)
    with pytest.raises(ValueError, match=r"ann\.txt:5 \(key 'image'\): inverted lung box \(5, 1, 2, 4\).*8 x 6"):
        LungBoxCropd("image")(_record(box=(5, 1, 2, 4)))
    with pytest.raises(KeyError, match="record 'ann.txt:5' has no lung box under key 'box'"):
        LungBoxCropd("image")(_record())
    no_box = _record()
    assert LungBoxCropd("image", allow_missing_box=True)(no_box)["image"] is no_box["image"]


def test_auto_body_cropd_shares_box_and_skips_boxed_records(caplog):
    yy, xx = np.mgrid[:32, :32]
    img = ((yy - 12) ** 2 + (xx - 18) ** 2 <= 49).astype(np.float32)[None]
    rec = {"image": img, "mask": img + 5, "source": "s"}
    out = AutoBodyCropd(["image", "mask"], margin=0, sigma=0)(rec)
    np.testing.assert_array_equal(np.asarray(out["image"]), img[:, 5:20, 11:26])
    np.testing.assert_array_equal(np.asarray(out["mask"]), img[:, 5:20, 11:26] + 5)
    boxed = dict(rec, box=(0, 0, 4, 4))
    assert AutoBodyCropd("image", skip_if_key="box")(boxed)["image"] is img
    with caplog.at_level(logging.WARNING):
        out = AutoBodyCropd("image")({"image": np.zeros((1, 8, 8)), "source": "flat.png"})
    assert out["image"].shape == (1, 8, 8)
    assert "flat.png (key 'image')" in caplog.text


def test_dequantized_seeded_and_per_key():
    rec = {"image": torch.full((1, 4, 4), 0.5), "aux": torch.full((1, 4, 4), 0.5)}
    a = Dequantized(["image", "aux"]).set_random_state(seed=1)(rec)
    b = Dequantized(["image", "aux"]).set_random_state(seed=1)(rec)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["aux"], b["aux"])
    assert not torch.equal(a["image"], a["aux"])  # own draw per key
    for v in a.values():
        assert ((v >= 128 / 256) & (v < 129 / 256)).all()  # level round(0.5 * 255) = 128
    t = Dequantized("image")
    t.set_random_state(seed=2)
    first = t(rec)["image"]
    assert not torch.equal(first, t(rec)["image"])  # fresh noise per call


def test_validate_imaged_names_record_and_key():
    with pytest.raises(ValueError, match=r"^ann\.txt:5 \(key 'image'\): image has 1 NaN"):
        rec = _record()
        rec["image"][0, 0, 0] = np.nan
        ValidateImaged("image")(rec)
    with pytest.raises(ValueError, match=r"^key 'img': expected 1 channel\(s\), got 2"):
        ValidateImaged("img")({"img": np.random.rand(2, 4, 4)})
    with pytest.raises(ValueError, match=r"not divisible by 8"):
        ValidateImaged("image", divisible_by=8)(_record())


def test_load_and_grayscale_d(tmp_path):
    rec = {"image": np.zeros((3, 2, 2), np.uint8), "source": "x"}
    rec["image"][0] = 255
    out = ToGrayscaled("image")(LoadCTSliced("image")(rec))
    np.testing.assert_array_equal(out["image"], np.full((1, 2, 2), 76, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"nope\.png \(record ann\.txt:9 \(key 'image'\)\)"):
        LoadCTSliced("image")({"image": str(tmp_path / "nope.png"), "source": "ann.txt:9"})
