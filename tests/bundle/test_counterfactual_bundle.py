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
"""``counterfactual.json`` and ``novelty.json`` through ``python -m monai.bundle run`` on a tiny trained run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.utils.checks import ConfigValueError
from tests.bundle.test_bundle import CONFIGS, META, TINY, TINY_FLOW, _refusal, _run, _workflow

BUNDLE = CONFIGS.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("phantom_cf")
    generate_phantom_dataset(data, num_images=90, seed=5, image_size=96, slices_per_patient=6, overwrite=True,
                             progress=False)  # fmt: skip
    out = tmp_path_factory.mktemp("run_cf")
    common = {**TINY, "dataset_dir": str(data), "output_dir": str(out)}
    _run(["train_classifier.json"], **common)
    _run(["train_flow.json"], **common, **TINY_FLOW)
    return data, out


def _bundle_run(config: str, data: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps([str(CONFIGS / "common.json"), str(CONFIGS / config)]),
           "--meta_file", META, "--bundle_root", str(BUNDLE), "--dataset_dir", str(data),
           "--output_dir", str(out), "--image_size", str(TINY["image_size"]), "--device", "cpu", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_counterfactual_config_writes_triplets(tiny_run):
    data, out = tiny_run
    _bundle_run("counterfactual.json", data, out, "--counterfactual_limit", "5", "--batch_size", "2")
    folder = out / "counterfactual"
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    assert len(rows) == 5
    summary = json.loads((folder / "counterfactual.json").read_text())
    # the flip rate is over the sources the classifier does not already read as the target (they needed no flip)
    needed = [r for r in rows if r["source_predicted"] != r["target_class"]]
    assert summary["count"] == 5 and summary["to_flip"] == len(needed)
    assert all(r["flipped"] == "0" for r in rows if r not in needed)
    if needed:
        assert summary["flip_rate"] == pytest.approx(sum(int(r["flipped"]) for r in needed) / len(needed))
    hits = sum(r["predicted_class"] == r["target_class"] for r in rows)
    assert summary["target_rate"] == pytest.approx(hits / 5)
    for r in rows:
        assert r["target_class"] == str(1 - int(r["source_class"]))  # two classes: the other one
        # the class map's names beside the ids (binary)
        binary = ["non-COVID", "COVID-19"]
        assert (r["source_class_name"], r["target_class_name"]) == (binary[int(r["source_class"])],
                                                                    binary[int(r["target_class"])])  # fmt: skip
        for kind in ("source", "counterfactual", "difference"):
            names = r[kind].split(";")
            assert [n.rsplit(".", 1)[-1] for n in names] == ["png", "gz"]
            assert all((folder / n).is_file() for n in names)
    # the PNG difference map is 0.5 + (cf - source) / 2 (16-bit rounding)
    src = np.asarray(Image.open(folder / rows[0]["source"].split(";")[0]), dtype=np.float64) / 65535
    cf = np.asarray(Image.open(folder / rows[0]["counterfactual"].split(";")[0]), dtype=np.float64) / 65535
    diff = np.asarray(Image.open(folder / rows[0]["difference"].split(";")[0]), dtype=np.float64) / 65535
    assert np.abs(diff - (0.5 + (cf - src) / 2)).max() < 3e-5
    assert not any("phantom_p" in p.name for p in folder.iterdir())
    # a rerun replaces the set; a folder with foreign files is refused
    _bundle_run("counterfactual.json", data, out, "--counterfactual_limit", "2", "--formats", "['png']")
    assert len(list(folder.glob("source_*"))) == 2


def test_counterfactual_region_lungs_changes_only_the_estimated_lungs(tiny_run):
    import nibabel as nib

    from monai_condflow.transforms import estimate_lung_mask

    data, out = tiny_run
    for region in ("lungs", "image"):
        _bundle_run("counterfactual.json", data, out, "--counterfactual_limit", "4", "--formats", "['nifti']",
                    "--counterfactual_region", region, "--counterfactual_dir", str(out / f"cf_{region}"))  # fmt: skip
    outside = {}
    for region in ("lungs", "image"):
        folder = out / f"cf_{region}"
        summary = json.loads((folder / "counterfactual.json").read_text())
        assert summary["region"] == region and summary["empty_masks"] == 0
        changes = []
        for r in csv.DictReader((folder / "manifest.csv").open()):
            src = np.asarray(nib.load(folder / r["source"]).dataobj, dtype=np.float64).squeeze()
            diff = np.asarray(nib.load(folder / r["difference"]).dataobj, dtype=np.float64).squeeze()
            # the mask is estimated on the stored source, in the NIfTI's axis order, which the difference shares
            changes.append(float(np.abs(diff[~estimate_lung_mask(src, erosion=1)]).max()))  # the default margin
        outside[region] = max(changes)
        if region == "lungs":
            assert 0.0 < summary["mean_region_fraction"] < 1.0 and summary["region_margin"] == 1
    # outside the lungs the restricted set is the source exactly; the whole-image one is not (a 1-epoch flow changes
    # little, but not nothing)
    assert outside["lungs"] == 0.0 and outside["image"] > 0.0
    # bad values are refused by their config ids (in-process: the command line's message is test_bundle_ids.py's)
    for key, value in (("counterfactual_region", "heart"), ("counterfactual_region_margin", -1)):
        wf = _workflow(["counterfactual.json"], **TINY, dataset_dir=str(data), output_dir=str(out), **{key: value})
        assert f"config id '{key}'" in str(_refusal(wf, ConfigValueError))


def test_novelty_config_scores_and_auroc(tiny_run):
    data, out = tiny_run
    ood = out.parent / "ood.npz"
    rng = np.random.default_rng(0)
    np.savez(ood, images=rng.integers(0, 255, (6, 32, 32), dtype=np.uint8), labels=np.zeros(6, dtype=np.int64),
             class_names=np.array(["noise"]))  # fmt: skip
    _bundle_run("novelty.json", data, out, "--ood_npz", str(ood), "--novelty_statistic", "typicality")
    summary = json.loads((out / "novelty" / "novelty.json").read_text())
    rows = list(csv.DictReader((out / "novelty" / "scores.csv").open()))
    assert summary["novel"] == 6 and len(rows) == summary["count"]
    assert summary["auroc"] > 0.9  # uniform noise is far from phantom slices even for a 1-epoch flow
    assert 0.0 <= summary["auroc_max_softmax"] <= 1.0
    # the score columns are the typicality statistic: |bpd - mean reference bpd| has one centre for all rows
    bpd = torch.tensor([float(r["bpd"]) for r in rows], dtype=torch.float64)
    score = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64)
    centres = torch.stack([bpd - score, bpd + score], 1)  # one of the two is the reference mean
    mean = min(centres.flatten().tolist(), key=lambda m: float(((bpd - m).abs() - score).abs().max()))
    assert torch.allclose((bpd - mean).abs(), score, atol=1e-4)


def test_novelty_heat_maps(tiny_run):
    """``--heat_maps True`` writes one NIfTI map per scored row (bits per pixel above the reference's mean map) and an
    overview of the highest-scoring images; a value that is not a boolean is refused by its config id."""
    import nibabel as nib

    data, out = tiny_run
    _bundle_run("novelty.json", data, out, "--heat_maps", "True", "--novelty_dir", str(out / "novelty_heat"))
    folder = out / "novelty_heat"
    summary = json.loads((folder / "novelty.json").read_text())
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    record = summary["heat_maps"]
    assert record["count"] == len(rows) == summary["count"]
    maps = sorted((folder / "heat_maps").glob("heat_*.nii.gz"))
    assert len(maps) == len(rows) and (folder / "heat_maps" / "overview.png").is_file()
    values = np.stack([np.asarray(nib.load(str(f)).dataobj) for f in maps])
    assert values.shape[1:] == (32, 32) and np.isfinite(values).all() and values.std() > 0
    # the map of a row sums to its bits above the reference: D * (bpd - mean reference bpd) for the own-bits map
    bpd = np.array([float(r["bpd"]) for r in rows])
    offsets = values.reshape(len(rows), -1).sum(1) / (32 * 32) - (bpd - 8)
    assert np.allclose(offsets, offsets[0], atol=1e-3)  # one reference constant for every row
    top = record["overview_indices"]
    scores = [float(rows[i]["score"]) for i in top]
    assert scores == sorted(scores, reverse=True) and max(float(r["score"]) for r in rows) == scores[0]
    # bad values are refused by their config ids before anything is written (in-process, as the command line's
    # values parse: "yes" stays a string, 2 an int, [7] a list); novel_labels: a bare number crashed inside the
    # scoring (TypeError), a class no image has gave AUROC None
    for key, value, text in (("heat_maps", "yes", ""), ("novel_labels", 2, "must be a list of class ids"),
                             ("novel_labels", [7], "names class(es) [7] that no scored image has")):  # fmt: skip
        wf = _workflow(["novelty.json"], **TINY, dataset_dir=str(data), output_dir=str(out),
                       novelty_dir=str(out / "bad"), **{key: value})  # fmt: skip
        message = str(_refusal(wf, ConfigValueError, run=True))
        assert f"config id '{key}'" in message and text in message, (value, message)
        assert not (out / "bad").exists()


def test_novelty_likelihood_ratio_against_a_background_flow_trained_by_the_flow_stage(tiny_run):
    """A background flow trained by ``train_flow.json`` into its own ``flow_dir`` (same run, same classifier);
    ``novelty.json`` with ``likelihood_ratio`` scores every row by ``bpd - background_bpd``; without the background
    the statistic is refused by its config id."""
    data, out = tiny_run
    background = out / "flow_background"
    _run(["train_flow.json"], **TINY, dataset_dir=str(data), output_dir=str(out), flow_dir=str(background),
         flow_overrides={"num_levels": 2, "num_steps": 1, "num_blocks": 1, "hidden_channels": 4},
         sample_every=0, adversarial_steps=0)  # fmt: skip
    _bundle_run("novelty.json", data, out, "--novelty_statistic", "likelihood_ratio", "--background_flow_dir",
                str(background), "--novel_labels", "[1]")  # fmt: skip
    summary = json.loads((out / "novelty" / "novelty.json").read_text())
    rows = list(csv.DictReader((out / "novelty" / "scores.csv").open()))
    assert summary["statistic"] == "likelihood_ratio" and 0.0 <= summary["auroc"] <= 1.0
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(r["bpd"]) - float(r["background_bpd"]), abs=2e-5)
    assert len({round(float(r["background_bpd"]) - float(r["bpd"]), 4) for r in rows}) > 1  # a real second model
    from monai_condflow.engines.counterfactual import score_novelty

    with pytest.raises(ValueError, match="config id 'background_flow_dir'"):  # before any file is read or written
        score_novelty(torch.nn.Identity(), torch.nn.Identity(), [], [], out / "unused", statistic="likelihood_ratio")
    assert not (out / "unused").exists()
