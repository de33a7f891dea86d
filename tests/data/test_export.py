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

import numpy as np
import pytest
from PIL import Image

from monai_condflow.data.datalists import load_covidx_split
from monai_condflow.data.export import main, write_covidx_folder


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
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_covidx_folder({"train": [{"image": np.full((4, 4), 2.0), "label": 0}]}, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        write_covidx_folder({"train": [{"image": np.zeros((2, 4, 4)), "label": 0}]}, tmp_path)


def test_cli_on_ucsd(shared_data: Path, tmp_path: Path, capsys):
    assert main(["--npz", str(shared_data / "ucsd_covid_ct_64.npz"), "--out", str(tmp_path)]) == 0
    assert "train 425, val 118, test 203" in capsys.readouterr().out
    test = load_covidx_split(tmp_path, "test.txt", class_map="binary")
    assert len(test) == 203 and {r["label"] for r in test} == {0, 1}
