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
"""Write records as a COVIDx-CT-format folder (images + one annotation file per split).

The bundle configs read COVIDx-CT-format folders; this turns any records (e.g. from
:func:`~monai_condflow.data.npz.load_npz_dataset`, :func:`~monai_condflow.data.readers.read_class_folders` or
:func:`~monai_condflow.data.readers.read_nifti_slices`) into one. Command line, for the compact ``.npz`` files::

    python -m monai_condflow.data.export --npz ucsd_covid_ct_64.npz --out DIR
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from monai_condflow.data.npz import class_names_from_npz, load_npz_dataset
from monai_condflow.utils.io import atomic_write_bytes

__all__ = ["write_covidx_folder", "main"]

logger = logging.getLogger(__name__)


def _png_bytes(image: np.ndarray) -> bytes:
    arr = np.asarray(image)
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"expected a [H, W] or [1, H, W] image, got shape {arr.shape}.")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float images must be finite and in [0, 1].")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"images must be float in [0, 1], uint8 or uint16, got {arr.dtype}.")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_covidx_folder(
    splits: Mapping[str, Sequence[dict]],
    out_dir: str | os.PathLike,
    label_to_covidx: Mapping[int, int] | None = None,
) -> Path:
    """Write ``{split name: records}`` as ``out_dir/images/*.png`` plus ``out_dir/<split>.txt``.

    Array images are written as PNG (float in [0, 1] -> 8 bit, uint8 / uint16 as they are) named
    ``<split>_<index>.png`` (no source names, no patient ids); path images are referenced by absolute path.
    Every line is ``<file> <class> <xmin> <ymin> <xmax> <ymax>``, the box being the record's ``box`` or the whole
    image. Files are written atomically.

    Args:
        splits: e.g. ``{"train": [...], "val": [...], "test": [...]}``.
        out_dir: destination folder (created).
        label_to_covidx: maps the records' labels to COVIDx CT class ids (0 normal, 1 pneumonia, 2 COVID-19);
            default: identity. For a binary non-COVID / COVID dataset use ``{0: 0, 1: 2}``.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    mapping = dict(label_to_covidx) if label_to_covidx is not None else None
    for name, records in splits.items():
        lines = []
        for i, record in enumerate(records):
            label = int(record["label"])
            cls = mapping[label] if mapping is not None else label
            image = record["image"]
            if isinstance(image, (str, os.PathLike)):
                file = str(Path(image).resolve())
                box = record.get("box")
                if box is None:
                    with Image.open(file) as im:
                        box = (0, 0, im.width, im.height)
            else:
                arr = np.asarray(image)
                file = f"{name}_{i:06d}.png"
                atomic_write_bytes(out / "images" / file, _png_bytes(arr))
                h, w = arr.shape[-2:]
                box = record.get("box") or (0, 0, w, h)
            lines.append(f"{file} {cls} {' '.join(str(int(v)) for v in box)}")
        atomic_write_bytes(out / f"{name}.txt", ("\n".join(lines) + "\n").encode())
        logger.info("wrote %d %s records to %s", len(records), name, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_condflow.data.export",
        description="Write a compact .npz dataset (images, labels, official_split) as a COVIDx-CT-format folder "
        "(images/*.png plus train.txt, val.txt, test.txt) that the bundle configs read.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--npz", required=True, type=Path, help=".npz with images, labels and official_split")
    parser.add_argument("--out", required=True, type=Path, help="destination folder")
    parser.add_argument(
        "--covid-label", type=int, default=None, help="label of COVID-19 in the npz (binary sets: maps it to class 2)"
    )
    args = parser.parse_args(argv)
    names = [n.lower() for n in class_names_from_npz(args.npz)]
    covid = args.covid_label
    if covid is None and len(names) == 2:
        covid = next((i for i, n in enumerate(names) if "covid" in n and "non" not in n), 1)
    mapping = {1 - covid: 0, covid: 2} if len(names) == 2 else None
    splits = {s: load_npz_dataset(args.npz, split=s) for s in ("train", "val", "test")}
    write_covidx_folder(splits, args.out, mapping)
    print(f"wrote {', '.join(f'{k} {len(v)}' for k, v in splits.items())} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
