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
"""The synthetic-set writer without the sampler: encoding and writing files on ``writer_threads`` threads.

``generate`` hands each image to a pool of writer threads (``writer_threads``, the bundle id of ``generate.json``),
which encode it (16-bit PNG, gzipped NIfTI-1) and write it (new file, ``fsync``) in a staging folder. Threads help
only where the work releases the GIL. The peer is the NIfTI encoder of the package before the twenty-fourth session
(a ``nibabel.Nifti1Image`` per image, ``to_bytes``, gzip: about 1 ms of Python per image), measured in the same run
through the same writer; the package's encoder writes the same bytes from a header built once per shape. For each
format set and thread count, alternating repetitions of ``--images`` images (random 64 px slices in [0, 1]) through
``_FileWriter`` into a fresh folder; images/s is the median repetition. Last line ``BENCH_WRITER {json}``.

Usage::

    python benchmarks/bench_writer.py --images 2000 --threads 1,2,4 --reps 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_condflow.engines.generation import _FileWriter, nifti_bytes, png16_bytes  # noqa: E402


def nibabel_nifti_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """The peer: the package's NIfTI encoder before the twenty-fourth session (an image object per file), as it was."""
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    arr = np.ascontiguousarray(arr.reshape(arr.shape[-2:]).T)
    img = nib.Nifti1Image(arr, affine=np.diag([-1.0, -1.0, 1.0, 1.0]))  # the package's LPS affine (thirtieth session)
    img.header["descrip"] = b"monai_condflow synthetic image"
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), mtime=0)


ENCODERS: dict[str, dict[str, Callable]] = {
    "package": {"png": png16_bytes, "nifti": nifti_bytes},
    "peer": {"png": png16_bytes, "nifti": nibabel_nifti_bytes},
}
SUFFIX = {"png": ".png", "nifti": ".nii.gz"}


def write_set(images: list[torch.Tensor], formats: tuple[str, ...], threads: int, encoders: dict, root: Path) -> float:
    """Seconds to encode and write ``images`` in ``formats`` on ``threads`` threads (what ``generate`` does per
    image after sampling)."""
    target = Path(tempfile.mkdtemp(dir=root))
    try:
        t0 = time.perf_counter()
        files = _FileWriter(threads)
        try:
            for i, image in enumerate(images):
                for fmt in formats:
                    files.put(target / f"synthetic_{i:06d}{SUFFIX[fmt]}", encoders[fmt], image)
            files.finish()
        except BaseException:
            files.abort()
            raise
        seconds = time.perf_counter() - t0
        written = sum(1 for _ in target.iterdir())
    finally:
        shutil.rmtree(target, ignore_errors=True)
    if written != len(images) * len(formats):
        raise RuntimeError(f"wrote {written} files, expected {len(images) * len(formats)}")
    return seconds


def run(n_images: int, threads: list[int], reps: int, root: Path, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(1, 64, 64, generator=g) for _ in range(n_images)]
    same = all(nifti_bytes(im) == nibabel_nifti_bytes(im) for im in images[:50])
    rows = []
    for formats in (("nifti",), ("png", "nifti"), ("png",)):
        for t in threads:
            times: dict[str, list[float]] = {"package": [], "peer": []}
            for _ in range(reps):  # alternating, so drift on a shared machine hits both alike
                for name in ("package", "peer") if "nifti" in formats else ("package",):
                    times[name].append(write_set(images, formats, t, ENCODERS[name], root))
            row = {"formats": "+".join(formats), "threads": t}
            for name, ts in times.items():
                if ts:
                    row[f"{name}_img_s"] = round(n_images / sorted(ts)[len(ts) // 2], 1)
            if "peer_img_s" in row:
                row["ratio"] = round(row["package_img_s"] / row["peer_img_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"images": n_images, "reps": reps, "same_bytes_as_peer": same, "torch_threads": torch.get_num_threads(),
            "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", default="1,2,4", help="writer thread counts")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.reps < 1:
        parser.error("--images and --reps must be positive.")
    threads = [int(t) for t in args.threads.split(",") if t]
    if not threads or min(threads) < 1:
        parser.error(f"--threads: positive integers, got {args.threads!r}.")
    root = Path(tempfile.mkdtemp(prefix="bench_writer_", dir=args.dir))
    try:
        result = run(args.images, threads, args.reps, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"BENCH_WRITER {json.dumps(result)}", flush=True)
    return result


if __name__ == "__main__":
    main()
