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
"""Tests for monai_condflow.data.npz."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from monai_condflow.data.errors import DataError, ReadReport
from monai_condflow.data.npz import class_names_from_npz, load_npz_dataset


def _images(n: int = 4, size: int = 4) -> np.ndarray:
    return (np.arange(n * size * size).reshape(n, size, size) * 7 % 256).astype(np.uint8)


def _save(path: Path, **arrays) -> Path:
    base = {
        "images": _images(),
        "labels": np.array([0, 1, 1, 0]),
        "class_names": np.array(["A", "B"]),
        "patient_ids": np.array(["p1", "p1", "p2", "p3"]),
        "official_split": np.array(["train", "train", "test", "val"]),
    }
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_records_from_uint8(tmp_path: Path):
    path = _save(tmp_path / "d.npz")
    records = load_npz_dataset(path)
    assert len(records) == 4
    first = records[0]
    assert set(first) == {"image", "label", "patient_id", "source"}
    assert first["image"].dtype == np.float32 and first["image"].shape == (1, 4, 4)
    np.testing.assert_allclose(records[2]["image"][0], _images()[2] / 255.0, rtol=0, atol=1e-7)
    assert [r["label"] for r in records] == [0, 1, 1, 0]
    assert [r["patient_id"] for r in records] == ["p1", "p1", "p2", "p3"]
    assert [r["source"] for r in records] == [f"{path}#{i}" for i in range(4)]
    assert class_names_from_npz(path) == ["A", "B"]


def test_split_channel_dim_float_and_resize(tmp_path: Path):
    images = _images()[:, None].astype(np.float64) / 255.0
    path = _save(tmp_path / "f.npz", images=images, patient_ids=None)
    train = load_npz_dataset(path, split="train")
    assert [r["source"] for r in train] == [f"{path}#0", f"{path}#1"] and "patient_id" not in train[0]
    small = load_npz_dataset(path, split="test", image_size=2)
    expected = images[2, 0].reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(small[0]["image"][0], expected, atol=1e-6)
    big = load_npz_dataset(path, image_size=8)
    assert big[0]["image"].shape == (1, 8, 8) and 0.0 <= big[0]["image"].min() and big[0]["image"].max() <= 1.0
    with pytest.raises(DataError, match=r"f\.npz: unknown split 'training'; the file has \['test', 'train', 'val'\]"):
        load_npz_dataset(path, split="training")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_npz_dataset(path, image_size=0)


def test_object_array_refused(tmp_path: Path):
    path = _save(tmp_path / "obj.npz", patient_ids=np.array(["p1", 2, None, "p3"], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz: key 'patient_ids' holds an object array") as info:
        load_npz_dataset(path)
    assert info.value.reason == "object array"
    path = _save(tmp_path / "obj_names.npz", class_names=np.array(["A", None], dtype=object))
    with pytest.raises(DataError, match="key 'class_names' holds an object array"):
        class_names_from_npz(path)


def _bad_float_images() -> np.ndarray:
    images = np.tile(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4), (4, 1, 1))
    images[1, 2, 3] = np.nan
    images[2, 0, 0] = 1.5
    images[3] = 0.25
    return images


@pytest.mark.parametrize(
    "index, message",
    [
        (1, "image holds 1 NaN / Inf values"),
        (2, r"float image values must lie in \[0, 1\], got \[0.0666667, 1.5\]"),
        (3, r"image is constant \(every pixel = 0.25\)"),
    ],
)
def test_bad_slices_raise_with_index(tmp_path: Path, index: int, message: str):
    images = _bad_float_images()
    keep = [0, index]
    path = _save(
        tmp_path / "bad.npz",
        images=images[keep],
        labels=np.array([0, 1]),
        patient_ids=None,
        official_split=None,
    )
    with pytest.raises(DataError, match=rf"bad\.npz#1: {message}"):
        load_npz_dataset(path)


def test_bad_slices_skipped(tmp_path: Path, caplog):
    images = _bad_float_images()
    images[1, 0, 0] = np.inf
    path = _save(tmp_path / "skip.npz", images=images)
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="monai_condflow.data.npz"):
        records = load_npz_dataset(path, on_error="skip", report=report)
    assert [r["source"] for r in records] == [f"{path}#0"]
    assert report.counts == {"non-finite": 1, "out of range": 1, "constant image": 1} and report.n_read == 1
    assert "skipped 3 bad entries" in caplog.text


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 3, 4, 4), np.uint8)}, r"must have 1 channel, got shape \(4, 3, 4, 4\) \(3 channels\)"),
        ({"images": _images()[:, :, :3]}, "must be square, got height 4 and width 3"),
        ({"images": _images()[0]}, r"must be \[N, S, S\] or \[N, 1, S, S\], got shape \(4, 4\)"),
        ({"images": _images().astype(np.uint16)}, "dtype uint16 is not supported"),
        ({"labels": np.array([0, 1, 1])}, r"'labels' must have shape \(4,\) to match 'images', got \(3,\)"),
        ({"labels": np.array([0.0, 1.0, 1.0, 0.0])}, "'labels' must be integers, got dtype float64"),
        ({"labels": np.array([0, 1, 2, 0])}, "label 2 at index 2 is not below the 2 class_names"),
        ({"labels": np.array([0, -1, 1, 0])}, "negative label -1 at index 1"),
        ({"labels": None}, r"missing key 'labels' \(keys present:"),
        ({"patient_ids": np.array(["a", "b"])}, r"'patient_ids' must have shape \(4,\)"),
    ],
)
def test_array_errors(tmp_path: Path, arrays: dict, message: str):
    path = _save(tmp_path / "arr.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz_dataset(path, on_error="skip")  # whole-array problems raise even in skip mode
    assert "arr.npz" in str(info.value)


def test_unreadable_and_missing(tmp_path: Path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.npz: not a readable \.npz file"):
        load_npz_dataset(bad)
    with pytest.raises(FileNotFoundError, match="none.npz"):
        load_npz_dataset(tmp_path / "none.npz")
    no_split = _save(tmp_path / "ns.npz", official_split=None, class_names=None)
    with pytest.raises(DataError, match=r"ns\.npz: split='train' asked for but the file has none of the keys"):
        load_npz_dataset(no_split, split="train")
    with pytest.raises(DataError, match=r"ns\.npz: missing key 'class_names'"):
        class_names_from_npz(no_split)


def test_ucsd_official_split(shared_data: Path):
    path = shared_data / "ucsd_covid_ct_64.npz"
    splits = {name: load_npz_dataset(path, split=name) for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 425, "val": 118, "test": 203}
    patients = {k: {r["patient_id"] for r in v} for k, v in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    every = [r for v in splits.values() for r in v]
    assert sum(r["label"] == 0 for r in every) == 397 and sum(r["label"] == 1 for r in every) == 349
    assert class_names_from_npz(path) == ["NonCOVID", "COVID"]
    raw = np.load(path)["images"]
    record = splits["val"][5]
    index = int(record["source"].rsplit("#", 1)[1])
    np.testing.assert_allclose(record["image"][0], raw[index] / 255.0, atol=1e-7)
    for r in every:
        assert r["image"].shape == (1, 64, 64) and r["image"].min() >= 0 and r["image"].max() <= 1


def test_covid_ct_md_three_classes(shared_data: Path):
    records = load_npz_dataset(shared_data / "covid_ct_md_64.npz", image_size=32)
    assert len(records) == 718 and records[0]["image"].shape == (1, 32, 32)
    assert [sum(r["label"] == c for r in records) for c in range(3)] == [233, 256, 229]
    assert len({r["patient_id"] for r in records}) == 6
    assert class_names_from_npz(shared_data / "covid_ct_md_64.npz") == ["Normal", "Pneumonia", "COVID-19"]
