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
"""Patient-disjoint dataset splits and class-ratio-keeping labelled subsets.

- :func:`patient_disjoint_split` puts all slices of a patient in one split (records without ``patient_id`` are
  their own group) while keeping the class ratio roughly equal across splits.
- :func:`sample_labelled_subset` draws the few labelled samples of the semi-supervised setting (20 or 50 samples,
  or 0.5 %, 1 %, 5 %, 100 % of the labels) with the class ratio kept and at least one sample per class.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = ["patient_disjoint_split", "sample_labelled_subset"]

logger = logging.getLogger(__name__)


def patient_disjoint_split(
    records: Sequence[dict],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """Split records so that no patient appears in two splits.

    Records are grouped by ``patient_id``; a record without one is a group of its own. With ``stratify``, each
    group gets the majority label of its records and groups are split per class, so every split keeps roughly
    the overall class ratio. Groups are walked class by class (seeded random order, larger groups first within a
    class); each goes to the split furthest below its fraction of the records placed so far, which interleaves
    the splits inside every class and keeps every split non-empty on small datasets.

    Args:
        records: records with ``label`` and, optionally, ``patient_id``.
        fractions: non-negative fractions summing to 1, one per split.
        seed: seed of the shuffle; the same seed gives the same split.
        stratify: keep the class ratio per split (otherwise only the sizes are matched).
        names: split names; defaults to ``("train", "val", "test")`` for 3 fractions and ``("train", "val")`` for 2.

    Returns:
        ``{name: records}``, each list in the input order; the same dict objects as in ``records``.

    Raises:
        ValueError: for fractions that are negative or do not sum to 1, names that do not match the fractions,
            or a record without ``label`` (when stratifying).
    """
    fracs = [float(f) for f in fractions]
    if not fracs or any(f < 0 for f in fracs) or not math.isclose(sum(fracs), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}.")
    if names is None:
        defaults = {3: ("train", "val", "test"), 2: ("train", "val")}
        if len(fracs) not in defaults:
            raise ValueError(f"names must be given for {len(fracs)} fractions.")
        names = defaults[len(fracs)]
    names = list(names)
    if len(names) != len(fracs) or len(set(names)) != len(names):
        raise ValueError(f"names {names} must be {len(fracs)} distinct names, one per fraction.")

    groups: dict[tuple[str, object], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        patient = record.get("patient_id")
        groups[("patient", str(patient)) if patient not in (None, "") else ("record", i)].append(i)
    anonymous = sum(1 for key in groups if key[0] == "record")
    if anonymous:
        logger.warning(
            "patient_disjoint_split: %d of %d records have no patient_id and are split one by one, so slices of one "
            "patient may land in different splits (a leak into the test split). Give the readers a patient_pattern "
            "(a regular expression with a group 'patient' matching your file names) or set patient_id yourself.",
            anonymous, len(records),
        )  # fmt: skip

    strata: dict[int, list[tuple[str, object]]] = defaultdict(list)
    for key, members in groups.items():
        if stratify:
            counts = Counter(_label(records[i], i) for i in members)
            label = min(counts, key=lambda c: (-counts[c], c))
        else:
            label = 0
        strata[label].append(key)

    # Walk the groups class by class (classes and groups in seeded random order, larger groups first within a
    # class) and put each group into the split furthest below its share of the records placed so far. The
    # running targets interleave the splits inside every class (stratification) and carry rounding left-overs
    # from one class to the next, so small datasets still fill every split.
    rng = np.random.default_rng(seed)
    labels = sorted(strata)
    ordered: list[tuple[str, object]] = []
    for label in (labels[j] for j in rng.permutation(len(labels))):
        keys = sorted(strata[label], key=lambda k: (k[0], str(k[1])))
        shuffled = [keys[j] for j in rng.permutation(len(keys))]
        ordered.extend(sorted(shuffled, key=lambda k: -len(groups[k])))  # stable: random among equal sizes
    assignment: dict[tuple[str, object], int] = {}
    filled = [0] * len(fracs)
    placed = 0
    for key in ordered:
        placed += len(groups[key])
        deficits = [f * placed - got for f, got in zip(fracs, filled)]
        best = max(range(len(fracs)), key=lambda j: (deficits[j], -j))
        assignment[key] = best
        filled[best] += len(groups[key])

    out: dict[str, list[dict]] = {name: [] for name in names}
    split_of_record = {}
    for key, members in groups.items():
        for i in members:
            split_of_record[i] = assignment[key]
    for i, record in enumerate(records):
        out[names[split_of_record[i]]].append(record)
    for name, frac in zip(names, fracs):
        if frac > 0 and not out[name]:
            logger.warning("patient_disjoint_split: split %r is empty (%d patient groups in all).", name, len(groups))
    return out


def sample_labelled_subset(
    records: Sequence[dict], amount: int | float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Draw the labelled part of a semi-supervised training set, keeping the class ratio.

    Args:
        records: records with ``label``.
        amount: an ``int`` is the total number of labelled samples (e.g. 20, 50), at least one per class; a
            ``float`` in ``(0, 1]`` is a fraction of ``len(records)`` (e.g. 0.005, 0.01, 0.05, 1.0), rounded to
            the nearest count and raised to the number of classes if below it.
        seed: seed of the draw; the same seed gives the same subset.

    Returns:
        ``(labelled, unlabelled)``: the drawn records and the rest, each in the input order (the same dict
        objects as in ``records``; unlabelled records keep their ``label``, which the caller should not use for
        training). Per class ``c`` the labelled count is ``k * n_c / n`` rounded by largest remainder, at least 1.

    Raises:
        ValueError: for ``amount <= 0``, an int above ``len(records)`` or below the number of classes, a float
            above 1, a bool, an empty ``records``, or a record without ``label``.
    """
    if isinstance(amount, (bool, np.bool_)) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise ValueError(f"amount must be an int (samples) or a float fraction in (0, 1], got {amount!r}.")
    n = len(records)
    if n == 0:
        raise ValueError("records is empty.")
    labels = np.array([_label(r, i) for i, r in enumerate(records)], dtype=np.int64)
    classes, class_sizes = np.unique(labels, return_counts=True)
    n_classes = len(classes)
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount!r}.")
    if isinstance(amount, (int, np.integer)):
        k = int(amount)
        if k > n:
            raise ValueError(f"amount {k} is larger than the {n} records.")
        if k < n_classes:
            raise ValueError(f"amount {k} is smaller than the {n_classes} classes; at least one per class is kept.")
    else:
        if amount > 1:
            raise ValueError(f"a fraction amount must be in (0, 1], got {amount!r}; pass an int for a count.")
        k = min(n, max(n_classes, int(math.floor(float(amount) * n + 0.5))))

    quotas = _allocate(k, class_sizes)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.choice(members, size=int(quota), replace=False).tolist())
    picked = set(chosen)
    labelled = [r for i, r in enumerate(records) if i in picked]
    unlabelled = [r for i, r in enumerate(records) if i not in picked]
    logger.debug("sample_labelled_subset: %d labelled (%s per class), %d unlabelled.", k, quotas.tolist(), n - k)
    return labelled, unlabelled


def _label(record: dict, index: int) -> int:
    if "label" not in record:
        raise ValueError(f"record {index} ({record.get('source', 'no source')}) has no 'label'.")
    return int(record["label"])


def _allocate(k: int, class_sizes: np.ndarray) -> np.ndarray:
    """Split ``k`` over classes proportionally to ``class_sizes`` (largest remainder, >= 1 each, <= size)."""
    exact = k * class_sizes / class_sizes.sum()
    quotas = np.maximum(np.floor(exact).astype(np.int64), 1)
    quotas = np.minimum(quotas, class_sizes)
    remainders = exact - np.floor(exact)
    while quotas.sum() < k:
        room = quotas < class_sizes
        score = np.where(room, remainders - (quotas - np.floor(exact)), -np.inf)
        j = int(np.argmax(score))
        quotas[j] += 1
    while quotas.sum() > k:
        j = int(np.argmax(np.where(quotas > 1, quotas - exact, -np.inf)))
        quotas[j] -= 1
    return quotas
