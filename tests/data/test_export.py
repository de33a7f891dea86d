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
"""Tests for writing records as a COVIDx-CT-format folder."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_condflow.data import read_class_folders, read_dicom_folder, read_nifti_slices
from monai_condflow.data.datalists import check_splits, load_covidx_split
from monai_condflow.data.errors import DataError
from monai_condflow.data.export import main, write_covidx_folder
from monai_condflow.transforms import get_preprocess_transforms
from monai_condflow.transforms.array import HUOffset, LoadCTSlice

SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


def test_write_and_read_back(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 8, 8)).astype(np.float32)
    records = [{"image": images[i], "label": i % 2, "patient_id": "SECRET", "source": "x.npz#0"} for i in range(4)]
    write_covidx_folder({"train": records[:3], "val": records[3:]}, tmp_path, {0: 0, 1: 2})
    assert (tmp_path / "train.txt").read_text().splitlines()[1] == "train_000001.png 2 0 0 8 8"
    back = load_covidx_split(tmp_path, "train.txt", class_map="binary")
    assert [r["label"] for r in back] == [0, 1, 0]
    png = np.asarray(Image.open(tmp_path / "images" / "train_000002.png"))
    assert np.array_equal(png, np.round(images[2, 0] * 255).astype(np.uint8))
    assert "SECRET" not in "".join(p.name for p in (tmp_path / "images").iterdir())


def test_bad_images_are_refused(tmp_path: Path):
    good = {"image": np.zeros((4, 4), np.float32), "label": 0, "source": "a.npz#0"}
    with pytest.raises(DataError, match=r"split 'train' record 1 \(b\.npz#7\).*\[0, 1\].*intensity='hu'"):
        bad = {"image": np.full((4, 4), 2.0), "label": 0, "source": "b.npz#7"}
        write_covidx_folder({"train": [good, bad]}, tmp_path, intensity="unit")
    with pytest.raises(DataError, match=r"split 'val' record 0 \(c\.npz#1\): expected .* got shape \(2, 4, 4\)"):
        write_covidx_folder({"val": [{"image": np.zeros((2, 4, 4)), "label": 0, "source": "c.npz#1"}]}, tmp_path)
    nan = np.zeros((4, 4), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(DataError, match=r"split 'test' record 0 \(d\.npz#3\): image holds 1 NaN / Inf"):
        write_covidx_folder({"test": [{"image": nan, "label": 0, "source": "d.npz#3"}]}, tmp_path)
    assert not list(tmp_path.glob("*.txt"))  # no split file lists a partly written split


def test_cli_on_ucsd(shared_data: Path, tmp_path: Path, capsys):
    assert main(["--npz", str(shared_data / "ucsd_covid_ct_64.npz"), "--out", str(tmp_path)]) == 0
    assert "train 425, val 118, test 203" in capsys.readouterr().out
    test = load_covidx_split(tmp_path, "test.txt", class_map="binary")
    assert len(test) == 203 and {r["label"] for r in test} == {0, 1}


def _class_folders(root: Path) -> dict[Path, bytes]:
    """A class-folder tree: 8-bit PNGs, one 16-bit PNG and one JPEG, named with patient ids; ``{path: bytes}``."""
    rng = np.random.default_rng(1)
    for cls in ("NonCOVID", "COVID"):
        for patient in range(3):
            folder = root / cls / f"scan{patient}"
            folder.mkdir(parents=True)
            for s in range(2):
                pixels = rng.integers(0, 256, (12, 10), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}P{patient:03d}_s{s:03d}.png")
    Image.fromarray(rng.integers(0, 4000, (12, 10), dtype=np.uint16)).save(root / "COVID" / "scan0" / "P000_s009.png")
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(root / "NonCOVID" / "P007_s001.jpg")
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_class_folder_records_give_a_folder_the_bundle_accepts(tmp_path: Path):
    """The user walkthrough: read_class_folders -> split -> write_covidx_folder -> the bundle's checks and loader."""
    inputs = _class_folders(tmp_path / "src")
    stamps = {p: p.stat().st_mtime_ns for p in inputs}
    records = read_class_folders(tmp_path / "src", class_names={"NonCOVID": 0, "COVID": 1})
    splits = {"train": records[0::3] + records[1::3], "val": records[2::6], "test": records[5::6]}
    out = write_covidx_folder(splits, tmp_path / "out", {0: 0, 1: 2})

    assert check_splits(out, SPLIT_FILES, class_map="binary", num_classes=2)
    for name, split in splits.items():
        text = (out / f"{name}.txt").read_text()
        assert "/" not in text and "P00" not in text and "COVID" not in text  # relative, no source names
        back = load_covidx_split(out, SPLIT_FILES[name], class_map="binary")
        assert [r["label"] for r in back] == [r["label"] for r in split]
        for original, exported in zip(split, back):
            assert Path(exported["image"]).parent == out / "images"
            assert Path(exported["image"]).read_bytes() == inputs[Path(original["image"])]
            with Image.open(original["image"]) as im:
                assert exported["box"] == (0, 0, im.width, im.height)
    assert sorted(p.suffix for p in (out / "images").iterdir()).count(".jpg") == 1
    # the bundle's chain reads the exported images as it reads the originals
    chain = get_preprocess_transforms(image_size=8, crop="none")
    for original, exported in zip(splits["train"], load_covidx_split(out, "train.txt", class_map="binary")):
        np.testing.assert_array_equal(chain(dict(original))["image"], chain(exported)["image"])
    assert {p: p.read_bytes() for p in inputs} == inputs and {p: p.stat().st_mtime_ns for p in inputs} == stamps


def test_hu_slices_round_trip_as_16_bit_png(tmp_path: Path, caplog):
    """read_nifti_slices records (float HU) are written as uint16 HU + 1024 and read back as the same HU."""
    rng = np.random.default_rng(2)
    volume = rng.uniform(-1024.0, 2000.0, (8, 16, 3)).astype(np.float32)
    volume[0, 0, 2] = -3024.0  # padding outside the scanned field: clipped to -1024
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    (tmp_path / "labels.csv").write_text("image,label,patient_id\nvol.nii.gz,1,SECRET\n")
    records = read_nifti_slices(tmp_path / "labels.csv")
    with caplog.at_level("WARNING", logger="monai_condflow.data.export"):
        out = write_covidx_folder({"train": records[:2], "test": records[2:]}, tmp_path / "out", {0: 0, 1: 2})
    assert "1 pixel(s) outside [-1024, 64511] HU were clipped" in caplog.text and "vol.nii.gz#2" in caplog.text
    assert "SECRET" not in "".join(p.name for p in (out / "images").iterdir())
    load, offset = LoadCTSlice(), HUOffset()
    chain = get_preprocess_transforms(image_size=None, crop="none")  # no resize: pixel for pixel
    for name in ("train", "test"):
        back = load_covidx_split(out, f"{name}.txt", class_map="binary")
        originals = records[:2] if name == "train" else records[2:]
        assert [r["label"] for r in back] == [1] * len(originals)
        for original, exported in zip(originals, back):
            stored = load(exported["image"])
            assert stored.dtype == np.uint16
            hu = np.asarray(original["image"])
            assert exported["box"] == (0, 0, hu.shape[1], hu.shape[0])
            np.testing.assert_allclose(offset(stored)[0], np.clip(hu, -1024, None), atol=0.5)
            same = np.clip(hu, -1024, None) == hu  # where nothing was clipped the chain's output is unchanged
            np.testing.assert_allclose(
                chain(exported)["image"][0].numpy()[same], chain(dict(original))["image"][0].numpy()[same], atol=1e-3
            )


def test_intensity_hu_and_integer_hu(tmp_path: Path):
    unit_range_hu = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)  # HU that happen to lie in [0, 1]
    int_hu = np.array([[-1000, 0], [40, 3000]], np.int16)
    write_covidx_folder({"train": [{"image": unit_range_hu, "label": 0}]}, tmp_path / "a", intensity="hu")
    write_covidx_folder({"train": [{"image": int_hu, "label": 0}]}, tmp_path / "b")
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "train_000000.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "images" / "train_000000.png"))
    np.testing.assert_array_equal(a.astype(np.int32) - 1024, unit_range_hu)
    np.testing.assert_array_equal(b.astype(np.int32) - 1024, int_hu)
    with pytest.raises(ValueError, match="intensity must be one of"):
        write_covidx_folder({"train": []}, tmp_path, intensity="window")


def test_bad_records_are_named(tmp_path: Path):
    _class_folders(tmp_path / "src")
    records = read_class_folders(tmp_path / "src", class_names={"NonCOVID": 0, "COVID": 1})
    first = records[0]["source"]
    with pytest.raises(DataError, match=rf"split 'train' record 0 \({first}\): label 0 is not in label_to_covidx"):
        write_covidx_folder({"train": records}, tmp_path / "out", {1: 2})
    with pytest.raises(DataError, match=rf"split 'test' record 0 \({first}\): .* exported twice .*'train' record 0"):
        write_covidx_folder({"train": records[:3], "test": records[:1]}, tmp_path / "out", {0: 0, 1: 2})
    with pytest.raises(DataError, match=r"split 'val' record 1 .*'image' and 'label'"):
        write_covidx_folder({"val": [records[0], {"image": records[1]["image"]}]}, tmp_path / "out", {0: 0, 1: 2})
    with pytest.raises(DataError, match=r"split 'train' record 0 .*lung box \(0, 0, 99, 5\) reaches outside"):
        write_covidx_folder({"train": [{**records[0], "box": (0, 0, 99, 5)}]}, tmp_path / "out", {0: 0, 1: 2})
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"split 'train' record 0 \(.*empty\.png\): cannot read image file"):
        write_covidx_folder({"train": [{"image": str(empty), "label": 0}]}, tmp_path / "out")
    assert not (tmp_path / "out" / "train.txt").exists()
    # an export into the folder its inputs come from is refused before anything is written
    out = write_covidx_folder({"train": records[:2]}, tmp_path / "out", {0: 0, 1: 2})
    again = load_covidx_split(out, "train.txt", class_map="binary")
    before = {p: p.read_bytes() for p in (out / "images").iterdir()}
    with pytest.raises(DataError, match="lies in the output image folder"):
        write_covidx_folder({"train": again[::-1]}, out, {0: 0, 1: 2})
    assert {p: p.read_bytes() for p in (out / "images").iterdir()} == before
    with pytest.raises(ValueError, match="split names must be plain file names"):
        write_covidx_folder({"../train": records[:1]}, tmp_path / "out", {0: 0, 1: 2})


def test_dicom_records_are_written_without_their_header(shared_data: Path, tmp_path: Path):
    pytest.importorskip("pydicom")
    from monai_condflow.data.readers import read_dicom_slice

    dicom_dir = shared_data / "raw_samples" / "covid_ct_md" / "dicom"
    records = read_dicom_folder(dicom_dir, labels=lambda p: int(p.name.startswith("COVID")))
    out = write_covidx_folder({"test": records}, tmp_path / "out", {0: 0, 1: 2})
    back = load_covidx_split(out, "test.txt", class_map="binary")
    assert [r["label"] for r in back] == [r["label"] for r in records]
    for original, exported in zip(records, back):
        data = Path(exported["image"]).read_bytes()
        assert data.startswith(b"\x89PNG") and original["patient_id"].encode() not in data
        hu = read_dicom_slice(original["image"])
        np.testing.assert_allclose(HUOffset()(LoadCTSlice()(exported["image"]))[0], np.clip(hu, -1024, None), atol=0.5)
