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
"""Tests for the dataset-folder data lists the bundle configs read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_condflow.data.datalists import load_covidx_split, parse_num_labels, select_labelled


def _folder(tmp_path: Path, n: int = 12) -> Path:
    (tmp_path / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"phantom_p{i:04d}_s000.png"
        Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 4 + 100 * i).astype(np.uint16)).save(
            tmp_path / "images" / name
        )
        lines.append(f"{name} {i % 3} 2 2 12 12")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_load_split_binary_and_three(tmp_path: Path):
    root = _folder(tmp_path)
    binary = load_covidx_split(root, "train.txt", class_map="binary")
    three = load_covidx_split(root, "train.txt", class_map="three")
    assert [r["label"] for r in three] == [i % 3 for i in range(12)]
    assert [r["label"] for r in binary] == [1 if i % 3 == 2 else 0 for i in range(12)]
    assert binary[0]["image"].endswith("images/phantom_p0000_s000.png")


def test_load_split_errors_name_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        load_covidx_split(tmp_path / "missing")
    root = _folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="val.txt"):
        load_covidx_split(root, "val.txt")


@pytest.mark.parametrize(
    "value, expected", [("all", None), (None, None), (1.0, None), (50, 50), ("20", 20), (0.05, 0.05), ("0.5", 0.5)]
)
def test_parse_num_labels(value, expected):
    assert parse_num_labels(value) == expected


@pytest.mark.parametrize("value", [0, -3, "many", 2.5])
def test_parse_num_labels_bad(value):
    with pytest.raises(ValueError, match="num_labels"):
        parse_num_labels(value)


def test_a_label_count_above_the_training_split_names_num_labels(tmp_path: Path):
    from monai_condflow.data.datalists import check_num_labels
    from monai_condflow.utils.checks import ConfigValueError

    records = load_covidx_split(_folder(tmp_path), class_map="three")
    assert check_num_labels(12, 12) == 12 and check_num_labels("all", 12) is None and check_num_labels(0.5, 12) == 0.5
    with pytest.raises(ConfigValueError, match=r"'num_labels' is 50 but the training split has 12 images.*at most 12"):
        select_labelled(records, 50)


def test_select_labelled(tmp_path: Path):
    records = load_covidx_split(_folder(tmp_path), class_map="three")
    labelled, unlabelled = select_labelled(records, 6, seed=1)
    assert len(labelled) == 6 and len(unlabelled) == 6
    assert sorted(r["label"] for r in labelled) == [0, 0, 1, 1, 2, 2]
    assert select_labelled(records, "all") == (records, [])


def test_preprocess_cached_runs_the_chain_once(tmp_path: Path):
    from monai_condflow.data.datalists import preprocess_cached
    from monai_condflow.transforms import get_preprocess_transforms

    records = load_covidx_split(_folder(tmp_path / "d"), class_map="three")
    chain = get_preprocess_transforms(image_size=8, intensity="uint16", crop="box")
    calls = []

    def counting(record):
        calls.append(record["image"])
        return chain(record)

    first = preprocess_cached(records, counting, tmp_path / "cache", {"image_size": 8})
    second = preprocess_cached(records, counting, tmp_path / "cache", {"image_size": 8})
    assert len(calls) == 12
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, second))
    assert first[0]["image"].shape == (1, 8, 8) and first[0]["image_path"] == records[0]["image"]
    assert isinstance(records[0]["image"], str)  # the input list is untouched
    preprocess_cached(records, counting, tmp_path / "cache", {"image_size": 16})
    assert len(calls) == 24  # other settings -> other cache entry


def test_preprocess_cached_keys_on_the_chains_own_settings(tmp_path: Path, caplog):
    """A chain with another HU window (or crop) under the same ``settings`` makes its own cache instead of reusing
    the images of the first; a chain built again with the same settings reuses them."""
    from monai_condflow.data.datalists import preprocess_cached
    from monai_condflow.transforms import get_preprocess_transforms

    records = load_covidx_split(_folder(tmp_path / "d", n=4), class_map="three")
    lung = preprocess_cached(records, get_preprocess_transforms(image_size=8, window=(-600, 1500)), tmp_path / "c",
                             {"image_size": 8})  # fmt: skip
    with caplog.at_level("INFO", logger="monai_condflow.data.datalists"):
        again = preprocess_cached(records, get_preprocess_transforms(image_size=8, window=(-600, 1500)),
                                  tmp_path / "c", {"image_size": 8})  # fmt: skip
    assert "reusing" in caplog.text and len(list((tmp_path / "c").glob("*.npz"))) == 1
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(lung, again))
    soft = preprocess_cached(records, get_preprocess_transforms(image_size=8, window=(40, 400)), tmp_path / "c",
                             {"image_size": 8})  # fmt: skip
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(lung, soft))
    preprocess_cached(records, get_preprocess_transforms(image_size=8, crop="none"), tmp_path / "c", {"image_size": 8})
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3


def test_preprocess_cached_corrupt_image_raise_and_skip(tmp_path: Path, caplog):
    from monai_condflow.data.datalists import preprocess_cached
    from monai_condflow.data.errors import DataError, ReadReport
    from monai_condflow.transforms import get_preprocess_transforms

    root = _folder(tmp_path / "d")
    (root / "images" / "phantom_p0003_s000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = load_covidx_split(root, class_map="three")
    chain = get_preprocess_transforms(image_size=8, intensity="uint16", crop="box")
    with pytest.raises(DataError, match=r"train.txt:4.*phantom_p0003_s000.png"):
        preprocess_cached(records, chain, None)
    report = ReadReport()
    with caplog.at_level("INFO", logger="monai_condflow.data.datalists"):
        kept = preprocess_cached(records, chain, tmp_path / "cache", on_error="skip", report=report)
    assert len(kept) == 11 and report.n_skipped == 1 and report.n_read == 11
    # the warning counts what was kept (it said "read 0" before) and names the split file
    assert "preprocessing 12 records of" in caplog.text and "train.txt" in caplog.text
    assert "skipped 1 bad entry" in caplog.text and "read 11" in caplog.text and "preprocessed 11 of 12" in caplog.text
    assert "phantom_p0003_s000.png" not in [Path(r["image_path"]).name for r in kept]
    again = preprocess_cached(records, chain, tmp_path / "cache", on_error="skip")
    assert [r["image_path"] for r in again] == [r["image_path"] for r in kept]


def test_a_truncated_cache_file_is_rebuilt_with_a_hint(tmp_path: Path, caplog):
    from monai_condflow.data.datalists import preprocess_cached
    from monai_condflow.transforms import get_preprocess_transforms

    records = load_covidx_split(_folder(tmp_path / "d", n=4), class_map="three")
    chain = get_preprocess_transforms(image_size=8, intensity="uint16", crop="box")
    first = preprocess_cached(records, chain, tmp_path / "cache", {"image_size": 8})
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a kill or a full disk mid-copy
    with caplog.at_level("WARNING"):
        again = preprocess_cached(records, chain, tmp_path / "cache", {"image_size": 8})
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert "unreadable" in caplog.text and "delete the cache folder" in caplog.text and cache_file.name in caplog.text
    assert np.load(cache_file)["images"].shape == (4, 1, 8, 8)  # rewritten whole


def _splits(root: Path, train: list[str], val: list[str], test: list[str]) -> Path:
    for name, lines in (("train", train), ("val", val), ("test", test)):
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_check_splits_reports_shared_images_and_classes_without_training_images(tmp_path: Path):
    from monai_condflow.data.datalists import check_splits
    from monai_condflow.data.errors import DataError

    names = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    _splits(root, ["a.png 0 0 0 4 4", "b.png 2 0 0 4 4"], ["c.png 0 0 0 4 4"], ["d.png 2 0 0 4 4"])
    assert check_splits(root, names, class_map="binary", num_classes=2)
    _splits(root, ["a.png 0 0 0 4 4", "b.png 2 0 0 4 4"], ["c.png 0 0 0 4 4"], ["x.png 0 0 0 4 4", "./b.png 2 0 0 4 4"])
    with pytest.raises(DataError, match=r"both the train and the test split.*b\.png.*train\.txt:2 and .*test\.txt:2"):
        check_splits(root, names, class_map="binary", num_classes=2)
    _splits(root, ["a.png 0 0 0 4 4", "b.png 1 0 0 4 4"], ["c.png 2 0 0 4 4"], ["d.png 2 0 0 4 4"])
    with pytest.raises(DataError, match=r"train\.txt: no training image of class\(es\) \[1\]"):
        check_splits(root, names, class_map="binary", num_classes=2)
    with pytest.raises(DataError, match=r"no training image of class\(es\) \[2\]"):
        check_splits(root, names, class_map="three", num_classes=3)
    # what may be behind the missing class is said (these gave only "classes present: []" before)
    with pytest.raises(DataError, match=r"0 and 1 are both non-COVID.*--class_map \"\{0: 0, 1: 1\}\""):
        check_splits(root, names, class_map="binary", num_classes=2)  # 0 / 1 labels read with the COVIDx ids
    _splits(root, ["a.png,0,0,0,4,4", "b.png,2,0,0,4,4"], ["c.png 0 0 0 4 4"], ["d.png 2 0 0 4 4"])
    with pytest.raises(DataError, match=r"2 line\(s\) have no class id after the file name, e.g. line 1.*not commas"):
        check_splits(root, names, class_map="binary", num_classes=2)
    _splits(root, ["# nothing yet"], ["c.png 0 0 0 4 4"], ["d.png 2 0 0 4 4"])
    with pytest.raises(DataError, match=r"lists no image"):
        check_splits(root, names, class_map="binary", num_classes=2)
    _splits(root, ["a.png 0 0 0 4 4", "b.png 5 0 0 4 4"], ["c.png 0 0 0 4 4"], ["d.png 2 0 0 4 4"])
    with pytest.raises(DataError, match=r"Class ids \[5\] are not in class_map 'three'.*your own ids"):
        check_splits(root, names, class_map="three", num_classes=3)
    # a class map of three classes trained as two (labels 2 a 2-class network cannot take), and the reverse: named
    # before any split file is read (none exists in the empty folder)
    from monai_condflow.utils.checks import ConfigValueError

    for class_map, num_classes, top in (("three", 2, 3), ("binary", 3, 2), ({0: 0, 1: 1, 2: 1}, 3, 2)):
        with pytest.raises(ConfigValueError, match=rf"'num_classes' is {num_classes} but class_map .* has {top} cl"):
            check_splits(tmp_path / "empty", names, class_map=class_map, num_classes=num_classes)


def test_parse_num_labels_reads_one_and_one_point_zero_as_the_pipeline_does():
    """One parser for the config id and ``--num-labels``: "1" is one label, "1.0" (like 1.0) every label."""
    from monai_condflow.pipeline import num_labels_arg

    assert parse_num_labels("1") == 1 and parse_num_labels(1) == 1 and num_labels_arg("1") == 1
    assert parse_num_labels("1.0") is None and parse_num_labels(1.0) is None and num_labels_arg("1.0") == "all"
    assert parse_num_labels("50.0") == 50 and num_labels_arg("50.0") == 50
    with pytest.raises(ValueError, match="num_labels"):
        parse_num_labels(True)


def test_check_shared_images_finds_copies_under_other_names(tmp_path: Path):
    """Names differ, pixels do not: the leak check_splits cannot see (24 of 48 test slices in a user's folder)."""
    from monai_condflow.data.datalists import check_shared_images
    from monai_condflow.data.errors import DataError

    rng = np.random.default_rng(0)
    images = [rng.random((1, 8, 8), dtype=np.float32) for _ in range(4)]

    def recs(split, idx):
        return [{"image": images[i].copy(), "image_path": f"{split}/{i}.png"} for i in idx]

    assert check_shared_images({"train": recs("tr", [0, 1]), "val": recs("va", [2]), "test": recs("te", [3])})
    # the same slice twice inside one split is not a leak between splits
    assert check_shared_images({"train": recs("tr", [0, 0, 1]), "test": recs("te", [3])})
    with pytest.raises(DataError, match=r"2 image\(s\) .* 2 between train and test: tr/0.png and te/0.png"):
        check_shared_images({"train": recs("tr", [0, 1]), "val": recs("va", [2]), "test": recs("te", [0, 1, 3])})
    nudged = recs("te", [0])
    nudged[0]["image"][0, 0, 0] += 1e-6  # one pixel differs: not the same image
    assert check_shared_images({"train": recs("tr", [0]), "test": nudged})
