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
"""Generation of conditional synthetic images: modes, formats, determinism, output hygiene, bad config."""

from __future__ import annotations

import csv
import gzip
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_condflow.engines.generation import (
    SUMMARY_NAME,
    generate,
    generate_tensors,
    nifti_bytes,
    summarize_sample_stats,
)
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
from monai_condflow.networks.nets.pepx_net import PEPXNet

MARKER = "SECRET_PATIENT_ZX81"
S = 16


@pytest.fixture(scope="module")
def flow() -> ConditionalGlow:
    torch.manual_seed(1)
    f = ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1), hidden_channels=8
    )
    x = torch.rand(8, 1, S, S)
    f.initialize(x, torch.nn.functional.normalize(torch.randn(8, 32), dim=1))
    return f


def _records(n: int = 6, with_condition: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        r = {
            "image": torch.rand(1, S, S, generator=g),
            "label": i % 2,
            "source": f"/data/{MARKER}/slice_{i}.png:{i + 1}",
            "patient_id": f"{MARKER}-{i}",
        }
        if with_condition:
            r["condition"] = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
        out.append(r)
    return out


def _manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_generate_tensors_shape_range_and_seed(flow):
    z = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    a = generate_tensors(flow, z, 0.9, torch.Generator().manual_seed(4))
    b = generate_tensors(flow, z, 0.9, torch.Generator().manual_seed(4))
    c = generate_tensors(flow, z, 0.9, torch.Generator().manual_seed(5))
    assert a.shape == (3, 1, S, S) and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert flow.training  # mode restored
    with pytest.raises(ValueError, match="temperature"):
        generate_tensors(flow, z, 0.0)


def test_same_z_writes_png16_nifti_and_manifest(flow, tmp_path):
    manifest = generate(flow, None, _records(), output_dir=tmp_path / "a", model_version="flow-v1", seed=3)
    rows = _manifest(manifest)
    assert [r["index"] for r in rows] == [str(i) for i in range(6)]
    assert list(rows[0]) == [
        "index",
        "file",
        "nifti_file",
        "class",
        "temperature",
        "seed",
        "model_version",
        "mode",
        "dp_epsilon",
    ]
    assert {r["class"] for r in rows} == {"0", "1"}
    assert all(r["file"] == f"synthetic_{int(r['index']):06d}_class{r['class']}.png" for r in rows)
    assert all(r["temperature"] == "0.9" and r["seed"] == "3" and r["model_version"] == "flow-v1" for r in rows)
    assert all(r["dp_epsilon"] == "none" for r in rows)
    private = _manifest(generate(flow, None, _records(), output_dir=tmp_path / "p", model_version="v", dp_epsilon=3.5))
    assert {r["dp_epsilon"] for r in private} == {"3.5"}
    png = Image.open(tmp_path / "a" / rows[0]["file"])
    arr = np.asarray(png)
    assert png.size == (S, S) and png.mode in ("I;16", "I")
    assert arr.max() <= 65535 and arr.max() > 255  # really 16-bit values
    nii = nib.load(tmp_path / "a" / rows[0]["nifti_file"])
    data = np.asarray(nii.dataobj)
    assert data.dtype == np.float32 and data.shape == (S, S)
    # the PNG holds round(x * 65535), the NIfTI x itself, stored [W, H]
    np.testing.assert_allclose(data.T, arr.astype(np.float64) / 65535.0, atol=1.0 / 65535)
    # same inputs + seed -> the same files
    again = generate(flow, None, _records(), output_dir=tmp_path / "b", model_version="flow-v1", seed=3)
    for r in _manifest(again):
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()
        assert (tmp_path / "a" / r["nifti_file"]).read_bytes() == (tmp_path / "b" / r["nifti_file"]).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_class_names_go_into_the_manifest_and_a_class_without_a_name_is_refused(flow, tmp_path):
    """``class_names``: a ``class_name`` column right after ``class`` and the list in ``generation.json``; the images
    are those written without names. Names that miss a class id present in the inputs are refused before a file is
    written (an earlier set in the folder stays)."""
    named = generate(flow, None, _records(), output_dir=tmp_path / "n", model_version="v", seed=3, formats=("png",),
                     class_names=["non-COVID", "COVID, 19"])  # fmt: skip
    plain = generate(flow, None, _records(), output_dir=tmp_path / "p", model_version="v", seed=3, formats=("png",))
    rows, bare = _manifest(named), _manifest(plain)
    assert list(rows[0]) == ["index", "file", "class", "class_name", "temperature", "seed", "model_version", "mode",
                             "dp_epsilon"]  # fmt: skip
    assert [r["class_name"] for r in rows] == [["non-COVID", "COVID, 19"][int(r["class"])] for r in rows]
    assert {r["class_name"] for r in rows} == {"non-COVID", "COVID, 19"}  # a comma survives the CSV quoting
    assert [{k: v for k, v in r.items() if k != "class_name"} for r in rows] == bare
    assert all((tmp_path / "n" / r["file"]).read_bytes() == (tmp_path / "p" / r["file"]).read_bytes() for r in rows)
    assert json.loads((tmp_path / "n" / SUMMARY_NAME).read_text())["class_names"] == ["non-COVID", "COVID, 19"]
    assert json.loads((tmp_path / "p" / SUMMARY_NAME).read_text())["class_names"] is None
    before = sorted(f.name for f in (tmp_path / "n").iterdir())
    with pytest.raises(ValueError, match=r"inputs hold class id\(s\) \[1\]"):
        generate(flow, None, _records(), output_dir=tmp_path / "n", model_version="v", class_names=["only"])
    # a name -> id dict (read_class_folders' class_names) or a set has no id order; a string is not a list
    for bad in ("non-COVID", ["a", ""], ["a", 1], {"COVID": 1, "non-COVID": 0}, {"a", "b"}, 2):
        with pytest.raises(ValueError, match="class_names must be a list of non-empty names"):
            generate(flow, None, _records(), output_dir=tmp_path / "n", model_version="v", class_names=bad)
    assert sorted(f.name for f in (tmp_path / "n").iterdir()) == before
    assert not list(tmp_path.glob(".n.partial-*"))


def test_pairs_and_n_per_class_with_classifier(flow, tmp_path):
    torch.manual_seed(0)
    clf = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    manifest = generate(flow, clf, _records(4, with_condition=False), output_dir=tmp_path / "p", mode="pairs",
                        model_version="v", formats=("png",))  # fmt: skip
    rows = _manifest(manifest)
    assert len(rows) == 4 and "nifti_file" not in rows[0]
    pair = np.asarray(Image.open(tmp_path / "p" / rows[0]["pair_file"]))
    assert pair.shape == (S + 4, 2 * S + 6)  # original | synthetic with 2-px padding

    manifest = generate(flow, clf, _records(5, with_condition=False), output_dir=tmp_path / "n", mode="n_per_class",
                        n_per_class=4, model_version="v", formats=("nifti",), batch_size=3)  # fmt: skip
    rows = _manifest(manifest)
    assert [r["class"] for r in rows] == ["0"] * 4 + ["1"] * 4  # balanced although class 1 has only 2 inputs
    assert all(r["file"].endswith(".nii.gz") for r in rows)


def test_no_source_name_patient_id_or_tags_in_any_output(flow, tmp_path):
    """records whose source / patient_id carry a marker; no output byte, name, PNG chunk or NIfTI field has it."""
    out = tmp_path / "out"
    for mode in ("same_z", "pairs", "n_per_class"):
        count = 2 if mode == "n_per_class" else None
        generate(flow, None, _records(), output_dir=out / mode, mode=mode, n_per_class=count, model_version="v1")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        assert MARKER not in str(p.relative_to(tmp_path))
        raw = p.read_bytes()
        assert MARKER.encode() not in raw
        if p.suffix == ".gz":
            assert MARKER.encode() not in gzip.decompress(raw)
            header = nib.load(p).header
            assert header["descrip"].tobytes().rstrip(b"\0") == b"monai_condflow synthetic image"
            assert header["aux_file"].tobytes().strip(b"\0") == b"" and header["db_name"].tobytes().strip(b"\0") == b""
            assert header["intent_name"].tobytes().strip(b"\0") == b"" and not nib.load(p).header.extensions
        if p.suffix == ".png":
            img = Image.open(p)
            assert not getattr(img, "text", {}) and not {"exif", "icc_profile", "dpi"} & set(img.info)
    assert {p.name for p in files if p.suffix == ".csv"} == {"manifest.csv"}


def test_generated_nifti_and_png_reload_with_the_project_loader(flow, tmp_path):
    array = pytest.importorskip("monai_condflow.transforms.array")
    manifest = generate(flow, None, _records(2), output_dir=tmp_path, model_version="v")
    row = _manifest(manifest)[0]
    load = array.LoadCTSlice()
    png = np.asarray(load(str(tmp_path / row["file"]))).astype(np.float64) / 65535.0
    nii = np.asarray(load(str(tmp_path / row["nifti_file"])))
    assert png.shape == nii.shape == (1, S, S)
    np.testing.assert_allclose(nii, png, atol=1.0 / 65535)


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).random((1, 64, 64)),
        np.random.default_rng(1).normal(size=(48, 32)) * 1e6,  # out of range, not square
        np.zeros((1, 16, 16)),
        np.full((8, 8), np.nan),
        np.array([[np.inf, -np.inf, 0.5], [0.0, 1.0, -2.0]]),
        torch.rand(1, 7, 5, dtype=torch.float64),
    ],
)
def test_nifti_bytes_are_the_file_nibabel_writes(values):
    """The header is built once per shape: the whole file must still equal nibabel's for the image itself, whatever
    the values (nibabel would write a value-dependent field, e.g. a scale, into the header)."""
    arr = np.asarray(values, dtype=np.float32)
    stored = np.ascontiguousarray(arr.reshape(arr.shape[-2:]).T)
    img = nib.Nifti1Image(stored, affine=np.diag([-1.0, -1.0, 1.0, 1.0]))  # LPS: read back as the image itself
    img.header["descrip"] = b"monai_condflow synthetic image"
    img.header.set_xyzt_units("mm")
    data = nifti_bytes(values)
    assert data == gzip.compress(img.to_bytes(), mtime=0)
    back = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    np.testing.assert_array_equal(np.asarray(back.dataobj), stored)  # NaN in the same places
    assert back.shape == stored.shape


def test_nifti_bytes_refuses_fewer_than_two_dimensions():
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        nifti_bytes(np.zeros(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "bogus"}, "mode"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"formats": ("jpg",)}, "formats"),
        ({"mode": "n_per_class"}, "n_per_class"),
        ({"mode": "n_per_class", "n_per_class": 0}, "'n_per_class' must be an integer >= 1, got 0"),
        ({"mode": "n_per_class", "n_per_class": 2.5}, "'n_per_class' must be an integer >= 1, got 2.5"),
        ({"mode": "n_per_class", "n_per_class": True}, "'n_per_class' must be an integer >= 1, got True"),
        ({"n_per_class": 3}, "'n_per_class' is 3 but 'mode' is 'same_z'.*--mode n_per_class"),
        ({"mode": "pairs", "n_per_class": 3}, "'n_per_class' is 3 but 'mode' is 'pairs'"),
        ({"model_version": ""}, "model_version"),
    ],
)
def test_bad_settings_are_refused(flow, tmp_path, kwargs, match):
    args = {"output_dir": tmp_path / "out", "model_version": "v", **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(flow, None, _records(2), **args)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_paths_instead_of_tensors_are_refused(flow, tmp_path):
    with pytest.raises(ValueError, match="transform chain"):
        generate(flow, None, [{"image": "/x/a.png", "label": 0}], output_dir=tmp_path, model_version="v")
    with pytest.raises(KeyError, match="condition"):
        generate(flow, None, [{"image": torch.rand(1, S, S), "label": 0}], output_dir=tmp_path, model_version="v")


def _listed(manifest: Path) -> set[str]:
    names = {manifest.name, SUMMARY_NAME}  # the set: images, manifest and its pre-clamp summary
    for r in _manifest(manifest):
        names.update(r[k] for k in ("file", "nifti_file", "pair_file") if r.get(k))
    return names


def test_smaller_rerun_leaves_exactly_the_files_of_its_manifest(flow, tmp_path):
    """the folder and its manifest describe the same files after a smaller rerun (no stale images)."""
    out = tmp_path / "synthetic"
    generate(flow, None, _records(6), output_dir=out, model_version="v", seed=0)
    manifest = generate(flow, None, _records(3), output_dir=out, model_version="v", seed=1, formats=("png",))
    assert {p.name for p in out.iterdir()} == _listed(manifest) and len(_manifest(manifest)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


_KILLED_GENERATION = """
import os, sys
import torch
sys.path.insert(0, sys.argv[3])
import test_generation as T
import monai_condflow.engines.generation as gen
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
flow = ConditionalGlow.from_preset(
    "small", num_levels=2, image_size=T.S, num_steps=2, num_blocks=(1, 1), hidden_channels=8
)
flow.load_state_dict(torch.load(sys.argv[1], weights_only=True))
calls, real = [], gen.png16_bytes
def dying(image):
    calls.append(1)
    if len(calls) == 3:
        os._exit(9)  # like kill -9: no cleanup code runs
    return real(image)
gen.png16_bytes = dying
gen.generate(flow, None, T._records(4), output_dir=sys.argv[2], model_version="v2", seed=5, formats=("png",))
os._exit(0)
"""


def test_a_kill_mid_write_keeps_the_previous_set_and_the_next_run_cleans_up(flow, tmp_path):
    """kill -9 in the middle of writing a new set (a separate process that exits with os._exit while writing
    its third image, so no cleanup code runs): the folder still holds the previous set exactly as its manifest says;
    the next run removes the leftovers. (A fresh interpreter, not a fork: forking a process whose OpenMP pool is
    running can deadlock the child.)"""
    import subprocess
    import sys

    out = tmp_path / "synthetic"
    first = generate(flow, None, _records(6), output_dir=out, model_version="v", seed=0, formats=("png",))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = tmp_path / "flow.pt"
    torch.save(flow.state_dict(), weights)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", _KILLED_GENERATION, str(weights), str(out), str(Path(__file__).parent)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _listed(first) == set(before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".synthetic.partial-")]  # the killed run's leftover
    manifest = generate(flow, None, _records(4), output_dir=out, model_version="v2", seed=5, formats=("png",))
    assert {p.name for p in out.iterdir()} == _listed(manifest)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_z_file_index_is_not_the_source_position(flow, tmp_path):
    """A file's index is a shuffled position (keyed by seed and weights), not the input's index in the list."""
    records = _records(6)
    for i, r in enumerate(records):
        r["label"] = i  # class i identifies source i in the file name
    rows = _manifest(generate(flow, None, records, output_dir=tmp_path / "s", model_version="v", formats=("png",)))
    order = [int(r["class"]) for r in rows]
    assert sorted(order) == list(range(6)) and order != list(range(6))
    again = _manifest(generate(flow, None, records, output_dir=tmp_path / "t", model_version="v", formats=("png",)))
    assert [int(r["class"]) for r in again] == order  # reproducible with the same model and seed


def test_synthetic_files_get_normal_permissions(flow, tmp_path):
    old = os.umask(0o022)
    try:
        manifest = generate(flow, None, _records(2), output_dir=tmp_path / "s", model_version="v")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755
    assert {stat.S_IMODE((tmp_path / "s" / n).stat().st_mode) for n in _listed(manifest)} == {0o644}


def test_output_dir_with_foreign_files_a_file_or_read_only_is_refused(flow, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    # the message says which folder of a bundle run it is (the bundle's output_dir is its parent)
    with pytest.raises(ValueError, match=r"synthetic-set folder .*mine .*synthetic_dir.* holds files .*notes.txt"):
        generate(flow, None, _records(2), output_dir=mine, model_version="v")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile"):
        generate(flow, None, _records(2), output_dir=tmp_path / "afile", model_version="v")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match="locked"):
                generate(flow, None, _records(2), output_dir=locked / "s", model_version="v")
        finally:
            locked.chmod(0o755)


def test_a_dp_manifest_records_where_the_noise_came_from(flow, tmp_path):
    rows = _manifest(generate(flow, None, _records(2), output_dir=tmp_path / "d", model_version="v", dp_epsilon=3.5,
                              dp_noise="os_entropy", formats=("png",)))  # fmt: skip
    assert list(rows[0])[-2:] == ["dp_noise", "dp_epsilon"]
    assert {(r["dp_noise"], r["dp_epsilon"]) for r in rows} == {("os_entropy", "3.5")}


def test_overflowing_inverse_is_counted_before_clamping(flow, tmp_path, monkeypatch):
    """an inverse that returns NaN / 1e6 in some pixels shows up in the per-image counts and generation.json,
    although the written images are finite and in [0, 1]."""
    real_inverse = flow.inverse

    def broken_inverse(*args, **kwargs):
        x, logdet = real_inverse(*args, **kwargs)
        x = x.clone()
        x[0, 0, 0, :3] = 1e6  # image 0: 3 overflowed pixels
        x[2, 0, 1, :2] = float("nan")  # image 2: 2 non-finite pixels
        return x, logdet

    monkeypatch.setattr(flow, "inverse", broken_inverse)
    z = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    x, stats = generate_tensors(flow, z, 0.9, torch.Generator().manual_seed(1), return_stats=True)
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert stats["overflow_pixels"][0] >= 3 and stats["overflow_pixels"][2] >= 2
    assert stats["nonfinite_pixels"].tolist()[0] == 0 and stats["nonfinite_pixels"].tolist()[2] == 2

    manifest = generate(flow, None, _records(4), output_dir=tmp_path, model_version="v", formats=("png",))
    summary = json.loads((tmp_path / SUMMARY_NAME).read_text())
    samples = summary["samples"]
    assert samples["n_images"] == 4 and samples["images_with_nonfinite"] == 1
    assert samples["images_with_overflow"] >= 2 and samples["overflow_pixel_fraction"] >= 5 / (4 * S * S)
    assert samples["nonfinite_pixel_fraction"] == pytest.approx(2 / (4 * S * S))
    assert samples["range"] == [-0.25, 1.25]
    flagged = {e["index"]: e for e in summary["overflowed_images"]}
    assert flagged[2]["nonfinite_pixels"] == 2 and flagged[0]["overflow_pixels"] >= 3
    assert len(_manifest(manifest)) == 4


def test_flow_without_stats_is_counted_on_its_raw_output(tmp_path):
    """A sampler without ``return_stats`` (raw output, no own clamp): counted on what it returns."""

    class RawFlow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def sample(self, condition, temperature=0.9, generator=None):
            x = torch.full((condition.shape[0], 1, S, S), 0.5)
            x[0, 0, 0, 0] = -3.0
            x[1, 0, 0, 0] = float("inf")
            return x

    z = torch.zeros(3, 32)
    x, stats = generate_tensors(RawFlow(), z, 0.9, return_stats=True)
    assert stats["overflow_pixels"].tolist() == [1, 1, 0] and stats["nonfinite_pixels"].tolist() == [0, 1, 0]
    generate(RawFlow(), None, _records(3), output_dir=tmp_path, model_version="v", formats=("png",))
    samples = json.loads((tmp_path / SUMMARY_NAME).read_text())["samples"]
    assert samples == summarize_sample_stats([1, 1, 0], [0, 1, 0], S * S)


def test_generation_logs_progress_unless_switched_off(flow, tmp_path, caplog, monkeypatch):
    """Issue 16: counts and ETA for the generation loop; ``progress=False`` (bundle id) silences it."""
    import logging

    monkeypatch.delenv("CONDFLOW_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        generate(flow, None, _records(5), output_dir=tmp_path / "a", model_version="v", batch_size=2)
    assert "generation: 5/5 images (100 %)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        generate(flow, None, _records(5), output_dir=tmp_path / "b", model_version="v", batch_size=2, progress=False)
    assert "generation: " not in caplog.text


def test_writer_threads_write_the_same_files_and_manifest(flow, tmp_path):
    """4 writer threads and the calling thread alone give byte-identical files and manifests (pairs mode: three
    files per image, written out of order by the threads)."""
    runs = {}
    for threads in (1, 4):
        out = tmp_path / f"t{threads}"
        manifest = generate(flow, None, _records(6), output_dir=out, model_version="v", seed=2, mode="pairs",
                            writer_threads=threads)  # fmt: skip
        runs[threads] = {p.name: p.read_bytes() for p in out.iterdir()}
        assert {p.name for p in out.iterdir()} == _listed(manifest)
    assert runs[1] == runs[4] and len(runs[1]) == 6 * 3 + 2


def test_a_failing_write_in_a_writer_thread_is_raised_and_leaves_no_set(flow, tmp_path, monkeypatch):
    import monai_condflow.engines.generation as gen

    calls = []

    def full_disk(image):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return b"x"

    monkeypatch.setattr(gen, "png16_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        generate(flow, None, _records(6), output_dir=tmp_path / "s", model_version="v", formats=("png",),
                 writer_threads=3)  # fmt: skip
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())  # no set, no staging folder


def test_compile_decodes_through_the_compiled_steps_and_leaves_the_flow_as_it_was(flow, tmp_path, monkeypatch):
    """``compile=True`` (bundle id ``compile``): the steps' inverses run through ``torch.compile`` (here a backend
    that runs the traced graph as it is and counts it), the files equal the eager run's, and the caller's flow has no
    compiled steps afterwards; a flow that is already compiled keeps its own compiler."""
    from monai_condflow.networks.blocks.compiled_steps import compiled_steps

    traced, used = [], []
    real = ConditionalGlow.compile_steps

    def counting(self, enable=True, **kwargs):
        def backend(gm, example_inputs):
            traced.append(gm)
            return gm.forward

        real(self, enable, **({"backend": backend} if enable else {}), **kwargs)
        if enable:
            used.append(compiled_steps(self))
        return self

    monkeypatch.setattr(ConditionalGlow, "compile_steps", counting)
    torch._dynamo.reset()
    runs = {}
    for compile_ in (False, True):
        out = tmp_path / f"c{int(compile_)}"
        generate(flow, None, _records(6), output_dir=out, model_version="v", seed=2, formats=("png",),
                 compile=compile_)  # fmt: skip
        runs[compile_] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert runs[True] == runs[False]
    assert len(used) == 1 and used[0].calls == 4 and traced  # 2 levels x 2 steps, all through the compiled code
    assert compiled_steps(flow) is None
    flow.compile_steps(training=True, sampling=False)
    try:
        own = compiled_steps(flow)
        generate(flow, None, _records(2), output_dir=tmp_path / "own", model_version="v", compile=True)
        assert compiled_steps(flow) is own and own.calls == 0  # its training compiler kept, not replaced
    finally:
        real(flow, False)


@pytest.mark.parametrize("kwargs, match", [({"writer_threads": 0}, "writer_threads"),
                                           ({"cuda_graphs": "yes"}, "cuda_graphs"),
                                           ({"compile": 1}, "'compile'")])  # fmt: skip
def test_bad_writer_and_graph_settings_are_refused_by_name(flow, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(flow, None, _records(2), output_dir=tmp_path / "s", model_version="v", **kwargs)
