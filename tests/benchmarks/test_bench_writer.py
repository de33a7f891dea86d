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
"""benchmarks/bench_writer.py: both encoders write every file through the package's writer, the package's NIfTI bytes
equal the peer's, and each row reports both rates and their ratio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_writer")


def test_write_set_writes_every_file_and_passes_encoder_errors_on(bench, tmp_path: Path):
    images = [torch.rand(1, 16, 16) for _ in range(5)]
    seen = []

    def spy(fmt):
        def encode(image):
            seen.append(fmt)
            return bench.ENCODERS["package"][fmt](image)

        return encode

    assert bench.write_set(images, ("png", "nifti"), 2, {f: spy(f) for f in ("png", "nifti")}, tmp_path) > 0
    assert sorted(seen) == ["nifti"] * 5 + ["png"] * 5
    assert list(tmp_path.iterdir()) == []  # the set's folder is removed after counting

    def broken(image):
        raise ValueError("encoder failed")

    with pytest.raises(ValueError, match="encoder failed"):
        bench.write_set(images, ("nifti",), 2, {"nifti": broken}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # removed after a failure too


def test_the_run_reports_both_encoders_and_the_same_bytes(bench, tmp_path: Path, capsys):
    result = bench.main(["--images", "12", "--threads", "1,2", "--reps", "1", "--dir", str(tmp_path)])
    assert result["same_bytes_as_peer"] is True and result["images"] == 12
    rows = {(r["formats"], r["threads"]): r for r in result["rows"]}
    assert set(rows) == {(f, t) for f in ("nifti", "png+nifti", "png") for t in (1, 2)}
    for (formats, _), r in rows.items():
        assert r["package_img_s"] > 0
        if "nifti" in formats:
            assert r["peer_img_s"] > 0 and r["ratio"] == pytest.approx(r["package_img_s"] / r["peer_img_s"], abs=0.01)
        else:
            assert "peer_img_s" not in r  # the PNG encoder is the same for both
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("BENCH_WRITER ") and json.loads(out[-1].split(" ", 1)[1]) == result
    assert list(tmp_path.iterdir()) == []
    image = np.random.default_rng(0).random((1, 64, 64))
    assert bench.nibabel_nifti_bytes(image) == bench.ENCODERS["package"]["nifti"](image)
