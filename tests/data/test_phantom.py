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
"""Tests of the embedded phantom dataset generator."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from monai_condflow.data.phantom import (
    generate_phantom_dataset,
    hu_to_png,
    main,
    render_paired_slices,
    render_slice,
    sample_patient,
)

SIZE = 128
N_IMAGES = 36
NAME_RE = re.compile(r"^phantom_p(\d{4})_s(\d{3})\.png$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom")
    info = generate_phantom_dataset(out, num_images=N_IMAGES, seed=3, image_size=SIZE, slices_per_patient=3)
    return out, info


def _read_lines(out: Path) -> dict[str, list[list[str]]]:
    return {sp: [ln.split() for ln in (out / f"{sp}.txt").read_text().splitlines()] for sp in ("train", "val", "test")}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_determinism_same_bytes(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_phantom_dataset(again, num_images=N_IMAGES, seed=3, image_size=SIZE, slices_per_patient=3)
    assert _hashes(again) == _hashes(out)
    other = tmp_path / "other"
    generate_phantom_dataset(other, num_images=N_IMAGES, seed=4, image_size=SIZE, slices_per_patient=3)
    assert not set(_hashes(other).values()) & set(_hashes(out).values())


def test_files_and_annotation_format(dataset):
    out, info = dataset
    lines = _read_lines(out)
    all_rows = [r for rows in lines.values() for r in rows]
    assert len(all_rows) == N_IMAGES
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(pngs) == N_IMAGES
    assert sorted(r[0] for r in all_rows) == pngs
    for row in all_rows:
        assert len(row) == 6
        assert NAME_RE.match(row[0])
        cls, x0, y0, x1, y1 = map(int, row[1:])
        assert cls in (0, 1, 2)
        assert 0 <= x0 < x1 <= SIZE - 1 and 0 <= y0 < y1 <= SIZE - 1
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["num_images"] == N_IMAGES and meta["generator_version"]
    assert sum(sum(c.values()) for c in meta["counts"].values()) == N_IMAGES
    assert "seed 3" in (out / "README.md").read_text()
    assert info["counts"] == meta["counts"]


def test_patient_disjoint_and_stratified(dataset):
    out, _ = dataset
    lines = _read_lines(out)
    patients = {sp: {NAME_RE.match(r[0]).group(1) for r in rows} for sp, rows in lines.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    for sp, rows in lines.items():
        assert {int(r[1]) for r in rows} == {0, 1, 2}, sp
    # one class per patient, and several slices per patient at distinct axial positions
    by_patient: dict[str, set[int]] = {}
    for rows in lines.values():
        for r in rows:
            by_patient.setdefault(NAME_RE.match(r[0]).group(1), set()).add(int(r[1]))
    assert all(len(c) == 1 for c in by_patient.values())
    n_train = len(lines["train"])
    assert 0.5 * N_IMAGES <= n_train <= 0.85 * N_IMAGES


def test_png_values_and_lung_box(dataset):
    out, _ = dataset
    for row in [r for rows in _read_lines(out).values() for r in rows]:
        img = np.asarray(Image.open(out / "images" / row[0]))
        assert img.dtype == np.uint16 and img.shape == (SIZE, SIZE)
        hu = img.astype(np.float32) - 1024.0
        assert abs(float(np.median(hu[:6, :6])) + 1024) < 1  # outside the field of view
        assert abs(float(np.median(hu[SIZE // 2 - 2 : SIZE // 2 + 2, 3:6])) + 1000) < 40  # air beside the body
        assert hu.max() > 300  # bone present
        x0, y0, x1, y1 = map(int, row[2:])
        # lungs found from the image alone: dark pixels enclosed by the body
        body = ndimage.binary_fill_holes(hu > -500)
        lungs = body & (hu < -500)
        lab, n = ndimage.label(lungs)
        sizes = ndimage.sum(lungs, lab, range(1, n + 1))
        big = np.isin(lab, 1 + np.flatnonzero(sizes >= 20))
        inside = np.zeros_like(big)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert big.sum() > 0.03 * SIZE * SIZE
        assert (big & ~inside).sum() <= 0.002 * big.sum(), row[0]
        rows_, cols_ = np.flatnonzero(big.any(1)), np.flatnonzero(big.any(0))
        tol = 6  # tight: a few pixels of margin
        assert x0 >= cols_[0] - tol and x1 <= cols_[-1] + tol and y0 >= rows_[0] - tol and y1 <= rows_[-1] + tol
        assert float(np.median(hu[inside & big])) < -650


def test_render_slice_api_and_findings():
    rng = np.random.default_rng(0)
    means, extra = {0: [], 1: [], 2: []}, {0: [], 1: [], 2: []}
    for cls in (0, 1, 2):
        for k in range(4):
            pat = sample_patient(np.random.default_rng(100 + 10 * cls + k), cls)
            hu, box, mask = render_slice(rng, cls, SIZE, pat, z=0.6, return_mask=True)
            assert hu.dtype == np.float32 and hu.shape == (SIZE, SIZE)
            assert mask[box[1] : box[3] + 1, box[0] : box[2] + 1].sum() == mask.sum()
            lung = hu[mask]
            means[cls].append(float(lung.mean()))
            extra[cls].append(float(np.mean((lung > -700) & (lung < 100))))  # opacities (and vessels)
    # findings raise the fraction of opacified lung in the disease classes
    assert np.mean(extra[1]) > np.mean(extra[0]) and np.mean(extra[2]) > np.mean(extra[0])
    with pytest.raises(ValueError):
        render_slice(rng, 3, SIZE)
    with pytest.raises(ValueError):
        render_slice(rng, 1, SIZE, sample_patient(rng, 0))


# sha256 of the slices below as rendered by the phantom before its renderer was split into named steps
# (data/phantom_render.py); numpy / scipy pinned by constraints.txt
_RENDER_SHA256 = "12dc91421450479840ff00f4188706221ca8eb5b27ab3fbd250ee7e67d2bba3a"


def test_rendering_is_unchanged_by_the_refactor():
    """Hash regression, guarding a refactor only: the stored 16-bit values, lung boxes and lung masks of nine 512-px
    slices (three heights of one patient per class) hash to the value the monolithic ``_render`` gave (computed with
    that code, not derived from a specification). A deliberate change of the phantom's look changes this value and
    ``GENERATOR_VERSION`` together."""
    h = hashlib.sha256()
    for cls in (0, 1, 2):
        rng = np.random.default_rng(2024 + cls)
        patient = sample_patient(rng, cls)
        for z in (0.15, 0.5, 0.85):
            hu, box, mask = render_slice(rng, cls, 512, patient, z, return_mask=True)
            h.update(hu_to_png(hu).tobytes())
            h.update(np.asarray(box, dtype=np.int64).tobytes())
            h.update(mask.tobytes())
    assert h.hexdigest() == _RENDER_SHA256


@pytest.mark.parametrize("cls", [1, 2])
def test_paired_slices_switch_only_the_findings(cls):
    """The slice with findings is the ordinary rendering (same generator state, same state afterwards); the one
    without differs only inside the lungs (after the scanner blur), and is darker there (findings are opacities)."""
    rng = np.random.default_rng(7 + cls)
    patient = sample_patient(rng, cls)
    state = rng.bit_generator.state
    with_f, without, box, mask = render_paired_slices(rng, cls, SIZE, patient, 0.6)
    after = rng.bit_generator.state
    ref = np.random.default_rng(0)
    ref.bit_generator.state = state
    hu, box_ref, mask_ref = render_slice(ref, cls, SIZE, patient, 0.6, return_mask=True)
    assert np.array_equal(with_f, hu) and box == box_ref and np.array_equal(mask, mask_ref)
    assert ref.bit_generator.state == after
    diff = np.abs(with_f - without)
    assert diff.max() > 100.0  # the findings are there
    near_lungs = ndimage.binary_dilation(mask, iterations=3)
    assert diff[~near_lungs].max() < 1e-3  # and nothing else changed
    assert with_f[mask].mean() > without[mask].mean()


def test_paired_slices_of_a_normal_patient_are_equal():
    rng = np.random.default_rng(3)
    with_f, without, _, _ = render_paired_slices(rng, 0, SIZE, z=0.5)
    assert np.array_equal(with_f, without)


def test_cli_end_to_end_and_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--num-images", "18", "--seed", "1", "--image-size", "96", "--slices-per-patient", "2"]
    assert main([*args, "--workers", "1"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 18
    before = _hashes(out)
    assert main(args) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err
    assert _hashes(out) == before
    with pytest.raises(FileExistsError):
        generate_phantom_dataset(out, num_images=18, seed=1, image_size=96, slices_per_patient=2)
    assert main([*args, "--overwrite", "--workers", "2"]) == 0  # same bytes with two worker processes
    assert _hashes(out) == before


def test_too_few_patients(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        generate_phantom_dataset(tmp_path / "x", num_images=8, image_size=64, slices_per_patient=1)
