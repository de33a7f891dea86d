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
"""Tests for monai_condflow.data.readers (COVIDx annotations, class folders, NIfTI, DICOM)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_condflow.data import errors as errors_module
from monai_condflow.data.errors import DataError, ReadReport
from monai_condflow.data.readers import (
    parse_patient_id,
    read_class_folders,
    read_covidx_annotations,
    read_dicom_folder,
    read_dicom_slice,
    read_nifti_slices,
    resolve_class_map,
    validate_box,
)

# ----------------------------------------------------------------------------------------------------------------
# COVIDx CT annotation files


@pytest.fixture
def covidx_dir(tmp_path: Path) -> Path:
    """A folder with three (dummy) images named as in COVIDx CT."""
    for name in ("NCP_96_1328_0032.png", "CP_1_3034_0001.png", "Normal_2036_3519_0044.png"):
        (tmp_path / name).write_bytes(b"png")
    return tmp_path


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LINES = [
    "NCP_96_1328_0032.png 2 10 20 110 120",
    "",
    "# a comment line",
    "CP_1_3034_0001.png 1 0 0 5 6",
    "Normal_2036_3519_0044.png 0 3 4 50 60",
]


@pytest.mark.parametrize(
    "class_map, labels", [("three", [2, 1, 0]), ("binary", [1, 0, 0]), ({0: 4, 1: 5, 2: 6}, [6, 5, 4])]
)
def test_covidx_reads_records(covidx_dir: Path, class_map, labels):
    ann = _write(covidx_dir / "train.txt", GOOD_LINES)
    records = read_covidx_annotations(ann, class_map=class_map)
    assert [r["label"] for r in records] == labels
    assert records[0] == {
        "image": str(covidx_dir / "NCP_96_1328_0032.png"),
        "label": labels[0],
        "box": (10, 20, 110, 120),
        "patient_id": "NCP_96",
        "source": f"{ann}:1",
    }
    assert [r["patient_id"] for r in records] == ["NCP_96", "CP_1", "Normal_2036"]
    assert [r["source"] for r in records] == [f"{ann}:1", f"{ann}:4", f"{ann}:5"]
    assert records[2]["box"] == (3, 4, 50, 60)


def test_covidx_image_dir_and_unchecked_files(tmp_path: Path):
    ann = _write(tmp_path / "split.txt", ["phantom_p0012_s003.png 0 1 2 3 4", "img.png 2 1 2 3 4"])
    records = read_covidx_annotations(ann, image_dir="/nowhere", check_files=False)
    assert records[0]["image"] == str(Path("/nowhere") / "phantom_p0012_s003.png")
    assert records[0]["patient_id"] == "p0012"
    assert "patient_id" not in records[1]  # no pattern matches "img.png": its own group in splits


BAD_LINES = [
    ("NCP_96_1328_0032.png 2 10 20 110", "expected 6 fields", "malformed line"),
    ("NCP_96_1328_0032.png 2 10 20 110 120 7", "expected 6 fields", "malformed line"),
    ("NCP_96_1328_0032.png covid 10 20 110 120", "class id must be an integer, got 'covid'", "non-integer field"),
    ("NCP_96_1328_0032.png 2 10 20.5 110 120", "ymin must be an integer, got '20.5'", "non-integer field"),
    (
        "NCP_96_1328_0032.png 3 10 20 110 120",
        "class id 3 is not in the class map (known ids: [0, 1, 2])",
        "unknown class",
    ),
    ("NCP_96_1328_0032.png 2 110 20 10 120", "empty or inverted", "bad box"),
    ("NCP_96_1328_0032.png 2 10 20 10 120", "empty or inverted", "bad box"),
    ("NCP_96_1328_0032.png 2 10 120 110 120", "empty or inverted", "bad box"),
    ("NCP_96_1328_0032.png 2 -1 20 110 120", "negative coordinates", "bad box"),
    ("NCP_00_0000_0000.png 2 10 20 110 120", "NCP_00_0000_0000.png does not exist", "missing file"),
]


@pytest.mark.parametrize("bad, message, reason", BAD_LINES)
def test_covidx_errors_name_file_and_line(covidx_dir: Path, bad: str, message: str, reason: str):
    ann = _write(covidx_dir / "val.txt", ["# header", GOOD_LINES[0], bad, GOOD_LINES[3]])
    with pytest.raises(DataError) as info:
        read_covidx_annotations(ann)
    assert str(info.value).startswith(f"{ann}:3: ")
    assert message in str(info.value)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_covidx_binary_map_refuses_unknown_id_of_custom_map(covidx_dir: Path):
    ann = _write(covidx_dir / "a.txt", GOOD_LINES)
    with pytest.raises(DataError, match=r"a\.txt:4: class id 1 is not in the class map \(known ids: \[0, 2\]\)"):
        read_covidx_annotations(ann, class_map={0: 0, 2: 1})


def test_covidx_skip_mode_reports_and_logs(covidx_dir: Path, caplog):
    lines = [GOOD_LINES[0]] + [bad for bad, _, _ in BAD_LINES] + [GOOD_LINES[4]]
    ann = _write(covidx_dir / "mixed.txt", lines)
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="monai_condflow.data.readers"):
        records = read_covidx_annotations(ann, on_error="skip", report=report)
    assert [r["source"] for r in records] == [f"{ann}:1", f"{ann}:{len(lines)}"]
    assert report.n_read == 2 and report.n_skipped == len(BAD_LINES)
    assert report.counts == {
        "malformed line": 2,
        "non-integer field": 2,
        "unknown class": 1,
        "bad box": 4,
        "missing file": 1,
    }
    assert [s for s, _ in report.skipped] == [f"{ann}:{i}" for i in range(2, 2 + len(BAD_LINES))]
    assert f"skipped {len(BAD_LINES)} bad entries" in caplog.text and "bad box: 4" in caplog.text


def test_covidx_bad_arguments_and_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_covidx_annotations(tmp_path / "missing.txt")
    empty = _write(tmp_path / "empty.txt", ["# nothing", ""])
    with pytest.raises(DataError, match=r"empty\.txt: annotation file has no entries"):
        read_covidx_annotations(empty)
    with pytest.raises(ValueError, match="on_error"):
        read_covidx_annotations(empty, on_error="ignore")
    with pytest.raises(ValueError, match="class_map"):
        read_covidx_annotations(empty, class_map="four")


def test_covidx_real_annotations(shared_data: Path):
    ann = shared_data / "raw_samples" / "covid_ct_md" / "annotations_covidx_format.txt"
    three = read_covidx_annotations(ann, class_map="three")
    binary = read_covidx_annotations(ann, class_map="binary")
    assert len(three) == len(binary) == 24
    assert [sum(r["label"] == c for r in three) for c in range(3)] == [8, 8, 8]
    assert [sum(r["label"] == c for r in binary) for c in range(2)] == [16, 8]
    first = three[0]
    assert first["image"].endswith("COVID-19/P001_slice026.png") and first["label"] == 2 and binary[0]["label"] == 1
    assert first["box"] == (114, 166, 394, 328) and first["source"] == f"{ann}:1"
    assert sorted({r["patient_id"] for r in three}) == ["P001", "P002", "cap001", "cap002", "normal001", "normal002"]
    for record in three:
        validate_box(record["box"], 512, 512, record["source"])


# ----------------------------------------------------------------------------------------------------------------
# helpers


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("NCP_96_1328_0032.png", None, "NCP_96"),
        ("CP_1_3034_0001.png", None, "CP_1"),
        ("/a/b/Normal_2036_3519_0044.png", None, "Normal_2036"),
        ("phantom_p0012_s003.png", None, "p0012"),
        ("P001_slice026.png", None, "P001"),
        ("cap001_slice089.png", None, "cap001"),
        ("2020.03.12.20034686-p17-91-1.png", None, None),
        ("case-17_img3.png", r"case-(\d+)_", "17"),
        ("case-17_img3.png", r"(?P<patient>case-\d+)", "case-17"),
        ("case-17_img3.png", r"case-\d+", "case-17"),
    ],
)
def test_parse_patient_id(name, pattern, expected):
    assert parse_patient_id(name, pattern) == expected


def test_resolve_class_map():
    assert resolve_class_map("binary") == {0: 0, 1: 0, 2: 1}
    assert resolve_class_map({np.int64(2): 1}) == {2: 1}
    with pytest.raises(ValueError, match=r"non-negative ints, got 'a': 1"):
        resolve_class_map({"a": 1})


def test_validate_box():
    assert validate_box((0, 0, 64, 32), height=32, width=64) == (0, 0, 64, 32)
    assert validate_box(np.array([1, 2, 3, 4])) == (1, 2, 3, 4)
    with pytest.raises(DataError, match=r"^f\.png: lung box \(0, 0, 65, 32\) reaches outside the image of height 32 "):
        validate_box((0, 0, 65, 32), height=32, width=64, source="f.png")
    with pytest.raises(DataError, match="outside the image of height 32 and width 64") as info:
        validate_box((0, 0, 64, 33), height=32, width=64)
    assert info.value.reason == "box out of image"
    with pytest.raises(DataError, match="4 integers"):
        validate_box((0.0, 0, 3, 3))
    with pytest.raises(DataError, match="4 integers"):
        validate_box((0, 0, 3))


# ----------------------------------------------------------------------------------------------------------------
# class folders


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    files = [
        "covid/b_p02_s1.png",
        "covid/a_p01_s1.PNG",
        "covid/sub/c.nii.gz",
        "covid/notes.txt",
        "covid/.hidden.png",
        "normal/x.jpg",
        "normal/y.dcm",
        "pneumonia/z.jpeg",
    ]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"data")
    (tmp_path / ".git").mkdir()
    return tmp_path


def test_class_folders_sorted_names(class_tree: Path):
    records = read_class_folders(class_tree)
    rel = [(Path(r["image"]).relative_to(class_tree).as_posix(), r["label"]) for r in records]
    assert rel == [
        ("covid/a_p01_s1.PNG", 0),
        ("covid/b_p02_s1.png", 0),
        ("covid/sub/c.nii.gz", 0),
        ("normal/x.jpg", 1),
        ("normal/y.dcm", 1),
        ("pneumonia/z.jpeg", 2),
    ]
    assert records[0]["patient_id"] == "p01" and "patient_id" not in records[3]
    assert records[0]["source"] == records[0]["image"]


def test_class_folders_list_and_dict(class_tree: Path):
    records = read_class_folders(class_tree, class_names=["normal", "covid"], extensions=(".png",))
    assert [(Path(r["image"]).name, r["label"]) for r in records] == [("a_p01_s1.PNG", 1), ("b_p02_s1.png", 1)]
    records = read_class_folders(class_tree, class_names={"normal": 0, "pneumonia": 0, "covid": 1})
    assert [r["label"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert [Path(r["image"]).name for r in records[:3]] == ["x.jpg", "y.dcm", "z.jpeg"]
    with pytest.raises(FileNotFoundError, match=r"class folder .*COVID-19 \(class 'COVID-19'\) does not exist"):
        read_class_folders(class_tree, class_names=["COVID-19"])


def test_class_folders_empty_files(class_tree: Path):
    (class_tree / "normal" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: file is empty \(0 bytes\)"):
        read_class_folders(class_tree)
    report = ReadReport()
    records = read_class_folders(class_tree, on_error="skip", report=report)
    assert len(records) == 6 and report.counts == {"empty file": 1} and report.n_read == 6


def test_class_folders_real(shared_data: Path):
    records = read_class_folders(shared_data / "raw_samples" / "ucsd_covid_ct")
    assert len(records) == 16 and [r["label"] for r in records] == [0] * 8 + [1] * 8  # COVID < NonCOVID


# ----------------------------------------------------------------------------------------------------------------
# NIfTI


def _nifti(path: Path, raw: np.ndarray, slope: float = 2.0, inter: float = -1024.0) -> Path:
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture
def nifti_dir(tmp_path: Path) -> Path:
    raw = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    _nifti(tmp_path / "vol_a.nii.gz", raw)
    _nifti(tmp_path / "vol_b.nii", raw[:, :, :2] + 100, slope=1.0, inter=0.0)
    return tmp_path


def test_nifti_whole_volumes_in_hu(nifti_dir: Path):
    csv_file = _write(nifti_dir / "list.csv", ["image,label,patient_id", "vol_a.nii.gz,1,pA", "vol_b.nii,0,"])
    records = read_nifti_slices(csv_file)
    assert len(records) == 5
    raw = np.arange(60, dtype=np.int16).reshape(4, 5, 3)
    for k in range(3):  # shown as DICOM viewers show axial slices: the RAS slice [R, A] flipped and transposed
        assert records[k]["image"].dtype == np.float32 and records[k]["image"].shape == (5, 4)
        np.testing.assert_array_equal(records[k]["image"], raw[::-1, ::-1, k].T.astype(np.float32) * 2.0 - 1024.0)
        assert records[k]["source"] == f"{nifti_dir / 'vol_a.nii.gz'}#{k}"
    assert [r["label"] for r in records] == [1, 1, 1, 0, 0]
    assert [r["patient_id"] for r in records] == ["pA"] * 3 + ["vol_b.nii"] * 2
    np.testing.assert_array_equal(records[4]["image"], raw[::-1, ::-1, 1].T + 100.0)


def test_nifti_per_slice_labels_axis_and_range(nifti_dir: Path):
    csv_file = _write(nifti_dir / "slices.csv", ["image,label,slice", "vol_a.nii.gz,2,2", "vol_a.nii.gz,0,0"])
    records = read_nifti_slices(csv_file)
    assert [(r["label"], r["source"].rsplit("#", 1)[1]) for r in records] == [(2, "2"), (0, "0")]
    whole = _write(nifti_dir / "whole.csv", ["image,label", "vol_a.nii.gz,1"])
    with pytest.raises(ValueError, match=r"axis 0 of orientation 'RAS' runs R; slice the axis that runs S / I"):
        read_nifti_slices(whole, axis=0)  # a sagittal slice has no radiological axial display
    records = read_nifti_slices(whole, axis=0, slice_range=(1, -1), radiological=False)
    raw = np.arange(60, dtype=np.int16).reshape(4, 5, 3)
    assert len(records) == 2 and records[0]["image"].shape == (5, 3)
    np.testing.assert_array_equal(records[1]["image"], raw[2] * 2.0 - 1024.0)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("vol_a.nii.gz,x", "label must be an integer, got 'x'"),
        ("vol_a.nii.gz,-1", "label must be non-negative"),
        ("missing.nii.gz,1", "missing.nii.gz does not exist"),
        ("broken.nii.gz,1", "broken.nii.gz is truncated or unreadable"),
        ("garbage.nii,1", "garbage.nii is truncated or unreadable"),
        ("nan.nii,1", "nan.nii holds 1 NaN / Inf voxels"),
        ("flat.nii,1", "flat.nii must be 3-D, got shape (4, 5)"),
        ("vol_a.nii.gz,1,3", "slice 3 is out of range for volume"),
    ],
)
def test_nifti_errors_name_csv_line_and_volume(nifti_dir: Path, line: str, message: str):
    _truncate(_nifti(nifti_dir / "broken.nii.gz", np.ones((8, 8, 8), np.int16)))
    (nifti_dir / "garbage.nii").write_bytes(b"not a nifti at all" * 30)
    vol = np.zeros((3, 3, 3), np.float32)
    vol[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(nifti_dir / "nan.nii"))
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(nifti_dir / "flat.nii"))
    csv_file = _write(nifti_dir / "bad.csv", ["image,label,slice", "vol_b.nii,0,", line])
    with pytest.raises(DataError) as info:
        read_nifti_slices(csv_file)
    assert str(info.value).startswith(f"{csv_file}:3: ")
    assert message in str(info.value)


def test_nifti_truncated_uncompressed_and_skip(nifti_dir: Path, caplog):
    _truncate(_nifti(nifti_dir / "cut.nii", np.ones((8, 8, 8), np.int16)))
    csv_file = _write(nifti_dir / "mixed.csv", ["image,label", "cut.nii,1", "vol_b.nii,0", "cut.nii,1"])
    report = ReadReport()
    with caplog.at_level(logging.WARNING):
        records = read_nifti_slices(csv_file, on_error="skip", report=report)
    assert len(records) == 2 and report.counts == {"unreadable file": 2}
    assert [s for s, _ in report.skipped] == [f"{csv_file}:2", f"{csv_file}:4"]
    assert "skipped 2 bad entries" in caplog.text
    with pytest.raises(DataError, match=r"mixed\.csv:2: volume .*cut\.nii is truncated or unreadable"):
        read_nifti_slices(csv_file)


def test_nifti_bad_arguments(nifti_dir: Path):
    csv_file = _write(nifti_dir / "ok.csv", ["image,label", "vol_b.nii,0"])
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2 for a 3-D volume, got 3"):
        read_nifti_slices(csv_file, axis=3)
    with pytest.raises(ValueError, match=r"slice_range must be \(start, stop\), got \(1,\)"):
        read_nifti_slices(csv_file, slice_range=(1,))
    with pytest.raises(DataError, match=r"ok\.csv:2: slice_range \(5, 9\) selects no slice of volume"):
        read_nifti_slices(csv_file, slice_range=(5, 9))


def test_nifti_bad_header(nifti_dir: Path):
    csv_file = _write(nifti_dir / "h.csv", ["path,class", "vol_b.nii,0"])
    with pytest.raises(
        DataError, match=r"h\.csv:1: CSV header \['path', 'class'\] lacks column\(s\) \['image', 'label'\]"
    ):
        read_nifti_slices(csv_file)


def test_gzip_truncation_is_really_truncated(nifti_dir: Path):
    # guard for the truncated-volume test above: the half file must fail to decompress
    path = _truncate(_nifti(nifti_dir / "g.nii.gz", np.ones((8, 8, 8), np.int16)))
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(path.read_bytes())


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def _dicom_files(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "raw_samples" / "covid_ct_md" / "dicom").glob("*.dcm"))


def test_dicom_real_slices_in_hu(shared_data: Path):
    files = _dicom_files(shared_data)
    assert len(files) == 3
    for file in files:
        hu = read_dicom_slice(file)
        assert hu.dtype == np.float32 and hu.shape == (512, 512)
        assert -1030 <= float(np.median(hu[:32, :32])) <= -970, file  # air in the corner
        assert (hu < -900).mean() > 0.2, file  # air around the body and in the lungs
        body = hu[hu > -500]
        assert -150 <= float(np.median(body)) <= 100, file  # soft tissue / fat / water near 0
        assert hu.min() >= -1100 and hu.max() < 3100, file


def test_dicom_missing_decoder_plugin(shared_data: Path, monkeypatch):
    from pydicom.pixels.decoders import JPEGLosslessSV1Decoder

    monkeypatch.setattr(JPEGLosslessSV1Decoder, "_available", {})
    monkeypatch.setattr(
        JPEGLosslessSV1Decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")}
    )
    file = _dicom_files(shared_data)[0]
    with pytest.raises(DataError, match="install pylibjpeg and pylibjpeg-libjpeg") as info:
        read_dicom_slice(file)
    assert str(info.value).startswith(f"{file}: cannot decode pixel data with transfer syntax 'JPEG Lossless")
    assert info.value.reason == "missing decoder"


def test_dicom_unreadable(tmp_path: Path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"bad\.dcm: not a readable DICOM file"):
        read_dicom_slice(bad)
    with pytest.raises(DataError, match=r"nope\.dcm: DICOM file does not exist"):
        read_dicom_slice(tmp_path / "nope.dcm")


def test_dicom_folder(shared_data: Path, tmp_path: Path):
    root = shared_data / "raw_samples" / "covid_ct_md" / "dicom"
    names = {"Normal": 0, "CAP": 1, "COVID-19": 2}
    records = read_dicom_folder(root, labels=lambda p: names[p.name.split("_")[0]])
    assert [(Path(r["image"]).name.split("_")[0], r["label"]) for r in records] == [
        ("CAP", 1),
        ("COVID-19", 2),
        ("Normal", 0),
    ]
    assert [r["patient_id"] for r in records] == ["98C1066-ASAD", "98C14734-ASSH", "99C628-ASAD"]
    records = read_dicom_folder(root, labels=lambda p: 0, read_patient_id=False, patient_pattern=r"_([a-zA-Z]+\d+)_")
    assert [r["patient_id"] for r in records] == ["cap001", "P001", "normal001"]


def test_dicom_folder_dict_labels_and_errors(tmp_path: Path):
    for rel in ("covid/a.dcm", "normal/b.DCM", "loose.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"junk")
    records = read_dicom_folder(tmp_path, labels={"covid": 1, "normal": 0}, read_patient_id=False, on_error="skip")
    assert [(Path(r["image"]).name, r["label"]) for r in records] == [("a.dcm", 1), ("b.DCM", 0)]
    with pytest.raises(DataError, match=r"loose\.dcm: no label for a file directly in .*labels as a callable"):
        read_dicom_folder(tmp_path, labels={"covid": 1, "normal": 0}, read_patient_id=False)
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "c.dcm").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"c\.dcm: no label for folder 'cap'; labels are known for the sub-folders"):
        read_dicom_folder(tmp_path, labels={"covid": 1, "normal": 0, "": 0}, read_patient_id=False)
    (tmp_path / "cap" / "c.dcm").unlink()
    report = ReadReport()
    assert read_dicom_folder(tmp_path, labels=lambda p: 0, on_error="skip", report=report) == []
    assert report.counts == {"unreadable file": 3}
    with pytest.raises(DataError, match=r"a\.dcm: not a readable DICOM file"):
        read_dicom_folder(tmp_path, labels=lambda p: 0)


def test_report_merge_and_summary(caplog):
    report = ReadReport(n_read=1)
    other = ReadReport(n_read=2)
    other.add(DataError("x", "f:1", "bad box"))
    report.merge(other)
    assert report.n_read == 3 and report.skipped == [("f:1", "x")] and report.counts == {"bad box": 1}
    with caplog.at_level(logging.WARNING):
        report.log_summary(logging.getLogger("t"), "what")
    assert "what: skipped 1 bad entry (bad box: 1); read 3. First: f:1: x" in caplog.text
    assert errors_module.check_on_error("skip") == "skip"


# ----------------------------------------------------------------------------------------------------------------
# containment, duplicates, encoding


def test_annotation_paths_must_stay_inside_the_image_folder(covidx_dir: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "test_image.png"
    outside.write_bytes(b"png")
    images = covidx_dir / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(b"png")
    (images / "sub").mkdir()
    (images / "sub" / "deep.png").write_bytes(b"png")
    escape = f"../../{outside.parent.name}/{outside.name}"
    for bad in (escape, str(outside), "../NCP_96_1328_0032.png", "sub/../../CP_1_3034_0001.png"):
        ann = _write(covidx_dir / "train.txt", ["ok.png 0 0 0 5 5", f"{bad} 2 0 0 5 5"])
        with pytest.raises(DataError, match=r"train\.txt:2: .*outside the image folder"):
            read_covidx_annotations(ann, image_dir=images)
        report = ReadReport()
        kept = read_covidx_annotations(ann, image_dir=images, on_error="skip", report=report)
        assert [Path(r["image"]).name for r in kept] == ["ok.png"]
        assert report.counts == {"path outside image folder": 1}
    ann = _write(covidx_dir / "train.txt", ["ok.png 0 0 0 5 5", "sub/deep.png 1 0 0 5 5", "./sub/../ok2.png 1 0 0 5 5"])
    assert len(read_covidx_annotations(ann, image_dir=images, check_files=False)) == 3  # inside: fine
    ann = _write(covidx_dir / "train.txt", [f"{images / 'ok.png'} 0 0 0 5 5"])  # an absolute path inside: fine
    assert Path(read_covidx_annotations(ann, image_dir=images)[0]["image"]) == images / "ok.png"


def test_duplicate_annotation_lines_are_reported(covidx_dir: Path):
    ann = _write(covidx_dir / "a.txt", [GOOD_LINES[0], GOOD_LINES[3], "./NCP_96_1328_0032.png 2 0 0 9 9"])
    with pytest.raises(DataError, match=r"a\.txt:3: .*listed again \(first at line 1\)"):
        read_covidx_annotations(ann)
    report = ReadReport()
    assert len(read_covidx_annotations(ann, on_error="skip", report=report)) == 2
    assert report.counts == {"duplicate line": 1}


def test_a_non_utf8_byte_names_file_and_line_also_in_skip_mode(covidx_dir: Path):
    ann = covidx_dir / "latin1.txt"
    ann.write_bytes(GOOD_LINES[0].encode() + b"\n" + "CP_1_3034_0001.png 1 0 0 5 6 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:2: line is not valid UTF-8 .*0xe9"):
        read_covidx_annotations(ann)
    report = ReadReport()
    kept = read_covidx_annotations(ann, on_error="skip", report=report)
    assert len(kept) == 1 and report.counts == {"bad encoding": 1}
    assert report.skipped[0][0].endswith("latin1.txt:2")


def test_nifti_orientation_gives_the_same_slices_whatever_the_storage_order(tmp_path: Path):
    """Issue 16: volumes go through MONAI's LoadImage + Orientation: an LPS-stored and an axis-permuted copy of a
    RAS volume give the RAS volume's axial slices; ``orientation=None`` keeps the file order."""
    ras = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(ras, np.eye(4)), str(tmp_path / "ras.nii"))
    lps = np.ascontiguousarray(ras[::-1, ::-1, :])  # stored right-to-left and anterior-to-posterior
    nib.save(nib.Nifti1Image(lps, np.diag([-1.0, -1.0, 1.0, 1.0])), str(tmp_path / "lps.nii"))
    perm = np.ascontiguousarray(ras.transpose(2, 0, 1))  # stored S, R, A
    affine = np.zeros((4, 4))
    affine[2, 0] = affine[0, 1] = affine[1, 2] = affine[3, 3] = 1.0  # voxel (k, i, j) -> world (i, j, k)
    nib.save(nib.Nifti1Image(perm, affine), str(tmp_path / "perm.nii"))
    csv_file = _write(tmp_path / "o.csv", ["image,label", "ras.nii,0", "lps.nii,1", "perm.nii,1"])
    records = read_nifti_slices(csv_file)
    assert len(records) == 9
    for k in range(3):
        expected = ras[::-1, ::-1, k].T.astype(np.float32)  # rows anterior -> posterior, columns right -> left
        for volume in range(3):
            np.testing.assert_array_equal(np.asarray(records[3 * volume + k]["image"]), expected)
    with pytest.raises(ValueError, match="needs the volume's orientation"):
        read_nifti_slices(csv_file, orientation=None)
    raw = read_nifti_slices(csv_file, orientation=None, radiological=False)  # the file's voxel order
    assert len(raw) == 3 + 3 + 5 and raw[3]["image"].shape == (4, 5) and raw[6]["image"].shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(raw[3]["image"]), lps[:, :, 0])
    ras_list = _write(tmp_path / "l.csv", ["image,label", "ras.nii,0"])
    lps_records = read_nifti_slices(ras_list, orientation="LPS", radiological=False)
    np.testing.assert_array_equal(np.asarray(lps_records[0]["image"]), lps[:, :, 0])
    # the display does not depend on the orientation the volume is turned to
    for codes, axis, k in (("LPS", 2, 0), ("PLI", 2, 2), ("SAR", 0, 0)):  # an I axis runs the slices the other way
        shown = read_nifti_slices(ras_list, orientation=codes, axis=axis)
        np.testing.assert_array_equal(np.asarray(shown[k]["image"]), ras[::-1, ::-1, 0].T, err_msg=codes)


def test_nifti_records_stream_their_slices(nifti_dir: Path):
    """Issue 16: the records hold references, read when used, one volume in memory at a time; they pickle."""
    import pickle

    from monai_condflow.data.readers import NiftiSlice
    from monai_condflow.transforms.array import LoadCTSlice

    csv_file = _write(nifti_dir / "list.csv", ["image,label", "vol_a.nii.gz,1", "vol_b.nii,0"])
    records = read_nifti_slices(csv_file)
    assert all(isinstance(r["image"], NiftiSlice) for r in records)
    loader = records[0]["image"].loader
    assert all(r["image"].loader is loader for r in records)
    np.asarray(records[0]["image"])
    assert loader._cached[0].endswith("vol_a.nii.gz")
    np.asarray(records[4]["image"])
    assert loader._cached[0].endswith("vol_b.nii")  # the first volume was released
    copy = pickle.loads(pickle.dumps(records[1]["image"]))
    assert copy.loader._cached is None
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(records[1]["image"]))
    loaded = LoadCTSlice()(records[2]["image"])
    assert tuple(loaded.shape) == (1, 5, 4)
    assert "vol_a.nii.gz#2" in str(records[2]["image"])
