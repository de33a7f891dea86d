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
"""Tests for monai_condflow.data.splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from monai_condflow.data.npz import load_npz_dataset
from monai_condflow.data.splits import patient_disjoint_split, sample_labelled_subset


def _patients(n_patients: int = 100, seed: int = 0) -> list[dict]:
    """Records of ``n_patients`` patients with 1-6 slices each; every third patient is class 1."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, 7))):
            records.append({"image": f"p{p}_s{s}.png", "label": int(p % 3 == 0), "patient_id": f"p{p}", "source": ""})
    return records


def _patient_sets(split: dict[str, list[dict]]) -> dict[str, set[str]]:
    return {k: {r["patient_id"] for r in v} for k, v in split.items()}


def test_disjoint_complete_ordered_and_stratified():
    records = _patients()
    split = patient_disjoint_split(records, seed=3)
    assert list(split) == ["train", "val", "test"]
    sets = _patient_sets(split)
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    flat = [id(r) for v in split.values() for r in v]
    assert sorted(flat) == sorted(id(r) for r in records)  # every record exactly once, same objects
    for part in split.values():
        positions = [records.index(r) for r in part]
        assert positions == sorted(positions)
    n = len(records)
    overall = sum(r["label"] for r in records) / n
    for name, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        assert abs(len(split[name]) / n - frac) < 0.03, name
        ratio = sum(r["label"] for r in split[name]) / len(split[name])
        assert abs(ratio - overall) < 0.06, name


def test_deterministic_per_seed():
    records = _patients()
    a = patient_disjoint_split(records, seed=1)
    b = patient_disjoint_split(records, seed=1)
    c = patient_disjoint_split(records, seed=2)
    assert _patient_sets(a) == _patient_sets(b)
    assert _patient_sets(a) != _patient_sets(c)


def test_six_equal_patients_fill_every_split():
    # 6 patients x 10 slices, 2 per class: running targets give 4 / 1 / 1 patients for 0.7 / 0.15 / 0.15
    records = [
        {"image": "", "label": c, "patient_id": f"c{c}p{p}", "source": ""}
        for c in range(3)
        for p in range(2)
        for _ in range(10)
    ]
    for seed in range(4):
        sets = _patient_sets(patient_disjoint_split(records, seed=seed))
        assert [len(sets[k]) for k in ("train", "val", "test")] == [4, 1, 1]


def test_records_without_patient_are_own_groups_and_two_way(caplog):
    records = [{"image": str(i), "label": i % 2, "source": ""} for i in range(20)]
    with caplog.at_level("WARNING", logger="monai_condflow.data.splits"):
        split = patient_disjoint_split(records, fractions=(0.5, 0.5), seed=0)
    assert "20 of 20 records have no patient_id" in caplog.text and "patient_pattern" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_condflow.data.splits"):
        patient_disjoint_split([{**r, "patient_id": f"p{i // 2}"} for i, r in enumerate(records)], seed=0)
    assert "no patient_id" not in caplog.text  # every record has its patient: no warning
    assert list(split) == ["train", "val"] and [len(v) for v in split.values()] == [10, 10]
    assert [sum(r["label"] for r in v) for v in split.values()] == [5, 5]
    unstratified = patient_disjoint_split(records, fractions=(0.75, 0.25), seed=0, stratify=False, names=("a", "b"))
    assert [len(v) for v in unstratified.values()] == [15, 5]


def test_split_argument_errors():
    records = _patients(5)
    with pytest.raises(ValueError, match=r"sum to 1, got \(0.7, 0.2\)"):
        patient_disjoint_split(records, fractions=(0.7, 0.2))
    with pytest.raises(ValueError, match="non-negative"):
        patient_disjoint_split(records, fractions=(1.2, -0.2))
    with pytest.raises(ValueError, match="names must be given for 4 fractions"):
        patient_disjoint_split(records, fractions=(0.25,) * 4)
    with pytest.raises(ValueError, match="distinct names"):
        patient_disjoint_split(records, fractions=(0.5, 0.5), names=("a", "a"))
    with pytest.raises(ValueError, match=r"record 1 \(s1\) has no 'label'"):
        patient_disjoint_split([{"label": 0, "source": "s0"}, {"source": "s1"}])


def test_real_covid_ct_md_split_is_patient_disjoint(shared_data: Path):
    records = load_npz_dataset(shared_data / "covid_ct_md_64.npz")
    split = patient_disjoint_split(records, seed=0)
    sets = _patient_sets(split)
    assert [len(sets[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert set().union(*sets.values()) == {"P001", "P002", "cap001", "cap002", "normal001", "normal002"}
    assert sum(len(v) for v in split.values()) == 718


def _labelled(n0: int, n1: int, n2: int = 0) -> list[dict]:
    labels = [0] * n0 + [1] * n1 + [2] * n2
    return [{"image": str(i), "label": c, "source": str(i)} for i, c in enumerate(labels)]


@pytest.mark.parametrize(
    "sizes, amount, expected",
    [
        ((70, 30), 20, {0: 14, 1: 6}),
        ((70, 30), 50, {0: 35, 1: 15}),
        ((70, 30), 0.05, {0: 4, 1: 1}),  # 5 -> exact 3.5 / 1.5, tie of remainders goes to class 0
        ((70, 30), 0.01, {0: 1, 1: 1}),  # 1 sample -> raised to one per class
        ((70, 30), 0.005, {0: 1, 1: 1}),
        ((70, 30), 1.0, {0: 70, 1: 30}),
        ((1000, 5, 5), 20, {0: 18, 1: 1, 2: 1}),  # 19.6 / 0.1 / 0.1 -> at least 1 each, total kept at 20
        ((10, 7, 3), 7, {0: 4, 1: 2, 2: 1}),  # 3.5 / 2.45 / 1.05 -> floors 3 / 2 / 1, remainder to class 0
    ],
)
def test_labelled_subset_counts(sizes, amount, expected):
    records = _labelled(*sizes)
    labelled, unlabelled = sample_labelled_subset(records, amount, seed=0)
    assert dict(Counter(r["label"] for r in labelled)) == expected
    assert len(labelled) + len(unlabelled) == len(records)
    assert {r["source"] for r in labelled}.isdisjoint(r["source"] for r in unlabelled)
    assert [int(r["source"]) for r in labelled] == sorted(int(r["source"]) for r in labelled)


def test_labelled_subset_deterministic():
    records = _labelled(70, 30)
    a, _ = sample_labelled_subset(records, 20, seed=5)
    b, _ = sample_labelled_subset(records, 20, seed=5)
    c, _ = sample_labelled_subset(records, 20, seed=6)
    assert [r["source"] for r in a] == [r["source"] for r in b]
    assert [r["source"] for r in a] != [r["source"] for r in c]


@pytest.mark.parametrize(
    "amount, message",
    [
        (0, "amount must be positive, got 0"),
        (-3, "amount must be positive"),
        (0.0, "amount must be positive"),
        (101, "amount 101 is larger than the 100 records"),
        (1, "amount 1 is smaller than the 2 classes"),
        (1.5, r"fraction amount must be in \(0, 1\], got 1.5"),
        (True, "amount must be an int"),
        ("20", "amount must be an int"),
    ],
)
def test_labelled_subset_errors(amount, message):
    with pytest.raises(ValueError, match=message):
        sample_labelled_subset(_labelled(70, 30), amount)


def test_labelled_subset_empty_and_unlabelled_records():
    with pytest.raises(ValueError, match="records is empty"):
        sample_labelled_subset([], 1)
    with pytest.raises(ValueError, match=r"record 0 \(a.png\) has no 'label'"):
        sample_labelled_subset([{"source": "a.png"}], 1)
