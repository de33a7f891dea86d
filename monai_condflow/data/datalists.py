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
"""Data lists of a COVIDx-CT-format dataset folder, as the bundle configs read them.

A dataset folder holds the images (in ``images/`` or any folder given as ``image_dir``) and one annotation file
per split (``train.txt``, ``val.txt``, ``test.txt`` by default; COVIDx CT's own ``train_COVIDx_CT-1.txt`` ... work
through the file-name arguments).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from monai_condflow.data.errors import DataError, ReadReport, check_on_error
from monai_condflow.data.readers import read_covidx_annotations, resolve_class_map
from monai_condflow.data.splits import sample_labelled_subset
from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.fingerprint import transform_fingerprint
from monai_condflow.utils.io import atomic_write_bytes

__all__ = [
    "load_covidx_split",
    "check_splits",
    "parse_num_labels",
    "check_num_labels",
    "check_shared_images",
    "select_labelled",
    "preprocess_cached",
]

logger = logging.getLogger(__name__)


def load_covidx_split(
    dataset_dir: str | os.PathLike,
    split_file: str = "train.txt",
    image_dir: str | os.PathLike | None = None,
    class_map: str | dict = "binary",
    on_error: str = "raise",
) -> list[dict]:
    """Read one split of a COVIDx-CT-format folder.

    Args:
        dataset_dir: the dataset folder.
        split_file: annotation file name inside ``dataset_dir`` (or an absolute path).
        image_dir: folder the annotation's file names are relative to; default ``dataset_dir/images`` when that
            folder exists, else ``dataset_dir``.
        class_map: ``"binary"`` (non-COVID vs COVID-19, as the paper), ``"three"`` or an explicit mapping.
        on_error: ``"raise"`` or ``"skip"`` (skip-and-log bad lines).

    Raises:
        FileNotFoundError: naming the missing folder or annotation file and what it should contain.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset_dir {root} does not exist: give a COVIDx-CT-format folder (images + train.txt/val.txt/test.txt),"
            " or generate the phantom with `python -m monai_condflow.data.phantom --out DIR`."
        )
    ann = Path(split_file) if Path(split_file).is_absolute() else root / split_file
    if not ann.is_file():
        raise FileNotFoundError(
            f"annotation file {ann} does not exist (dataset_dir={root}, split file {split_file!r})."
        )
    if image_dir is None:
        image_dir = root / "images" if (root / "images").is_dir() else root
    records = read_covidx_annotations(ann, image_dir=image_dir, class_map=class_map, on_error=on_error)
    logger.info("read %d records from %s", len(records), ann)
    return records


def _listed_images(ann: Path, root: Path) -> dict[str, tuple[int, int | None]]:
    """``{normalised image path: (line, class id)}`` of an annotation file; lines the reader would reject (bad
    fields, bad bytes) are left to it."""
    listed: dict[str, tuple[int, int | None]] = {}
    base = os.path.normpath(os.path.abspath(root))
    with open(ann, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            fields = raw.decode("utf-8", errors="replace").split()
            if not fields or fields[0].startswith("#"):
                continue
            key = os.path.normpath(os.path.join(base, fields[0]))
            try:
                class_id: int | None = int(fields[1]) if len(fields) > 1 else None
            except ValueError:
                class_id = None
            listed.setdefault(key, (line_no, class_id))
    return listed


def check_splits(
    dataset_dir: str | os.PathLike,
    split_files: Mapping[str, str],
    image_dir: str | os.PathLike | None = None,
    class_map: str | dict = "binary",
    num_classes: int | None = None,
    train_split: str = "train",
) -> bool:
    """Check a dataset's splits against each other before any training.

    Args:
        dataset_dir: the dataset folder.
        split_files: ``{split name: annotation file}`` (e.g. ``{"train": "train.txt", "val": "val.txt",
            "test": "test.txt"}``); a file that does not exist is skipped (the split's loader reports it).
        image_dir: see :func:`load_covidx_split`.
        class_map: see :func:`load_covidx_split`.
        num_classes: the number of classes the run trains; every label ``0 .. num_classes - 1`` must have a
            training image. ``None``: the labels of ``class_map``.
        train_split: the name of the training split in ``split_files``.

    Returns:
        ``True`` (so bundle configs can chain it in ``check_config``).

    Raises:
        ConfigValueError: ``num_classes`` is not the number of classes of ``class_map`` (``"three"`` with 2 would
            give labels a 2-class network cannot take; named before any file is read).
        DataError: an image listed in two splits (a test image would be trained on; both files and lines are
            named), or a class with no training image.
    """
    if num_classes is not None:
        top = max(resolve_class_map(class_map).values()) + 1
        if top != num_classes:
            raise ConfigValueError(
                f"config id 'num_classes' is {num_classes!r} but class_map {class_map!r} has {top} classes (labels "
                f"0 .. {top - 1}): set num_classes {top} (or another class_map)."
            )
    root = Path(dataset_dir)
    if image_dir is None:
        image_dir = root / "images" if (root / "images").is_dir() else root
    listed: dict[str, tuple[Path, dict[str, tuple[int, int | None]]]] = {}
    for split, name in split_files.items():
        ann = Path(name) if Path(name).is_absolute() else root / name
        if ann.is_file():
            listed[split] = (ann, _listed_images(ann, Path(image_dir)))
    splits = list(listed)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            common = sorted(set(listed[a][1]) & set(listed[b][1]))
            if common:
                (ann_a, rows_a), (ann_b, rows_b) = listed[a], listed[b]
                first = common[0]
                raise DataError(
                    f"{len(common)} image(s) are listed in both the {a} and the {b} split, e.g. {first} "
                    f"({ann_a}:{rows_a[first][0]} and {ann_b}:{rows_b[first][0]}); splits must not share images.",
                    str(ann_b),
                    "image in two splits",
                )
    if train_split in listed:
        mapping = resolve_class_map(class_map)
        ann, rows = listed[train_split]
        present = {mapping[c] for _, c in rows.values() if c in mapping}
        expected = set(range(num_classes)) if num_classes is not None else set(mapping.values())
        missing = sorted(expected - present)
        if missing:
            raise DataError(
                f"no training image of class(es) {missing} (after class_map {class_map!r}; classes present: "
                f"{sorted(present)}): a classifier cannot learn a class it never sees. Fix the split or num_classes."
                + "".join(f" {hint}" for hint in _class_hints(rows, mapping, class_map)),
                str(ann),
                "class without training image",
            )
    return True


def check_shared_images(splits: Mapping[str, list[dict]]) -> bool:
    """Refuse the same image in two splits under different names: preprocessed records (:func:`preprocess_cached`)
    whose pixels are identical (a copy of a training slice in the test split makes TRTR / TSTR measure on images the
    classifiers were trained on, and the privacy audit's distances 0). :func:`check_splits` compares names only.

    Args:
        splits: ``{split name: preprocessed records}`` (``image`` an array, ``image_path`` the file).

    Returns:
        ``True`` (so bundle configs can chain it).

    Raises:
        DataError: naming how many images two splits share and the first pair of files.
    """
    first_seen: dict[bytes, tuple[str, str]] = {}
    shared: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for name, records in splits.items():
        local: set[bytes] = set()
        for i, record in enumerate(records):
            image = record.get("image")
            if not isinstance(image, np.ndarray):
                continue
            key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
            where = str(record.get("image_path") or record.get("source") or f"{name} record {i}")
            seen = first_seen.get(key)
            if seen is not None and seen[0] != name and key not in local:
                shared.setdefault((seen[0], name), []).append((seen[1], where))
            first_seen.setdefault(key, (name, where))
            local.add(key)
    if shared:
        (a, b), pairs = next(iter(shared.items()))
        total = sum(len(p) for p in shared.values())
        raise DataError(
            f"{total} image(s) of one split are pixel for pixel an image of another split under another name, e.g. "
            f"{len(pairs)} between {a} and {b}: {pairs[0][0]} and {pairs[0][1]}. A test image that is also a "
            "training image makes the accuracies and the privacy audit meaningless: remove the copies from one "
            "split (or re-split by patient).",
            pairs[0][1],
            "image in two splits",
        )
    return True


def _class_hints(rows: Mapping[str, tuple[int, int | None]], mapping: Mapping[int, int], class_map: object) -> list:
    """What may be behind a split without some class: an empty file, lines without a class id (another separator),
    class ids outside ``class_map``, or 0 / 1 labels read with the COVIDx CT ids of ``binary``."""
    if not rows:
        return ["The split file lists no image (empty, or comments only)."]
    hints = []
    unreadable = sorted(line for line, c in rows.values() if c is None)
    if unreadable:
        hints.append(
            f"{len(unreadable)} line(s) have no class id after the file name, e.g. line {unreadable[0]}: the format "
            "is `name class xmin ymin xmax ymax` separated by spaces (not commas)."
        )
    ids = {c for _, c in rows.values() if c is not None}
    outside = sorted(ids - set(mapping))
    if outside:
        hints.append(f"Class ids {outside} are not in class_map {class_map!r}.")
    if class_map == "binary" and ids and ids <= {0, 1}:
        hints.append(
            "class_map 'binary' reads the COVIDx CT ids (0 normal, 1 pneumonia, 2 COVID-19): 0 and 1 are both "
            'non-COVID. If your 1 means COVID-19, pass --class_map "{0: 0, 1: 1}".'
        )
    elif outside:
        hints.append('For your own ids pass a mapping to 0 .. num_classes - 1, e.g. --class_map "{0: 0, 1: 1}".')
    return hints


def parse_num_labels(num_labels: int | float | str | None) -> int | float | None:
    """The one reading of the ``num_labels`` setting (config id and ``--num-labels``).

    ``"all"`` / ``None`` / ``1.0`` -> ``None`` (every label); a whole count (``20``, ``"50"``) -> ``int``; a fraction
    in ``(0, 1)`` (``0.05``, ``"0.05"``) -> ``float``. A string reads as a count when it is an integer literal (``"1"``
    is one label) and as a number otherwise (``"1.0"`` is every label, as the float ``1.0``).

    Raises:
        ValueError: naming ``num_labels`` for a value that is none of these.
    """
    if num_labels is None or (isinstance(num_labels, str) and num_labels.strip().lower() == "all"):
        return None
    bad = f"num_labels must be a count (20, 50), a fraction in (0, 1] or 'all', got {num_labels!r}."
    value: int | float
    if isinstance(num_labels, bool):
        raise ValueError(bad)
    if isinstance(num_labels, str):
        text = num_labels.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(bad) from None
    elif isinstance(num_labels, (int, float)):
        value = num_labels
    else:
        raise ValueError(bad)
    if not value > 0:
        raise ValueError(f"num_labels must be positive, got {num_labels!r}.")
    if isinstance(value, int):
        return value
    if value == 1.0:
        return None
    if value < 1:
        return value
    if not value.is_integer():
        raise ValueError(f"num_labels above 1 must be a whole count, got {num_labels!r}.")
    return int(value)


def check_num_labels(num_labels: int | float | str | None, n_train: int) -> int | float | None:
    """:func:`parse_num_labels`, with a count checked against the training split's size ``n_train``.

    Raises:
        ConfigValueError: naming ``num_labels`` for a count above ``n_train`` (and what to pass instead).
    """
    amount = parse_num_labels(num_labels)
    if isinstance(amount, int) and amount > n_train:
        raise ConfigValueError(
            f"config id 'num_labels' is {amount} but the training split has {n_train} images: pass a count of at "
            f"most {n_train} (--num_labels {n_train}), a fraction (--num_labels 0.5) or --num_labels all."
        )
    return amount


def select_labelled(records: list[dict], num_labels: int | float | str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split training records into (labelled, unlabelled) by ``num_labels`` (class ratio kept; see
    :func:`monai_condflow.data.splits.sample_labelled_subset`). ``"all"`` gives every record labelled.

    Raises:
        ConfigValueError: a count above the number of records (:func:`check_num_labels`).
    """
    amount = check_num_labels(num_labels, len(records))
    if amount is None:
        return list(records), []
    return sample_labelled_subset(records, amount, seed=seed)


def _cache_key(records: list[dict], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for r in records:
        image = r["image"]
        stamp = ""
        if isinstance(image, (str, os.PathLike)) and os.path.exists(image):
            st = os.stat(image)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        h.update(f"{image}|{stamp}|{r.get('box')}\n".encode())
    return h.hexdigest()[:20]


def _split_names(records: list[dict]) -> str:
    """`` of train.txt`` (the files named by the records' ``source`` ``file:line``), or nothing."""
    files = sorted({str(r["source"]).rsplit(":", 1)[0] for r in records if ":" in str(r.get("source", ""))})
    return f" of {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}" if files else ""


def preprocess_cached(
    records: list[dict],
    transform: Callable[[dict], dict],
    cache_dir: str | os.PathLike | None,
    settings: dict | None = None,
    on_error: str = "raise",
    report: ReadReport | None = None,
) -> list[dict]:
    """Run a deterministic preprocessing chain once and keep its output images on disk.

    Loading, windowing, cropping and resizing 512 x 512 slices dominates the cost of every stage of the pipeline;
    this runs ``transform`` over ``records`` once and stores the ``[N, 1, S, S]`` float32 images in
    ``cache_dir/<key>.npz`` (written atomically, read back with ``allow_pickle=False``), keyed by the records'
    paths, file sizes and modification times, their boxes, ``settings`` (e.g. the image size) and the settings
    stored on the chain's transforms (:func:`~monai_condflow.utils.fingerprint.transform_fingerprint`: a chain with
    another HU window, intensity mode, crop or size makes its own cache). Later stages that ask for the same records
    with the same chain get the cached arrays.

    Args:
        records: records with a path ``image`` (see :func:`load_covidx_split`).
        transform: a deterministic chain returning ``{"image": [1, S, S] in [0, 1], ...}``.
        cache_dir: where the cache lives; ``None`` disables the disk cache (the chain still runs once).
        settings: anything else the output depends on (chain parameters), part of the key.
        on_error: ``"raise"``: the first record the chain cannot process (corrupt or truncated file, NaN / Inf or
            constant image, box outside the image ...) raises :class:`DataError` naming its ``source`` and the
            cause; ``"skip"``: such records are left out and a warning gives the count per reason.
        report: filled in with what was kept and skipped.

    Returns:
        New records (the input list is not modified) whose ``image`` is the preprocessed ``[1, S, S]`` array and
        ``image_path`` the original path; other keys are copied.

    Raises:
        DataError: (``on_error="raise"``) for a record the chain fails on.
    """
    check_on_error(on_error)
    # the chain's own settings are part of the key: a cache made with another HU window, crop or size is not reused
    settings = {**dict(settings or {}), "on_error": on_error, "transform": transform_fingerprint(transform)}
    cache_file = None
    images = None
    keep = np.ones(len(records), dtype=bool)
    local = ReadReport()
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"preprocessed_{_cache_key(records, settings)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as data:
                    images, keep = data["images"], data["keep"]
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, ValueError) as err:
                logger.warning(
                    "cache file %s is unreadable (%s: %s): rebuilding it (delete the cache folder %s to clear "
                    "every cached slice)", cache_file, type(err).__name__, err, cache_dir,
                )  # fmt: skip
                images, keep = None, np.ones(len(records), dtype=bool)
        if images is not None:
            if keep.shape[0] != len(records) or images.shape[0] != int(keep.sum()):
                images, keep = None, np.ones(len(records), dtype=bool)
            elif not keep.all():
                logger.warning("%d of %d records were skipped when this cache was made", (~keep).sum(), len(keep))
    if images is None:
        outputs = []
        for i, record in enumerate(records):
            try:
                outputs.append(np.asarray(transform(dict(record))["image"], dtype=np.float32))
            except Exception as err:  # noqa: BLE001 - any failure of the chain is reported with its record
                cause = err
                while cause.__cause__ is not None:  # MONAI's Compose wraps the transform's own error
                    cause = cause.__cause__
                source = str(record.get("source", record.get("image", f"record {i}")))
                error = DataError(f"cannot preprocess {record.get('image')}: {cause}", source, type(cause).__name__)
                if on_error == "raise":
                    raise error from err
                local.add(error)
                keep[i] = False
        images = np.stack(outputs) if outputs else np.zeros((0, 1, 1, 1), np.float32)
        local.n_read = int(keep.sum())  # before the summary, which reports it
        if not keep.all():
            local.log_summary(logger, f"preprocessing {len(records)} records{_split_names(records)}")
        if cache_file is not None:
            buffer = io.BytesIO()
            np.savez(buffer, images=images, keep=keep)
            atomic_write_bytes(cache_file, buffer.getvalue())
            logger.info("preprocessed %d of %d slices -> %s", int(keep.sum()), len(records), cache_file)
    else:
        logger.info("reusing %d preprocessed slices from %s", int(keep.sum()), cache_file)
    local.n_read = int(keep.sum())
    if report is not None:
        report.merge(local)
    out = []
    for record, image in zip([r for r, k in zip(records, keep) if k], images):
        new = dict(record)
        if isinstance(record.get("image"), (str, os.PathLike)):
            new["image_path"] = str(record["image"])
        new["image"] = image
        out.append(new)
    return out
