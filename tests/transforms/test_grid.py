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
"""Tests of monai_condflow.transforms.grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_condflow.transforms.chains import get_array_transforms
from monai_condflow.transforms.grid import make_grid, save_chain_preview, save_png_grid


def test_make_grid_layout_and_values():
    images = torch.stack([torch.full((1, 2, 3), v) for v in (0.0, 0.5, 1.0)])  # N=3, H=2, W=3
    grid = make_grid(images, nrow=2, padding=1, pad_value=0.2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 2 + 3, 2 * 3 + 3)
    assert grid[0, 0] == 51  # round(0.2 * 255)
    np.testing.assert_array_equal(grid[1:3, 1:4], 0)
    np.testing.assert_array_equal(grid[1:3, 5:8], 128)  # round(127.5) = 128
    np.testing.assert_array_equal(grid[4:6, 1:4], 255)
    np.testing.assert_array_equal(grid[4:6, 5:8], 51)  # empty slot keeps the padding value
    np.testing.assert_array_equal(grid[3, :], 51)
    flat = make_grid(images[:, 0].numpy(), nrow=8, padding=0)
    assert flat.shape == (2, 9)  # cols = min(nrow, N)
    np.testing.assert_array_equal(make_grid(np.array([[[2.0, -1.0]]]), padding=0), [[255, 0]])  # clipped


def test_make_grid_matches_a_hand_built_array():
    """exact tiling (row-major, ``cols = min(nrow, N)``), padding around and between tiles, ``round(255 x)``."""
    images = np.array(
        [
            [[0.0, 1.0]],  # tile 0: one row, two columns
            [[0.5, 0.2]],  # tile 1
            [[1.5, -3.0]],  # tile 2: clipped to [1, 0]
        ]
    )  # [N=3, H=1, W=2]
    p = 9  # round(0.035 * 255)
    expected = np.array(
        [
            [p, p, p, p, p, p, p],
            [p, 0, 255, p, 128, 51, p],
            [p, p, p, p, p, p, p],
            [p, 255, 0, p, p, p, p],  # empty last slot keeps the padding value
            [p, p, p, p, p, p, p],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(make_grid(images, nrow=2, padding=1, pad_value=0.035), expected)
    np.testing.assert_array_equal(make_grid(torch.from_numpy(images)[:, None], nrow=2, padding=1, pad_value=0.035),
                                  expected)  # fmt: skip
    # no padding, one row: the tiles side by side
    np.testing.assert_array_equal(make_grid(images, nrow=3, padding=0), [[0, 255, 128, 51, 255, 0]])
    # one column, two pixels of white padding
    column = make_grid(images[:2], nrow=1, padding=2)
    assert column.shape == (2 * 1 + 3 * 2, 2 + 2 * 2)
    np.testing.assert_array_equal(column[2, 2:4], [0, 255])
    np.testing.assert_array_equal(column[5, 2:4], [128, 51])
    assert (column[[0, 1, 3, 4, 6, 7]] == 255).all() and (column[:, [0, 1, 4, 5]] == 255).all()


def test_make_grid_errors():
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\] or \[N, H, W\], got shape \(2, 3, 4, 4\)"):
        make_grid(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="1 non-finite"):
        make_grid(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        make_grid(torch.zeros(1, 2, 2), nrow=0)


def test_save_png_grid_pixel_size_and_atomicity(tmp_path, monkeypatch):
    images = torch.rand(10, 1, 8, 6)
    path = save_png_grid(images, tmp_path / "sub" / "grid.png", nrow=4)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (4 * 6 + 5 * 2, 3 * 8 + 4 * 2)  # (width, height)
        np.testing.assert_array_equal(np.asarray(im), make_grid(images, nrow=4))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_png_grid(torch.zeros(2, 1, 8, 6), path)
    assert path.read_bytes() == before  # the old grid is intact
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_save_png_grid_row_titles(tmp_path):
    images = torch.rand(6, 1, 16, 16)
    plain = make_grid(images, nrow=3)
    path = save_png_grid(images, tmp_path / "t.png", nrow=3, labels=["normal", "COVID-19"])
    with Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.shape[0] == plain.shape[0] and arr.shape[1] > plain.shape[1]
    np.testing.assert_array_equal(arr[:, -plain.shape[1] :], plain)
    assert (arr[:, : arr.shape[1] - plain.shape[1]] < 128).any()  # some text was drawn
    with pytest.raises(ValueError, match=r"one title per grid row: 2 row\(s\), got 1 label\(s\)"):
        save_png_grid(images, tmp_path / "u.png", nrow=3, labels=["only one"])


def test_save_chain_preview(tmp_path):
    records = [{"image": np.full((16, 16), i / 20, np.float32) + np.eye(16, dtype=np.float32) * 0.1} for i in range(5)]
    path = save_chain_preview(records, get_array_transforms(image_size=8), tmp_path / "p.png", n=3, nrow=2)
    with Image.open(path) as im:
        assert im.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    with pytest.raises(ValueError, match="at least one record"):
        save_chain_preview([], get_array_transforms(), tmp_path / "q.png")
