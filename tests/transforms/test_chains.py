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
"""Tests of the ready-made chains, on synthetic records and on the real raw samples when present."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from monai_condflow.transforms.chains import get_array_transforms, get_flow_train_transforms, get_preprocess_transforms


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0)


def _area_resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0].numpy()


def _phantom_slice(h: int = 40, w: int = 56) -> np.ndarray:
    """uint16 HU + 1024: air (0) everywhere, -600 HU (424) inside rows 10..29, columns 8..39."""
    img = np.zeros((h, w), np.uint16)
    img[10:30, 8:40] = 424
    img[12, 10] = 1174  # one 150 HU pixel, so the inside is not constant
    return img


def _cause(chain, record) -> BaseException:
    """The error a chain raised: MONAI's Compose wraps it in RuntimeError("applying transform ...")."""
    with pytest.raises(RuntimeError, match="applying transform") as err:
        chain(record)
    return err.value.__cause__


@pytest.mark.parametrize("size", [0, 63, 12, -8, "64", True, 64.0])
def test_image_size_must_be_multiple_of_8(size):
    with pytest.raises(ValueError, match="image_size must be a positive int divisible by 8"):
        get_preprocess_transforms(image_size=size)


def test_unknown_modes():
    with pytest.raises(ValueError, match="unknown intensity 'png'"):
        get_preprocess_transforms(intensity="png")
    with pytest.raises(ValueError, match="unknown crop 'lungs'"):
        get_preprocess_transforms(crop="lungs")
    with pytest.raises(ValueError, match="image_size must be"):
        get_array_transforms(image_size=20)


def test_box_crop_on_synthetic_hu_offset_slice():
    img = _phantom_slice()
    rec = {"image": img, "label": 2, "box": (8, 10, 40, 30), "source": "ann:1", "patient_id": "p"}
    out = get_preprocess_transforms(image_size=16, intensity="auto")(rec)
    assert set(out) == {"image", "label"} and out["label"] == 2
    x = out["image"]
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, 16, 16)
    expected = _area_resize(_window(img[10:30, 8:40].astype(np.float64) - 1024), 16)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert float(x.min()) == pytest.approx(0.5, abs=1e-6)
    # same record through intensity="hu_offset" and as a [1, H, W] array
    out2 = get_preprocess_transforms(image_size=16, intensity="hu_offset")(dict(rec, image=img[None]))
    torch.testing.assert_close(out2["image"], x)


def test_auto_crop_when_no_box_and_crop_none():
    img = _phantom_slice()
    rec = {"image": img, "label": 0, "source": "s"}
    chain = get_preprocess_transforms(image_size=8, auto_crop_kwargs={"margin": 0, "sigma": 0, "opening_radius": 1})
    out = chain(rec)["image"]
    expected = _area_resize(_window(img[10:30, 8:40].astype(np.float64) - 1024), 8)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    whole = get_preprocess_transforms(image_size=8, crop="none")(rec)["image"]
    np.testing.assert_allclose(whole.numpy(), _area_resize(_window(img.astype(np.float64) - 1024), 8), atol=1e-6)
    cause = _cause(get_preprocess_transforms(image_size=8, crop="box"), rec)
    assert isinstance(cause, KeyError) and "record 's' has no lung box" in str(cause)


def test_chain_errors_name_record():
    bad_box = {"image": _phantom_slice(), "label": 0, "box": (8, 10, 400, 30), "source": "train.txt:44"}
    cause = _cause(get_preprocess_transforms(), bad_box)
    assert isinstance(cause, ValueError)
    assert str(cause).startswith("train.txt:44 (key 'image'): lung box (8, 10, 400, 30) lies outside the image")
    assert "56 x 40" in str(cause)
    nan = {"image": np.full((16, 16), np.nan, np.float32), "label": 0, "source": "nan.npz:3"}
    assert str(_cause(get_preprocess_transforms(), nan)).startswith("nan.npz:3 (key 'image'): image has 256 NaN")
    flat = {"image": np.full((16, 16), 7, np.uint16), "label": 0, "source": "flat.png"}
    assert "flat.png (key 'image'): constant image" in str(_cause(get_preprocess_transforms(), flat))
    missing = {"image": "/nonexistent/x.png", "label": 0, "source": "ann.txt:2"}
    cause = _cause(get_preprocess_transforms(), missing)
    assert isinstance(cause, FileNotFoundError) and "x.png (record ann.txt:2" in str(cause)


def test_mixed_records_collate():
    recs = [
        {"image": _phantom_slice(), "label": 1, "box": (8, 10, 40, 30), "source": "a"},
        {"image": _phantom_slice(), "label": 0, "source": "b"},
    ]
    chain = get_preprocess_transforms(image_size=8)
    batch = next(iter(DataLoader([chain(r) for r in recs], batch_size=2)))
    assert batch["image"].shape == (2, 1, 8, 8) and batch["label"].tolist() == [1, 0]


def test_flow_train_chain_dequantizes_deterministically():
    rec = {"image": _phantom_slice(), "label": 1, "box": (8, 10, 40, 30), "source": "a"}
    base = get_preprocess_transforms(image_size=8)(rec)["image"]
    chain = get_flow_train_transforms(image_size=8, n_bits=8)
    chain.set_random_state(seed=0)
    a = chain(rec)["image"]
    chain.set_random_state(seed=0)
    b = chain(rec)["image"]
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert torch.equal(torch.floor(a * 256), torch.round(base * 255))  # the level survives, noise stays in the bin
    assert not torch.equal(a, chain(rec)["image"])


def test_array_chain():
    rng = np.random.default_rng(0)
    unit = rng.random((1, 16, 16)).astype(np.float32)
    out = get_array_transforms()({"image": unit, "label": 1, "patient_id": "p"})
    assert set(out) == {"image", "label"}
    np.testing.assert_array_equal(out["image"].numpy(), unit)
    u8 = (unit[0] * 255).astype(np.uint8)
    out = get_array_transforms(image_size=8)({"image": u8, "label": 0})
    np.testing.assert_allclose(out["image"].numpy(), _area_resize(u8 / 255.0, 8), atol=1e-6)
    deq = get_array_transforms(n_bits=8)
    deq.set_random_state(seed=1)
    x = deq({"image": unit, "label": 0})["image"]
    assert torch.equal(torch.floor(x * 256), torch.round(torch.from_numpy(unit) * 255))
    cause = _cause(get_array_transforms(), {"image": np.zeros((1, 12, 12), np.float32), "label": 0, "source": "npz:4"})
    assert "npz:4 (key 'image'): spatial shape (12, 12) has side(s) [12, 12] not divisible by 8" in str(cause)


# --- real raw samples (skip when ../shared/data is absent) ------------------------------------------------------


def _covid_ct_md_records(root, n=None):
    ann = root / "raw_samples" / "covid_ct_md" / "annotations_covidx_format.txt"
    records = []
    for i, line in enumerate(ann.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 6:
            continue
        records.append(
            {
                "image": str(ann.parent / parts[0]),
                "label": int(parts[1]),
                "box": tuple(int(v) for v in parts[2:]),
                "source": f"{ann.name}:{i}",
            }
        )
    return records[:n]


@pytest.mark.shared_data
def test_real_covid_ct_md_pngs_with_boxes(shared_data):
    records = _covid_ct_md_records(shared_data)
    assert len(records) == 24 and {r["label"] for r in records} == {0, 1, 2}
    chain = get_preprocess_transforms(image_size=64)
    for rec in records[::4]:
        x = chain(rec)["image"]
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) < float(x.max()) <= 1.0
        # hand computation: PIL array (row-major), crop rows ymin:ymax and columns xmin:xmax, window, area resize
        raw = np.asarray(Image.open(rec["image"])).astype(np.float64)
        xmin, ymin, xmax, ymax = rec["box"]
        expected = _area_resize(_window(raw[ymin:ymax, xmin:xmax] - 1024), 64)
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)


@pytest.mark.shared_data
def test_real_ucsd_rgb_pngs(shared_data):
    files = sorted((shared_data / "raw_samples" / "ucsd_covid_ct").glob("*/*.png"))[::5]
    assert files
    chain = get_preprocess_transforms(image_size=64)
    for f in files:
        x = chain({"image": str(f), "label": 0, "source": f.name})["image"]
        assert x.shape == (1, 64, 64) and 0.0 <= float(x.min()) < float(x.max()) <= 1.0


@pytest.mark.shared_data
def test_real_dicom_hu_window(shared_data):
    f = sorted((shared_data / "raw_samples" / "covid_ct_md" / "dicom").glob("*.dcm"))[0]
    rec = {"image": str(f), "label": 2, "source": f.name}
    x = get_preprocess_transforms(image_size=64, intensity="hu")(rec)["image"]
    assert x.shape == (1, 64, 64) and 0.0 <= float(x.min()) < float(x.max()) <= 1.0
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    whole = get_preprocess_transforms(image_size=64, crop="none")(rec)["image"]  # auto: float outside [0, 1] -> HU
    np.testing.assert_allclose(whole.numpy(), _area_resize(_window(hu), 64), atol=1e-5)
