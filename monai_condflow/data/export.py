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
:func:`~monai_condflow.data.npz.load_npz_dataset`, :func:`~monai_condflow.data.readers.read_class_folders`,
:func:`~monai_condflow.data.readers.read_nifti_slices` or :func:`~monai_condflow.data.readers.read_dicom_folder`) into
a self-contained one. Command line, for the compact ``.npz`` files::

    python -m monai_condflow.data.export --npz ucsd_covid_ct_64.npz --out DIR
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from monai_condflow.data.errors import DataError
from monai_condflow.data.npz import class_names_from_npz, load_npz_dataset
from monai_condflow.data.phantom import HU_OFFSET  # HU images are stored as uint16 PNG with HU + HU_OFFSET
from monai_condflow.data.readers import NiftiSlice, validate_box
from monai_condflow.utils.io import atomic_write_bytes

__all__ = ["EXPORT_INTENSITIES", "COPIED_EXTENSIONS", "write_covidx_folder", "main"]

logger = logging.getLogger(__name__)

#: Ways :func:`write_covidx_folder` reads array intensities (see its ``intensity`` argument).
EXPORT_INTENSITIES: tuple[str, ...] = ("auto", "hu", "unit")
#: Path images with these endings are copied byte for byte (under a new name); other files are decoded and written
#: as PNG, so that no DICOM / NIfTI header (patient name, id, dates) reaches the exported folder.
COPIED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _encode(arr: np.ndarray, intensity: str, where: str) -> tuple[bytes, int]:
    """PNG bytes of a ``[H, W]`` / ``[1, H, W]`` image and the number of HU pixels clipped to fit uint16.

    uint8 / uint16 are written as they are (bool as uint8 0 / 1); floats in ``[0, 1]`` as 8 bit ``round(x * 255)``;
    HU (signed / wide integers, floats outside ``[0, 1]`` in ``"auto"``, every non-uint8/16 array in ``"hu"``) as
    uint16 ``round(HU) + 1024`` clipped to ``[0, 65535]``. This is the reading :class:`CTIntensity` ``"auto"`` makes
    of the same array, so the bundle sees the image it would have seen in memory (up to the 8-bit / 1 HU rounding).
    """
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise DataError(f"expected a [H, W] or [1, H, W] image, got shape {tuple(arr.shape)}.", where, "bad shape")
    clipped = 0
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype in (np.uint8, np.uint16):
        pass
    elif arr.dtype.kind in "fiu":
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            n_bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"image holds {n_bad} NaN / Inf pixel(s).", where, "non-finite")
        unit = arr.dtype.kind == "f" and float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0
        if intensity == "unit" and not unit:
            what = "float values" if arr.dtype.kind == "f" else f"{arr.dtype} values"
            raise DataError(
                f"intensity='unit' needs float images in [0, 1], got {what} in [{float(arr.min()):g}, "
                f"{float(arr.max()):g}]; pass intensity='hu' (or 'auto') for Hounsfield units.",
                where,
                "bad intensity",
            )
        if unit and intensity != "hu":
            arr = np.round(arr * 255).astype(np.uint8)
        else:
            stored = np.round(arr.astype(np.float64)) + HU_OFFSET
            clipped = int(((stored < 0) | (stored > 65535)).sum())
            arr = np.clip(stored, 0, 65535).astype(np.uint16)
    else:
        raise DataError(
            f"images must be numeric (uint8, uint16, HU integers or floats), got dtype {arr.dtype}.", where, "bad dtype"
        )
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue(), clipped


def _describe(image: object) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, NiftiSlice):
        return f"{image.file}#{image.index}"
    return f"{type(image).__name__} of shape {tuple(getattr(image, 'shape', ()))}"


def _source_key(image: object) -> tuple | None:
    """What identifies a record's pixels on disk (to find one image exported twice), ``None`` for arrays."""
    if isinstance(image, (str, os.PathLike)):
        return ("file", os.path.realpath(image))
    if isinstance(image, NiftiSlice):
        return ("nifti", os.path.realpath(image.file), image.axis, image.index, image.loader.orientation)
    return None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _load_path(file: str, where: str) -> np.ndarray:
    """Decode a DICOM / NIfTI / other image file the way the bundle's chain does (:class:`LoadCTSlice`)."""
    from monai_condflow.transforms.array import LoadCTSlice

    try:
        img = LoadCTSlice(check_exists=True)(file)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"cannot read image file {file}: {err}", where, "unreadable file") from err
    return np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)


def write_covidx_folder(
    splits: Mapping[str, Sequence[dict]],
    out_dir: str | os.PathLike,
    label_to_covidx: Mapping[int, int] | None = None,
    intensity: str = "auto",
) -> Path:
    """Write ``{split name: records}`` as ``out_dir/images/*`` plus ``out_dir/<split>.txt``.

    The folder is self-contained: every image is written into ``out_dir/images`` under a neutral name
    ``<split>_<index>.<ext>`` (no source file names, no patient ids) and the split files name them relative to
    ``images/``, as :func:`~monai_condflow.data.datalists.load_covidx_split` and the bundle configs require. Input
    files are only read.

    - Array images (``np.ndarray``, tensors, the :class:`~monai_condflow.data.readers.NiftiSlice` of
      :func:`~monai_condflow.data.readers.read_nifti_slices`) are written as PNG: uint8 / uint16 as they are; floats
      in ``[0, 1]`` as 8 bit (``round(x * 255)``); Hounsfield units (other integers, other floats) as 16-bit
      ``round(HU) + 1024`` clipped to ``[0, 65535]`` (HU below -1024, e.g. the padding outside the scanned circle,
      becomes -1024; a warning gives the count), which the default chain's ``"auto"`` intensity reads back as HU.
    - Path images ending in ``.png`` / ``.jpg`` / ``.jpeg`` are copied byte for byte; other files (DICOM, NIfTI) are
      decoded as the bundle's chain decodes them (DICOM in HU) and written as PNG as above, so no DICOM / NIfTI
      header reaches the folder.

    Every line is ``<file> <class> <xmin> <ymin> <xmax> <ymax>``, the box being the record's ``box`` (checked
    against the image) or the whole image. Files are written atomically; the split files are written after all
    images, so a failed export lists none of its images.

    Args:
        splits: e.g. ``{"train": [...], "val": [...], "test": [...]}`` (as
            :func:`~monai_condflow.data.splits.patient_disjoint_split` returns); records need ``image`` and
            ``label``.
        out_dir: destination folder (created); it must not hold the input images in its ``images`` folder.
        label_to_covidx: maps the records' labels to COVIDx CT class ids (0 normal, 1 pneumonia, 2 COVID-19);
            default: identity. For a binary non-COVID / COVID dataset use ``{0: 0, 1: 2}`` (with the identity, label
            1 would be written as pneumonia, which the default ``class_map`` ``"binary"`` reads as non-COVID).
        intensity: how array images that are not uint8 / uint16 are read: ``"auto"`` (floats in ``[0, 1]`` are
            intensities, anything else is HU), ``"hu"`` (always HU) or ``"unit"`` (floats must be in ``[0, 1]``).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: unknown ``intensity`` or a split name that is not a plain file name.
        DataError: naming the split, the record index and its ``source``: a record without ``image`` / ``label``, a
            label missing from ``label_to_covidx``, an image listed twice, an input inside ``out_dir/images``, an
            unreadable image, a bad shape / dtype, NaN / Inf, values that ``intensity`` refuses, or a bad box.
    """
    if intensity not in EXPORT_INTENSITIES:
        raise ValueError(f"intensity must be one of {EXPORT_INTENSITIES}, got {intensity!r}.")
    out = Path(out_dir)
    image_dir = out / "images"
    image_root = os.path.realpath(image_dir)
    mapping = dict(label_to_covidx) if label_to_covidx is not None else None
    # first pass: everything that can be checked without reading pixels, before any file is written
    seen: dict[tuple, str] = {}
    classes: set[int] = set()
    for name, records in splits.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise ValueError(f"split names must be plain file names (letters, digits, '_', '.', '-'), got {name!r}.")
        for i, record in enumerate(records):
            where = _where(name, i, record)
            if not isinstance(record, Mapping) or "image" not in record or "label" not in record:
                keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
                raise DataError(f"a record needs 'image' and 'label', got {keys}.", where, "malformed record")
            classes.add(_covidx_class(record["label"], mapping, where))
            key = _source_key(record["image"])
            if key is None:
                continue
            if _inside(key[1], image_root):
                raise DataError(
                    f"input image {key[1]} lies in the output image folder {image_dir}; export to another folder "
                    "(inputs are never overwritten).",
                    where,
                    "input inside output",
                )
            if key in seen:
                raise DataError(
                    f"image {_describe(record['image'])} is exported twice (first as {seen[key]}); a test image "
                    "listed in the training split would be trained on.",
                    where,
                    "duplicate image",
                )
            seen[key] = where
    if mapping is None and 1 in classes and classes <= {0, 1}:
        logger.warning(
            "labels are 0 / 1 and label_to_covidx is None: class 1 is pneumonia in COVIDx CT, which class_map "
            "'binary' (the bundle's default) reads as non-COVID; pass label_to_covidx={0: 0, 1: 2} for "
            "non-COVID / COVID-19 data."
        )
    image_dir.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    n_clipped, first_clipped = 0, None
    for name, records in splits.items():
        lines = []
        for i, record in enumerate(records):
            where = _where(name, i, record)
            cls = _covidx_class(record["label"], mapping, where)
            image = record["image"]
            if isinstance(image, (str, os.PathLike)) and os.fspath(image).lower().endswith(COPIED_EXTENSIONS):
                source = os.fspath(image)
                file = f"{name}_{i:06d}{Path(source).suffix.lower()}"
                try:
                    with Image.open(source) as im:
                        width, height = im.size
                    data = Path(source).read_bytes()
                except OSError as err:  # missing, unreadable or not an image (PIL's UnidentifiedImageError)
                    raise DataError(f"cannot read image file {source}: {err}", where, "unreadable file") from err
            else:
                if isinstance(image, (str, os.PathLike)):
                    arr = _load_path(os.fspath(image), where)
                else:
                    try:
                        arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
                    except Exception as err:  # e.g. a NiftiSlice whose volume has gone
                        raise DataError(f"cannot read image: {type(err).__name__}: {err}", where, "unreadable") from err
                file = f"{name}_{i:06d}.png"
                data, clipped = _encode(arr, intensity, where)
                if clipped:
                    n_clipped += clipped
                    first_clipped = first_clipped or where
                height, width = arr.shape[-2:]
            box = record.get("box")
            box = validate_box(box, height, width, where) if box is not None else (0, 0, width, height)
            atomic_write_bytes(image_dir / file, data)
            lines.append(f"{file} {cls} {' '.join(str(int(v)) for v in box)}")
        texts[name] = "\n".join(lines) + "\n"
    if n_clipped:
        logger.warning(
            "%d pixel(s) outside [-1024, 64511] HU were clipped to fit the uint16 PNGs (HU + 1024), first in %s; "
            "below -1024 HU (air) is usually the padding outside the scanned field.",
            n_clipped,
            first_clipped,
        )
    for name, text in texts.items():
        atomic_write_bytes(out / f"{name}.txt", text.encode())
        logger.info("wrote %d %s records to %s", len(splits[name]), name, out)
    return out


def _where(split: str, index: int, record: object) -> str:
    """Names a record in error messages: split, index and the record's ``source`` (or image)."""
    if isinstance(record, Mapping):
        source = record.get("source") or (_describe(record["image"]) if "image" in record else None)
        if source:
            return f"split {split!r} record {index} ({source})"
    return f"split {split!r} record {index}"


def _covidx_class(label: object, mapping: dict | None, where: str) -> int:
    try:
        value = int(label)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise DataError(f"label must be an integer, got {label!r}.", where, "bad label") from None
    if mapping is not None:
        if value not in mapping:
            raise DataError(
                f"label {value} is not in label_to_covidx (labels known: {sorted(mapping)}).", where, "unknown label"
            )
        value = int(mapping[value])
    if value < 0:
        raise DataError(f"COVIDx CT class id must be non-negative, got {value}.", where, "bad label")
    return value


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
