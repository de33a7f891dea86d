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
"""Throughput of the pre-processing chain: 512x512 uint16 PNG (HU + 1024) -> 1x64x64 float32, lung-box crop.

Uses the COVID-CT-MD raw samples in ``../shared/data`` when present, else synthetic 512x512 uint16 PNGs written
to a temporary folder. Prints slices/s in the main process and through a DataLoader with 2 workers.

Usage::

    python benchmarks/bench_transforms.py [--repeats 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from monai.data import DataLoader, Dataset
from PIL import Image

from monai_condflow.transforms.chains import get_preprocess_transforms

__all__ = ["real_records", "synthetic_records", "main"]

logger = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw_samples" / "covid_ct_md"


def real_records() -> list[dict]:
    """Records of the COVID-CT-MD raw PNGs with their lung boxes (empty if the data is absent)."""
    ann = SHARED / "annotations_covidx_format.txt"
    if not ann.is_file():
        return []
    records = []
    for i, line in enumerate(ann.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) == 6:
            box = tuple(int(v) for v in parts[2:])
            records.append({"image": str(SHARED / parts[0]), "label": int(parts[1]), "box": box, "source": f"{i}"})
    return records


def synthetic_records(folder: Path, n: int = 24, seed: int = 0) -> list[dict]:
    """Write ``n`` synthetic 512x512 uint16 PNGs (HU + 1024: body ellipse, two darker lungs, noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) / 180.0) ** 2 + ((xx - 256) / 230.0) ** 2 <= 1
    lungs = (((yy - 250) / 110.0) ** 2 + ((xx - 170) / 70.0) ** 2 <= 1) | (
        ((yy - 250) / 110.0) ** 2 + ((xx - 342) / 70.0) ** 2 <= 1
    )
    records = []
    for i in range(n):
        hu = np.full((512, 512), -1024.0)
        hu[body] = 40.0
        hu[lungs] = -850.0
        hu += rng.normal(0, 20, hu.shape)
        path = folder / f"synthetic_{i:03d}.png"
        Image.fromarray(np.clip(hu + 1024, 0, 65535).astype(np.uint16)).save(path)
        records.append({"image": str(path), "label": i % 3, "box": (100, 140, 412, 360), "source": path.name})
    return records


def _rate(records: list[dict], repeats: int, workers: int) -> float:
    data = Dataset(records * repeats, transform=get_preprocess_transforms(image_size=64, crop="box"))
    loader = DataLoader(data, batch_size=16, num_workers=workers)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += int(batch["image"].shape[0])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="passes over the records per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second measurement")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        records = real_records()
        kind = "COVID-CT-MD raw samples"
        if not records:
            records, kind = synthetic_records(Path(tmp)), "synthetic 512x512 uint16 PNGs"
        print(f"{len(records)} x {args.repeats} slices ({kind}), 512x512 uint16 PNG -> 1x64x64, lung-box crop")
        print(f"main process (num_workers=0): {_rate(records, args.repeats, 0):8.1f} slices/s")
        print(f"DataLoader num_workers={args.workers}:    {_rate(records, args.repeats, args.workers):8.1f} slices/s")


if __name__ == "__main__":
    main()
