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
"""write_counterfactuals' regions: the lungs-only set against the whole-image one, empty masks, refused arguments."""

from __future__ import annotations

import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_condflow.engines.counterfactual import write_counterfactuals
from monai_condflow.transforms import estimate_lung_mask
from tests.networks.nets.test_conditional_glow import COND
from tests.networks.nets.test_counterfactual import trained_like
from tests.transforms.test_lung_mask import drawn_chest


class _Stub(torch.nn.Module):
    """A classifier: class 1 when the image's mean exceeds 0.4; ``embed`` = a fixed projection of pooled pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, COND)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([0.4 - m, m - 0.4], dim=1)

    def embed(self, x):
        return torch.nn.functional.normalize(self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)), dim=1)


def _records() -> list[dict]:
    chest = torch.as_tensor(drawn_chest(16, body_rx=7.5)[0], dtype=torch.float32)[None]
    flat = torch.full((1, 16, 16), 0.6)  # no lungs: its mask is empty
    return [{"image": chest, "label": 0}, {"image": flat, "label": 1}, {"image": chest.flip(-1), "label": 1}]


def _read(folder, kind: str, index: int) -> np.ndarray:
    return np.asarray(nib.load(folder / f"{kind}_{index:06d}.nii.gz").dataobj, dtype=np.float64).squeeze()


def test_lungs_region_changes_only_the_estimated_lungs_and_counts_empty_masks(tmp_path, caplog):
    flow = trained_like(image_size=16).float()
    records = _records()
    whole = write_counterfactuals(flow, _Stub(), records, records, tmp_path / "image", 2, formats=["nifti"])
    with caplog.at_level(logging.WARNING, logger="monai_condflow.engines.counterfactual"):
        lungs = write_counterfactuals(flow, _Stub(), records, records, tmp_path / "lungs", 2, formats=["nifti"],
                                      region="lungs", region_margin=0)  # fmt: skip
    assert whole["region"] == "image" and whole["region_margin"] is None and whole["empty_masks"] == 0
    assert lungs["region"] == "lungs" and lungs["region_margin"] == 0 and lungs["empty_masks"] == 1
    assert "1 of 3" in caplog.text
    assert json.loads((tmp_path / "lungs" / "counterfactual.json").read_text())["empty_masks"] == 1
    for i in range(len(records)):
        src = _read(tmp_path / "image", "source", i)
        cf_whole = _read(tmp_path / "image", "counterfactual", i)
        cf_lungs = _read(tmp_path / "lungs", "counterfactual", i)
        # the NIfTI writer's axis order is the same for every file; the mask is estimated in that order
        mask = estimate_lung_mask(src)
        assert np.array_equal(cf_lungs[~mask], src[~mask])  # outside the lungs: the source exactly
        assert np.allclose(cf_lungs[mask], cf_whole[mask], atol=1e-6)  # inside: the flow's counterfactual
        if i == 1:
            assert not mask.any()  # the flat slice: unchanged
        else:
            assert mask.any() and np.abs(cf_whole[~mask] - src[~mask]).max() > 0  # the whole-image one did change there
    assert lungs["mean_region_fraction"] < 1.0 and whole["mean_region_fraction"] == 1.0


@pytest.mark.parametrize("kwargs, match", [({"region": "heart"}, "region"), ({"region_margin": -1}, "region_margin"),
                                           ({"region_margin": True}, "region_margin"),
                                           ({"region_margin": 1.5}, "region_margin"),
                                           ({"class_names": ["a"]}, r"num_classes 2 has class id\(s\) \[1\]"),
                                           ({"class_names": "ab"}, "list of non-empty names")])  # fmt: skip
def test_bad_region_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    records = _records()
    with pytest.raises(ValueError, match=match):
        write_counterfactuals(trained_like(image_size=16).float(), _Stub(), records, records, tmp_path / "cf", 2,
                              **kwargs)  # fmt: skip
    assert not (tmp_path / "cf").exists()


def test_class_names_name_each_rows_source_and_target_class(tmp_path):
    """``class_names``: two name columns at the end of the manifest (the id columns as without names) and the list in
    the summary."""
    flow, records = trained_like(image_size=16).float(), _records()
    names = ["non-COVID", "COVID-19"]
    summary = write_counterfactuals(flow, _Stub(), records, records, tmp_path / "n", 2, formats=["png"],
                                    class_names=names)  # fmt: skip
    write_counterfactuals(flow, _Stub(), records, records, tmp_path / "p", 2, formats=["png"])
    with open(tmp_path / "n" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "p" / "manifest.csv", newline="") as f:
        bare = list(csv.DictReader(f))
    assert list(rows[0])[-3:] == ["model_version", "source_class_name", "target_class_name"]
    assert [(r["source_class_name"], r["target_class_name"]) for r in rows] == [
        (names[int(r["source_class"])], names[int(r["target_class"])]) for r in rows
    ]
    assert {r["source_class_name"] for r in rows} == set(names)  # the records hold both classes
    assert [{k: v for k, v in r.items() if not k.endswith("_name")} for r in rows] == bare
    assert summary["class_names"] == names
    assert json.loads((tmp_path / "p" / "counterfactual.json").read_text())["class_names"] is None
    # a data label without a name is refused, not named by a negative index or a crash; nothing of the set is kept
    for label in (-1, 2):
        bad = [*records[:2], {**records[2], "label": label}]
        with pytest.raises(ValueError, match=rf"the data hold class id\(s\) \[{label}\]"):
            write_counterfactuals(flow, _Stub(), bad, records, tmp_path / "bad", 2, formats=["png"], class_names=names,
                                  batch_size=2)  # fmt: skip
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))
