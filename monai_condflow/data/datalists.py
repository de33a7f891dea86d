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

import logging
import os
from pathlib import Path

from monai_condflow.data.readers import read_covidx_annotations
from monai_condflow.data.splits import sample_labelled_subset

__all__ = ["load_covidx_split", "parse_num_labels", "select_labelled"]

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


def parse_num_labels(num_labels: int | float | str) -> int | float | None:
    """Normalise the ``num_labels`` setting: ``"all"`` / ``None`` / ``1.0`` -> ``None`` (every label), an integer
    count (20, 50) -> ``int``, a fraction in ``(0, 1)`` -> ``float``.

    Raises:
        ValueError: naming ``num_labels`` for a value that is none of these.
    """
    if num_labels is None or (isinstance(num_labels, str) and num_labels.strip().lower() == "all"):
        return None
    try:
        value = float(num_labels)
    except (TypeError, ValueError):
        raise ValueError(
            f"num_labels must be a count (20, 50), a fraction in (0, 1] or 'all', got {num_labels!r}."
        ) from None
    if value <= 0:
        raise ValueError(f"num_labels must be positive, got {num_labels!r}.")
    if value == 1.0 and not (isinstance(num_labels, int) and not isinstance(num_labels, bool)):
        return None
    if value < 1:
        return value
    if not value.is_integer():
        raise ValueError(f"num_labels above 1 must be a whole count, got {num_labels!r}.")
    return int(value)


def select_labelled(records: list[dict], num_labels: int | float | str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split training records into (labelled, unlabelled) by ``num_labels`` (class ratio kept; see
    :func:`monai_condflow.data.splits.sample_labelled_subset`). ``"all"`` gives every record labelled."""
    amount = parse_num_labels(num_labels)
    if amount is None:
        return list(records), []
    return sample_labelled_subset(records, amount, seed=seed)
