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
"""Readers that turn chest-CT datasets on disk into MONAI-style lists of records.

Every reader returns ``list[dict]``, one dict per 2-D slice, with the keys of ``docs/architecture.md``:
``image`` (a path, or a :class:`NiftiSlice` for NIfTI volumes: a float32 slice read when used), ``label``
(class id after the class map), ``box``
(optional lung box ``(xmin, ymin, xmax, ymax)``), ``patient_id`` (optional) and ``source`` (where the record
came from, for error messages).

Supported inputs:

- COVIDx CT annotation files (``<file> <class> <xmin> <ymin> <xmax> <ymax>`` per line):
  :func:`read_covidx_annotations`;
- one folder per class: :func:`read_class_folders`;
- NIfTI volumes listed in a CSV file: :func:`read_nifti_slices`;
- DICOM slices: :func:`read_dicom_slice` (pixels in HU) and :func:`read_dicom_folder` (records).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import EnsureChannelFirst, Orientation
from monai.utils import optional_import

from monai_condflow.data.errors import DataError, ReadReport, check_on_error
from monai_condflow.utils.loading import make_load_image

nib, _has_nib = optional_import("nibabel")
pydicom, _has_pydicom = optional_import("pydicom")

__all__ = [
    "CLASS_MAPS",
    "CLASS_NAMES",
    "COVIDX_PATIENT_PATTERN",
    "DEFAULT_PATIENT_PATTERN",
    "IMAGE_EXTENSIONS",
    "resolve_class_map",
    "parse_patient_id",
    "validate_box",
    "read_covidx_annotations",
    "read_class_folders",
    "read_nifti_slices",
    "radiological_display",
    "NiftiSlice",
    "NiftiVolumeLoader",
    "read_dicom_slice",
    "read_dicom_folder",
]

logger = logging.getLogger(__name__)

#: COVIDx CT class ids (0 normal, 1 pneumonia, 2 COVID-19) -> label, for the two class maps of the paper.
CLASS_MAPS: dict[str, dict[int, int]] = {"three": {0: 0, 1: 1, 2: 2}, "binary": {0: 0, 1: 0, 2: 1}}
#: Names of the labels produced by each class map, indexed by label.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "three": ("normal", "pneumonia", "COVID-19"),
    "binary": ("non-COVID", "COVID-19"),
}
#: COVIDx CT file names: ``NCP_<patient>_<scan>_<slice>.png`` (also ``CP_`` and ``Normal_``); patient = prefix + id.
COVIDX_PATIENT_PATTERN = r"^(?P<patient>(?:NCP|CP|Normal)_\d+)_\d+_\d+\.\w+$"
#: Other names: ``<letters><digits>_s<digits>`` or ``..._slice<digits>`` anywhere in the name, e.g.
#: ``phantom_p0012_s003.png`` -> ``p0012``, ``P001_slice026.png`` -> ``P001``, ``cap001_slice089.png`` -> ``cap001``.
DEFAULT_PATIENT_PATTERN = r"(?P<patient>[A-Za-z]*\d+)_s(?:lice)?\d+"
#: File name endings accepted by :func:`read_class_folders` (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")

_MISSING_DECODER_HINTS = ("missing dependencies", "plugins are missing", "pixel data handler", "image handler")


def resolve_class_map(class_map: str | Mapping[int, int]) -> dict[int, int]:
    """Turn a class-map argument into ``{raw class id: label}``.

    Args:
        class_map: ``"three"`` (0 normal, 1 pneumonia, 2 COVID-19), ``"binary"`` (normal and pneumonia -> 0,
            COVID-19 -> 1), or a mapping from raw class ids to labels (both non-negative ints).

    Returns:
        A new dict from raw class id to label.

    Raises:
        ValueError: for an unknown name or a mapping with non-integer / negative entries.
    """
    if isinstance(class_map, str):
        if class_map not in CLASS_MAPS:
            raise ValueError(f"class_map must be one of {sorted(CLASS_MAPS)} or a dict, got {class_map!r}.")
        return dict(CLASS_MAPS[class_map])
    if not isinstance(class_map, Mapping) or not class_map:
        raise ValueError(f"class_map must be one of {sorted(CLASS_MAPS)} or a non-empty dict, got {class_map!r}.")
    out: dict[int, int] = {}
    for key, value in class_map.items():
        if not _is_int(key) or not _is_int(value) or key < 0 or value < 0:
            raise ValueError(f"class_map entries must be non-negative ints, got {key!r}: {value!r}.")
        out[int(key)] = int(value)
    return out


def parse_patient_id(filename: str | os.PathLike, pattern: str | re.Pattern | None = None) -> str | None:
    """Patient id from a slice's file name.

    Args:
        filename: a file name or path (only the last component is used).
        pattern: a regular expression searched in the file name; the patient id is its group ``patient`` if it
            has one, else its first group, else the whole match. ``None`` tries :data:`COVIDX_PATIENT_PATTERN`
            then :data:`DEFAULT_PATIENT_PATTERN`.

    Returns:
        The patient id, or ``None`` when no pattern matches.

    Example::

        parse_patient_id("NCP_96_1328_0032.png")  # "NCP_96"
        parse_patient_id("phantom_p0012_s003.png")  # "p0012"
    """
    name = Path(filename).name
    patterns = [pattern] if pattern is not None else [COVIDX_PATIENT_PATTERN, DEFAULT_PATIENT_PATTERN]
    for pat in patterns:
        match = re.search(pat, name)
        if match is None:
            continue
        if "patient" in match.re.groupindex:
            return match.group("patient")
        return match.group(1) if match.re.groups else match.group(0)
    return None


def validate_box(
    box: Sequence[int], height: int | None = None, width: int | None = None, source: str | None = None
) -> tuple[int, int, int, int]:
    """Check a lung box ``(xmin, ymin, xmax, ymax)`` in pixel coordinates.

    The box covers ``image[ymin:ymax, xmin:xmax]`` (end exclusive), so ``xmax == width`` is allowed.

    Args:
        box: four integers.
        height: image height in pixels; when given, ``ymax <= height`` is checked.
        width: image width in pixels; when given, ``xmax <= width`` is checked.
        source: where the box comes from (``file:line``), put in front of the error message.

    Returns:
        The box as a tuple of Python ints.

    Raises:
        DataError: for a box that is not four integers, has negative coordinates, is empty or inverted
            (``xmax <= xmin`` or ``ymax <= ymin``) or reaches outside the image; the message has the numbers.
    """
    values = tuple(box)
    if len(values) != 4 or not all(_is_int(v) for v in values):
        raise DataError(f"lung box must be 4 integers (xmin, ymin, xmax, ymax), got {box!r}.", source, "bad box")
    xmin, ymin, xmax, ymax = (int(v) for v in values)
    if min(xmin, ymin, xmax, ymax) < 0:
        raise DataError(f"lung box {values} has negative coordinates.", source, "bad box")
    if xmax <= xmin or ymax <= ymin:
        raise DataError(
            f"lung box {values} is empty or inverted (needs xmax > xmin and ymax > ymin).", source, "bad box"
        )
    if (width is not None and xmax > width) or (height is not None and ymax > height):
        raise DataError(
            f"lung box {values} reaches outside the image of height {height} and width {width}.",
            source,
            "box out of image",
        )
    return xmin, ymin, xmax, ymax


def read_covidx_annotations(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    class_map: str | Mapping[int, int] = "three",
    on_error: str = "raise",
    check_files: bool = True,
    patient_pattern: str | re.Pattern | None = None,
    report: ReadReport | None = None,
) -> list[dict]:
    """Read a COVIDx CT annotation (split) file.

    Each non-empty line is ``<file> <class> <xmin> <ymin> <xmax> <ymax>`` separated by whitespace (file names
    without spaces); lines starting with ``#`` are comments. Classes are the COVIDx CT ids (0 normal,
    1 pneumonia, 2 COVID-19) and go through ``class_map``.

    Args:
        annotation_file: the text file, e.g. ``train_COVIDx_CT-1.txt``.
        image_dir: folder the file names are relative to; defaults to the annotation file's folder.
        class_map: ``"three"``, ``"binary"`` (normal + pneumonia -> 0, COVID-19 -> 1) or ``{class id: label}``;
            class ids not in the map are errors.
        on_error: ``"raise"`` raises :class:`DataError` at the first bad line; ``"skip"`` leaves bad lines out
            and logs a warning with the count per reason.
        check_files: check that every listed image exists (one ``stat`` per line).
        patient_pattern: regular expression for the patient id (see :func:`parse_patient_id`); ``None`` parses
            COVIDx CT names and ``<letters><digits>_s<digits>`` names. Records without a match get no
            ``patient_id``.
        report: filled in with the number of records read and the skipped lines.

    Returns:
        Records ``{"image": str, "label": int, "box": (xmin, ymin, xmax, ymax), "patient_id": str (when
        parsed), "source": "annotation_file:line"}`` in file order.

    Raises:
        FileNotFoundError: when ``annotation_file`` does not exist.
        DataError: (``on_error="raise"``) for a line that does not have 6 fields, non-integer fields, a class id
            not in the class map, a negative, empty or inverted box, a missing image, a file name that points
            outside ``image_dir`` (``../``, an absolute path elsewhere), the same image listed twice, or a line
            that is not valid UTF-8; the message starts with ``annotation_file:line``. Also when the file has no
            entries at all.

    Example::

        records = read_covidx_annotations("train_COVIDx_CT-1.txt", image_dir="2A_images", class_map="binary")
    """
    check_on_error(on_error)
    mapping = resolve_class_map(class_map)
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist.")
    root = Path(image_dir) if image_dir is not None else path.parent
    if check_files and not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (for {path}) does not exist.")
    local = ReadReport()
    records: list[dict] = []
    n_entries = 0
    first_line: dict[str, int] = {}
    with open(path, "rb") as handle:  # decoded line by line, so that a bad byte is reported with its line
        for line_no, raw in enumerate(handle, start=1):
            source = f"{path}:{line_no}"
            try:
                text = _decode_line(raw, source).strip()
                if not text or text.startswith("#"):
                    continue
                n_entries += 1
                record = _parse_annotation_line(text, source, root, mapping, check_files, patient_pattern)
                key = _inside(root, text.split()[0]) or record["image"]
                if key in first_line:
                    raise DataError(
                        f"image {record['image']} is listed again (first at line {first_line[key]}).",
                        source,
                        "duplicate line",
                    )
                first_line[key] = line_no
                records.append(record)
            except DataError as err:
                if err.reason == "bad encoding":
                    n_entries += 1
                if on_error == "raise":
                    raise
                local.add(err)
    if n_entries == 0:
        raise DataError("annotation file has no entries.", str(path), "empty file")
    return _finish(records, local, report, str(path))


def read_class_folders(
    root: str | os.PathLike,
    class_names: Sequence[str] | Mapping[str, int] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: str = "raise",
    patient_pattern: str | re.Pattern | None = None,
    report: ReadReport | None = None,
) -> list[dict]:
    """Read a tree with one sub-folder per class (``root/<class>/**/<image>``).

    Args:
        root: the folder holding one sub-folder per class.
        class_names: ``None`` uses every non-hidden sub-folder, with labels given by the sorted folder names;
            a list uses those folders with labels in list order; a dict maps folder names to labels (several
            folders may share a label).
        extensions: file name endings to keep (case-insensitive); other files are ignored.
        on_error: ``"raise"`` or ``"skip"`` for empty (0-byte) files.
        patient_pattern: regular expression for the patient id (see :func:`parse_patient_id`).
        report: filled in with the number of records read and the skipped files.

    Returns:
        Records ``{"image": str, "label": int, "patient_id": str (when parsed), "source": str}`` sorted by class
        folder (in label order, then name), then by relative path.

    Raises:
        FileNotFoundError: when ``root`` or a named class folder does not exist.
        DataError: when no image is found, or (``on_error="raise"``) for an empty file.
    """
    check_on_error(on_error)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"class folder root {base} does not exist.")
    if class_names is None:
        folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        mapping = {name: i for i, name in enumerate(folders)}
    elif isinstance(class_names, Mapping):
        mapping = {}
        for name, label in class_names.items():
            if not _is_int(label) or label < 0:
                raise ValueError(f"class_names labels must be non-negative ints, got {name!r}: {label!r}.")
            mapping[str(name)] = int(label)
    else:
        if isinstance(class_names, str):
            raise ValueError(f"class_names must be a list or dict of folder names, got the string {class_names!r}.")
        mapping = {str(name): i for i, name in enumerate(class_names)}
    if not mapping:
        raise DataError("no class sub-folders found.", str(base), "no classes")
    exts = tuple(e.lower() for e in extensions)
    local = ReadReport()
    records: list[dict] = []
    for name, label in sorted(mapping.items(), key=lambda item: (item[1], item[0])):
        folder = base / name
        if not folder.is_dir():
            raise FileNotFoundError(f"class folder {folder} (class {name!r}) does not exist.")
        files = sorted(
            (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        n_class = 0
        for file in files:
            if not file.name.lower().endswith(exts):
                continue
            try:
                if file.stat().st_size == 0:
                    raise DataError("file is empty (0 bytes).", str(file), "empty file")
            except DataError as err:
                if on_error == "raise":
                    raise
                local.add(err)
                continue
            records.append(_record(str(file), label, None, parse_patient_id(file, patient_pattern), str(file)))
            n_class += 1
        if n_class == 0:
            logger.warning("%s: class folder %r holds no image with an extension in %s.", base, name, exts)
    if not records and not local.skipped:
        raise DataError(f"no image with an extension in {exts} under the class folders.", str(base), "no images")
    return _finish(records, local, report, str(base))


def read_nifti_slices(
    csv_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    axis: int = 2,
    slice_range: tuple[int | None, int | None] | None = None,
    on_error: str = "raise",
    report: ReadReport | None = None,
    orientation: str | None = "RAS",
    radiological: bool = True,
) -> list[dict]:
    """Read NIfTI volumes listed in a CSV file as 2-D slices in Hounsfield units.

    The CSV has a header with columns ``image`` (path of the volume, relative to ``root``) and ``label``, and
    optionally ``slice`` and ``patient_id``. Without ``slice``, a row labels every slice of its volume (within
    ``slice_range``); with ``slice``, a row labels that one slice (empty ``slice`` cells label the whole volume).
    Volumes are read with MONAI's :class:`~monai.transforms.LoadImage` (nibabel; voxel values with ``scl_slope``
    / ``scl_inter`` applied, as float32) and turned to ``orientation`` with :class:`~monai.transforms.Orientation`
    (from the file's affine), so ``axis`` names the same anatomical direction whatever the storage order: with the
    default ``"RAS"``, axis 2 runs inferior -> superior (axial slices), and a volume stored LPS or with permuted
    axes gives the same slices as its RAS copy. Each volume is read once here to check it (3-D, finite, slice
    indices) and then released; the records hold :class:`NiftiSlice` references that read their slice when used
    (``np.asarray(record["image"])``), through a loader that keeps only the most recent volume. Memory is one
    volume, not the whole set; reading the records in order (as the preprocessing cache does) reads each volume
    once more.

    Args:
        csv_file: the CSV file.
        root: folder the ``image`` paths are relative to; defaults to the CSV file's folder.
        axis: voxel axis that is sliced (2 = the third voxel axis, axial for usual CT volumes).
        slice_range: ``(start, stop)`` with Python range semantics (``None`` for open ends, negative from the
            end), applied to whole-volume rows.
        on_error: ``"raise"`` or ``"skip"`` (bad rows and every row of an unreadable volume are left out).
        report: filled in with the number of records read and the skipped rows.
        orientation: axis codes the volumes are turned to before slicing (``"RAS"``, ``"LPS"``...), or ``None`` to
            slice the voxel axes in file order.
        radiological: show each (axial) slice as DICOM viewers and PNG exports do (:func:`radiological_display`:
            rows from anterior to posterior, columns from the patient's right to their left), so slices of NIfTI
            volumes look like those of DICOM / PNG files of the same scan (and like a 2-D NIfTI slice read by
            :class:`~monai_condflow.transforms.LoadCTSlice`). Needs an ``orientation`` whose ``axis`` runs S / I;
            ``False`` keeps the remaining axes in ``orientation`` order.

    Returns:
        One record per slice: ``{"image": NiftiSlice (float32 [H, W] when read), "label": int, "patient_id": str,
        "source": "volume#slice"}``; ``[H, W]`` as ``radiological`` says (else the two remaining axes in the
        ``orientation`` order, file order with ``None``). ``patient_id`` is the CSV value, or the volume path as
        written in the CSV when that is absent, so slices of one volume never land in different splits.

    Raises:
        FileNotFoundError: when ``csv_file`` does not exist.
        DataError: (``on_error="raise"``) for a missing column, bad label / slice value, a missing, truncated or
            unreadable volume, a volume that is not 3-D or holds NaN / Inf, or a slice index out of range; the
            message names the CSV line and the volume.
        ValueError: ``radiological`` without an orientation, or for an ``axis`` that is not axial.
    """
    check_on_error(on_error)
    if not _has_nib:
        raise ImportError("read_nifti_slices needs nibabel (pip install nibabel).")
    if isinstance(axis, bool) or axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be 0, 1 or 2 for a 3-D volume, got {axis!r}.")
    if slice_range is not None and len(slice_range) != 2:
        raise ValueError(f"slice_range must be (start, stop), got {slice_range!r}.")
    path = Path(csv_file)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    base = Path(root) if root is not None else path.parent
    local = ReadReport()
    records: list[dict] = []
    display = radiological_display(orientation, axis % 3) if radiological else None
    loader = NiftiVolumeLoader(orientation)
    volumes: dict[Path, tuple[int, ...] | DataError] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("image", "label") if c not in columns]
        if missing:
            raise DataError(f"CSV header {columns} lacks column(s) {missing}.", f"{path}:1", "bad header")
        reader.fieldnames = columns
        for row in reader:
            source = f"{path}:{reader.line_num}"
            try:
                records.extend(_nifti_row(row, source, base, axis, slice_range, volumes, loader, display))
            except DataError as err:
                if on_error == "raise":
                    raise
                local.add(err)
    if not records and not local.skipped:
        raise DataError("CSV file lists no volume.", str(path), "empty file")
    return _finish(records, local, report, str(path))


def read_dicom_slice(path: str | os.PathLike) -> np.ndarray:
    """Read one DICOM slice as a float32 array in Hounsfield units.

    Uses MONAI's :class:`monai.data.PydicomReader`, which applies ``RescaleSlope`` / ``RescaleIntercept``.
    Compressed transfer syntaxes (e.g. JPEG lossless) need ``pylibjpeg`` + ``pylibjpeg-libjpeg`` (or GDCM).

    Args:
        path: the ``.dcm`` file.

    Returns:
        float32 array ``[H, W]`` (rows, columns, as stored).

    Raises:
        DataError: naming the file when it is missing, not DICOM, its pixel data cannot be decoded (with an
            installation hint when a decoder plugin is missing), it is not a single 2-D frame, or it holds
            NaN / Inf.
        ImportError: when pydicom is not installed.
    """
    if not _has_pydicom:
        raise ImportError("read_dicom_slice needs pydicom (pip install pydicom pylibjpeg pylibjpeg-libjpeg).")
    from monai.data import PydicomReader

    file = Path(path)
    if not file.is_file():
        raise DataError("DICOM file does not exist.", str(file), "missing file")
    reader = PydicomReader(swap_ij=False)
    try:
        dataset = reader.read(str(file))
    except Exception as err:  # pydicom raises InvalidDicomError, OSError, ... on bad files
        raise DataError(
            f"not a readable DICOM file ({type(err).__name__}: {err}).", str(file), "unreadable file"
        ) from err
    try:
        array, _ = reader.get_data(dataset)
    except Exception as err:  # decoder errors are RuntimeError / ValueError / AttributeError depending on pydicom
        message = str(err)
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax)
        if any(hint in message.lower() for hint in _MISSING_DECODER_HINTS):
            raise DataError(
                f"cannot decode pixel data with transfer syntax {syntax_name!r}: a decoder plugin is missing; "
                f"install pylibjpeg and pylibjpeg-libjpeg (or python-gdcm). ({type(err).__name__}: {message})",
                str(file),
                "missing decoder",
            ) from err
        raise DataError(
            f"cannot read pixel data (transfer syntax {syntax_name!r}; {type(err).__name__}: {message}).",
            str(file),
            "unreadable file",
        ) from err
    image = np.asarray(array, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise DataError(
            f"expected one 2-D frame, got pixel array of shape {tuple(image.shape)}.", str(file), "bad shape"
        )
    if not np.isfinite(image).all():
        raise DataError("pixel data holds NaN or Inf.", str(file), "non-finite")
    return np.ascontiguousarray(image)


def read_dicom_folder(
    root: str | os.PathLike,
    labels: Mapping[str, int] | Callable[[Path], int],
    extensions: Sequence[str] = (".dcm",),
    read_patient_id: bool = True,
    patient_pattern: str | re.Pattern | None = None,
    on_error: str = "raise",
    report: ReadReport | None = None,
) -> list[dict]:
    """Records for every DICOM file under a folder (pixels are read later, e.g. by the transform chain).

    Args:
        root: folder searched recursively.
        labels: a dict from the first folder below ``root`` (e.g. ``"COVID-19"``) to the label, or a callable
            taking the file path and returning the label.
        extensions: file name endings to keep (case-insensitive).
        read_patient_id: read the ``PatientID`` tag from the header (pixel data is not read); otherwise, or when
            the tag is empty, the id is parsed from the file name with ``patient_pattern``.
        patient_pattern: see :func:`parse_patient_id`.
        on_error: ``"raise"`` or ``"skip"`` for files without a label or with an unreadable header.
        report: filled in with the number of records read and the skipped files.

    Returns:
        Records ``{"image": str, "label": int, "patient_id": str (when known), "source": str}`` sorted by
        relative path.

    Raises:
        FileNotFoundError: when ``root`` does not exist.
        DataError: when no file is found, or (``on_error="raise"``) for a file whose label is unknown or whose
            header cannot be read.
    """
    check_on_error(on_error)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"DICOM folder {base} does not exist.")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        (p for p in base.rglob("*") if p.is_file() and p.name.lower().endswith(exts)),
        key=lambda p: p.relative_to(base).as_posix(),
    )
    if not files:
        raise DataError(f"no file with an extension in {exts}.", str(base), "no images")
    local = ReadReport()
    records: list[dict] = []
    for file in files:
        try:
            records.append(_dicom_record(file, base, labels, read_patient_id, patient_pattern))
        except DataError as err:
            if on_error == "raise":
                raise
            local.add(err)
    return _finish(records, local, report, str(base))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _record(image: object, label: int, box: tuple | None, patient_id: str | None, source: str) -> dict:
    record: dict = {"image": image, "label": int(label)}
    if box is not None:
        record["box"] = box
    if patient_id:
        record["patient_id"] = str(patient_id)
    record["source"] = source
    return record


def _finish(records: list[dict], local: ReadReport, report: ReadReport | None, what: str) -> list[dict]:
    local.n_read = len(records)
    local.log_summary(logger, what)
    if report is not None:
        report.merge(local)
    return records


def _parse_int(token: str, what: str, source: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataError(f"{what} must be an integer, got {token!r}.", source, "non-integer field") from None


def _decode_line(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"line is not valid UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); save the file as "
            "UTF-8.",
            source,
            "bad encoding",
        ) from None


def _inside(root: Path, name: str) -> str | None:
    """The normalised path of ``root / name`` when it stays inside ``root`` (no ``..`` escape, no absolute path
    elsewhere; checked on the names, so a dataset of symbolic links still works), else ``None``."""
    base = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(base, name))
    if joined == base or os.path.commonpath([base, joined]) != base:
        return None
    return joined


def _parse_annotation_line(
    text: str,
    source: str,
    root: Path,
    mapping: dict[int, int],
    check_files: bool,
    patient_pattern: str | re.Pattern | None,
) -> dict:
    fields = text.split()
    if len(fields) != 6:
        raise DataError(
            f"expected 6 fields '<file> <class> <xmin> <ymin> <xmax> <ymax>', got {len(fields)}: {text!r}.",
            source,
            "malformed line",
        )
    name = fields[0]
    class_id = _parse_int(fields[1], "class id", source)
    box = tuple(_parse_int(tok, what, source) for tok, what in zip(fields[2:], ("xmin", "ymin", "xmax", "ymax")))
    if class_id not in mapping:
        raise DataError(
            f"class id {class_id} is not in the class map (known ids: {sorted(mapping)}).", source, "unknown class"
        )
    box = validate_box(box, source=source)
    if _inside(root, name) is None:
        raise DataError(
            f"image path {name!r} points outside the image folder {root} ('..' or an absolute path elsewhere); "
            "annotation paths must stay inside the image folder.",
            source,
            "path outside image folder",
        )
    image = root / name
    if check_files and not image.is_file():
        raise DataError(f"image file {image} does not exist.", source, "missing file")
    return _record(str(image), mapping[class_id], box, parse_patient_id(name, patient_pattern), source)


class NiftiVolumeLoader:
    """Reads NIfTI volumes through MONAI: :class:`~monai.transforms.LoadImage` (nibabel, float32, scaling
    applied), :class:`~monai.transforms.EnsureChannelFirst` and :class:`~monai.transforms.Orientation`.

    Keeps the most recent volume only, so that slices read in volume order cost one read per volume and memory
    stays at one volume. Picklable (the cache is not pickled), so records can go to ``DataLoader`` workers.

    Args:
        orientation: axis codes (``"RAS"``...) or ``None`` for the file's voxel order.
    """

    def __init__(self, orientation: str | None = "RAS") -> None:
        self.orientation = orientation
        self._setup()

    def _setup(self) -> None:
        self._load = make_load_image(reader="NibabelReader", image_only=True, dtype=np.float32)
        self._channel_first = EnsureChannelFirst(channel_dim="no_channel")
        self._orient = Orientation(axcodes=self.orientation, labels=None) if self.orientation else None
        self._cached: tuple[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"orientation": self.orientation}

    def __setstate__(self, state: dict) -> None:
        self.orientation = state["orientation"]
        self._setup()

    def read(self, file: str | os.PathLike) -> np.ndarray:
        """The volume as a float32 array (trailing singleton axes dropped; oriented when it is 3-D).

        Raises:
            Exception: whatever MONAI / nibabel raise for a missing, truncated or unreadable file.
        """
        key = os.fspath(file)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # release the previous volume before reading the next
        img = self._load(key)
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim == 3 and self._orient is not None:
            img = self._orient(self._channel_first(img))[0]
        volume = np.ascontiguousarray(np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img))
        volume = volume.astype(np.float32, copy=False)
        self._cached = (key, volume)
        return volume


class NiftiSlice:
    """One 2-D slice of a NIfTI volume, read when used: ``np.asarray(s)`` is the float32 ``[H, W]`` slice.

    Records of :func:`read_nifti_slices` hold these instead of arrays, so listing a dataset does not keep its
    volumes in memory. ``shape``, ``dtype`` and ``ndim`` are known without reading; ``str(s)`` names the file,
    axis, index, orientation and the file's size and modification time (what the preprocessing cache keys on).

    Args:
        loader: the volume loader (shared by the slices of one listing).
        file: the volume.
        axis: sliced axis (after orientation).
        index: slice index along ``axis``.
        shape: ``(H, W)`` of the slice.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(
        self,
        loader: NiftiVolumeLoader,
        file: str | os.PathLike,
        axis: int,
        index: int,
        shape: tuple,
        display: tuple[bool, bool, bool] | None = None,
    ) -> None:
        self.loader = loader
        self.file = os.fspath(file)
        self.axis = int(axis)
        self.index = int(index)
        self.display = None if display is None else tuple(bool(v) for v in display)
        plane = tuple(int(s) for s in shape)
        self.shape = plane[::-1] if self.display is not None and self.display[0] else plane
        try:
            st = os.stat(self.file)
            self._stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            self._stamp = "?"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = np.take(self.loader.read(self.file), self.index, axis=self.axis)
        if self.display is not None:
            transpose, flip_rows, flip_cols = self.display
            arr = arr.T if transpose else arr
            arr = arr[::-1] if flip_rows else arr
            arr = arr[:, ::-1] if flip_cols else arr
        arr = np.ascontiguousarray(arr)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        steps = "" if self.display is None else "".join("TRC"[i] for i, v in enumerate(self.display) if v)
        shown = "" if self.display is None else f", display {steps or '-'}"
        return (
            f"NiftiSlice({self.file}#{self.index}, axis {self.axis}, {self.loader.orientation}{shown}, {self._stamp})"
        )


def radiological_display(orientation: str | None, axis: int) -> tuple[bool, bool, bool]:
    """How to show an axial slice of a volume turned to ``orientation`` as a DICOM viewer (and a PNG export) shows
    it: rows from anterior to posterior, columns from the patient's right to their left.

    Args:
        orientation: the volume's axis codes (e.g. ``"RAS"``, ``"LPS"``).
        axis: the sliced axis; its code must be ``S`` or ``I``.

    Returns:
        ``(transpose, flip_rows, flip_cols)``, applied to the ``[first, second]`` remaining axes in that order.

    Raises:
        ValueError: no orientation, or ``axis`` does not run inferior / superior (not an axial slice).
    """
    codes = (orientation or "").upper()
    if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in ("LR", "AP", "SI")):
        raise ValueError(
            f"radiological display needs the volume's orientation as 3 axis codes (e.g. 'RAS'), got {orientation!r}; "
            "pass radiological=False to keep the voxel order."
        )
    if codes[axis] not in "SI":
        axial = next(i for i, c in enumerate(codes) if c in "SI")
        raise ValueError(
            f"radiological display is for axial slices, but axis {axis} of orientation {orientation!r} runs "
            f"{codes[axis]}; slice the axis that runs S / I (axis={axial}) or pass radiological=False."
        )
    first, second = (c for i, c in enumerate(codes) if i != axis)
    transpose = second in "AP"  # rows must follow the anterior-posterior axis
    ap, lr = (second, first) if transpose else (first, second)
    return transpose, ap == "A", lr == "R"


def _check_volume(file: Path, source: str, cache: dict, loader: NiftiVolumeLoader) -> tuple[int, ...]:
    """Shape of the (oriented) volume, checked once per file; errors re-raised with each row's source."""
    if file not in cache:
        try:
            cache[file] = _read_volume(file, source, loader)
        except DataError as err:
            cache[file] = err
    found = cache[file]
    if isinstance(found, DataError):
        # re-raise with this row's source so every affected CSV line is named
        raise DataError(found.detail, source, found.reason)
    return found


def _read_volume(file: Path, source: str, loader: NiftiVolumeLoader) -> tuple[int, ...]:
    if not file.is_file():
        raise DataError(f"volume {file} does not exist.", source, "missing file")
    try:
        volume = loader.read(file)
    except Exception as err:  # MONAI / nibabel raise RuntimeError, ImageFileError, EOFError, OSError, zlib.error ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"volume {file} is truncated or unreadable ({type(err).__name__}: {first})", source, "unreadable file"
        ) from err
    if volume.ndim != 3:
        raise DataError(f"volume {file} must be 3-D, got shape {tuple(volume.shape)}.", source, "bad shape")
    if not np.isfinite(volume).all():
        n_bad = int((~np.isfinite(volume)).sum())
        raise DataError(f"volume {file} holds {n_bad} NaN / Inf voxels.", source, "non-finite")
    return tuple(int(s) for s in volume.shape)


def _nifti_row(
    row: dict,
    source: str,
    base: Path,
    axis: int,
    slice_range: tuple[int | None, int | None] | None,
    cache: dict,
    loader: NiftiVolumeLoader,
    display: tuple[bool, bool, bool] | None = None,
) -> list[dict]:
    name = (row.get("image") or "").strip()
    if not name:
        raise DataError("empty 'image' cell.", source, "malformed line")
    label = _parse_int((row.get("label") or "").strip(), "label", source)
    if label < 0:
        raise DataError(f"label must be non-negative, got {label}.", source, "bad label")
    slice_text = (row.get("slice") or "").strip()
    patient_id = (row.get("patient_id") or "").strip() or name
    file = base / name
    shape = _check_volume(file, source, cache, loader)
    axis = axis % 3
    size = shape[axis]
    if slice_text:
        index = _parse_int(slice_text, "slice", source)
        if not 0 <= index < size:
            raise DataError(
                f"slice {index} is out of range for volume {file} with {size} slices along axis {axis}.",
                source,
                "bad slice",
            )
        indices = [index]
    else:
        start, stop = slice_range if slice_range is not None else (None, None)
        indices = list(range(size))[slice(start, stop)]
        if not indices:
            raise DataError(
                f"slice_range {slice_range} selects no slice of volume {file} ({size} slices along axis {axis}).",
                source,
                "bad slice",
            )
    plane = tuple(s for i, s in enumerate(shape) if i != axis)
    return [
        _record(NiftiSlice(loader, file, axis, k, plane, display), label, None, patient_id, f"{file}#{k}")
        for k in indices
    ]


def _dicom_record(
    file: Path,
    base: Path,
    labels: Mapping[str, int] | Callable[[Path], int],
    read_patient_id: bool,
    patient_pattern: str | re.Pattern | None,
) -> dict:
    rel = file.relative_to(base)
    if callable(labels):
        label = labels(file)
        if not _is_int(label) or label < 0:
            raise DataError(f"labels callable returned {label!r}, expected a non-negative int.", str(file), "no label")
    else:
        key = rel.parts[0] if len(rel.parts) > 1 else ""
        if key not in labels:
            where = f"folder {key!r}" if key else f"a file directly in {base} (not in a class sub-folder)"
            raise DataError(
                f"no label for {where}; labels are known for the sub-folders {sorted(labels)}. Put each class's "
                "files in a sub-folder named in labels, or pass labels as a callable that takes the file's path "
                "and returns its class id (e.g. from a table of your own).",
                str(file),
                "no label",
            )
        label = labels[key]
    patient_id = None
    if read_patient_id:
        if not _has_pydicom:
            raise ImportError("read_dicom_folder(read_patient_id=True) needs pydicom.")
        try:
            header = pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception as err:  # InvalidDicomError, OSError, ...
            raise DataError(
                f"not a readable DICOM file ({type(err).__name__}: {err}).", str(file), "unreadable file"
            ) from err
        patient_id = str(getattr(header, "PatientID", "") or "") or None
    if patient_id is None:
        patient_id = parse_patient_id(file, patient_pattern)
    return _record(str(file), int(label), None, patient_id, str(file))
