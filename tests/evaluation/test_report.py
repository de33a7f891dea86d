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
"""Tests for the evaluation report writer and the end-to-end run_evaluation with tiny stand-in models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from monai_condflow.evaluation.report import read_tensorboard_scalars, run_evaluation, write_report

_SCORES = {"accuracy": 0.7, "f1": 0.69, "precision": 0.68, "recall": 0.78, "accuracy_std": 0.02}


def test_reading_the_logs_keeps_tensorboards_per_file_info_lines_out_of_the_run_log(tmp_path, caplog):
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "flow"))
    writer.add_scalar("val_bpd", 5.0, 0)
    writer.close()
    tb_logger = logging.getLogger("tensorboard")
    with caplog.at_level(logging.INFO):
        EventAccumulator(str(tmp_path / "flow")).Reload()  # TensorBoard's own reader, for comparison
        control = [r for r in caplog.records if r.name.startswith("tensorboard")]
        caplog.clear()
        level = tb_logger.level
        assert read_tensorboard_scalars(tmp_path)["flow"]["val_bpd"] == ([0], [5.0])
        assert tb_logger.level == level
        tb_logger.warning("a warning of TensorBoard's")
    assert control, "TensorBoard's reader logged nothing at INFO: the check below would mean nothing"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tensorboard")] == [
        "a warning of TensorBoard's"
    ]


def test_write_report_tables_json_and_curves(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard" / "flow"))
    for step, v in enumerate([5.0, 4.5, 4.2]):
        writer.add_scalar("val_bpd", v, step)
    writer.close()
    steps, values = read_tensorboard_scalars(tmp_path / "tensorboard")["flow"]["val_bpd"]
    assert steps == [0, 1, 2] and values == pytest.approx([5.0, 4.5, 4.2])
    metrics = {
        "trtr": _SCORES,
        "tstr": dict(_SCORES, accuracy=0.64),
        "fid": 0.163,
        "fid_floor": 0.0034,
        "class_agreement": 0.678,
        "odd": float("nan"),
        "baseline": {"trtr": _SCORES, "tstr": dict(_SCORES, accuracy=0.5), "fid": 0.4},
    }
    report, js = write_report(
        tmp_path, metrics, data_summary={"train": 10}, sample_images={"flow c1": torch.rand(3, 1, 8, 8)}
    )
    text = report.read_text()
    assert "| conditional flow | 0.163 | 0.0034 | 47.9 | 0.678 | 64.00 ± 2.00 |" in text
    assert "| real (TRTR) | 70.00 ± 2.00 | 69.00 | 68.00 | 78.00 |" in text
    assert "ACGAN synthetic (TSTR)" in text and "figures/grid_flow_c1.png" in text
    assert "curve_flow_val_bpd.png" in text and (tmp_path / "figures" / "curve_flow_val_bpd.png").is_file()
    data = json.loads(js.read_text())
    assert data["odd"] is None and data["fid"] == 0.163 and data["baseline"]["tstr"]["accuracy"] == 0.5
    assert set(data["trtr"]) >= {"accuracy", "f1", "precision", "recall"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    # the report opens with the headline figures (issue 14)
    assert text.startswith("# monai_condflow evaluation\n\n## Headline\n")
    assert text.index("## Headline") < text.index("## Fidelity") < text.index("## Utility")
    assert "| figure | conditional flow | ACGAN baseline |" in text
    assert "| TSTR accuracy (synthetic-trained, real test) | 64.0 % | 50.0 % |" in text
    assert "| gap TRTR - TSTR | +6.0 points | +20.0 points |" in text
    assert "0.678 (real test accuracy 0.700)" in text and "0.163 / 0.0034 = 47.9" in text
    assert "| membership-inference AUC (0.5 = no memorisation signal) | n/a |" in text
    assert "n/a (all labels or not recorded)" in text
    assert data["headline"]["gap_points"] == pytest.approx(6.0) and data["headline"]["mia_auc"] is None
    assert data["headline"]["baseline"]["tstr_accuracy"] == 0.5


def test_report_headline_with_samples_privacy_presumptive_and_side_by_side_grids(tmp_path):
    metrics = {
        "trtr": _SCORES,
        "tstr": dict(_SCORES, accuracy=0.61),
        "fid": 0.2,
        "fid_floor": 0.01,
        "class_agreement": 0.538,
        "class_agreement_per_class": [0.25, 0.9876],
        "class_names": ["non-COVID", "COVID"],
        "class_agreement_real_blurred": 0.371,
        "sharpness_ratio": 0.4567,
        "variety_ratio": 0.6123,
        "lattice_peak": 17.346,
        "lattice_peak_real": 1.084,
        "real_classifier_test_accuracy": 0.886,
        "samples": {"n_images": 200, "images_with_overflow": 3, "overflow_pixel_fraction": 0.0005, "n_dropped": 0},
        "privacy": {"mia_auc": 0.976},
        "presumptive_accuracy": 0.712,
    }
    grids = {f"{src} {c}": torch.rand(4, 1, 8, 8) for c in ("non-COVID", "COVID") for src in ("real", "flow")}
    report, js = write_report(tmp_path, metrics, sample_images=grids)
    text = report.read_text()
    head = text[: text.index("## Fidelity")]
    assert "| figure | conditional flow |" in head and "ACGAN" not in head
    assert "| TRTR accuracy (real-trained, real test) | 70.0 % |" in head
    assert "| gap TRTR - TSTR | +9.0 points |" in head
    assert (
        "0.538 (by conditioning class: non-COVID 0.250, COVID 0.988; real test accuracy 0.886; real training slices "
        "blurred by 1 px: 0.371)" in head
    )
    assert "| fine detail, synthetic / real (Laplacian energy; below 1: blurrier) | 0.457 |" in head
    assert "| variety of a class, synthetic / real (per-pixel std; below 1: fewer modes) | 0.612 |" in head
    assert (
        "| periodic lattice at the squeeze periods (spectral peak over its neighbours; about 1 without one; real "
        "training slices: 1.08) | 17.35 |" in head
    )
    assert "0.2 / 0.01 = 20" in head
    assert "| 3 / 200 (0.05 % of pixels) |" in head
    assert "| membership-inference AUC (0.5 = no memorisation signal) | 0.976 |" in head
    assert "| presumptive-label accuracy (label propagation) | 0.712 |" in head
    # real and synthetic grids side by side, one row per class, right below the headline table
    assert "| class | real | flow |" in head
    assert "| COVID | ![real COVID](figures/grid_real_COVID.png) | ![flow COVID](figures/grid_flow_COVID.png) |" in head
    assert "| non-COVID | ![real non-COVID](figures/grid_real_non_COVID.png) |" in head
    assert (tmp_path / "figures" / "grid_flow_non_COVID.png").is_file()
    assert "## Sample grids" in text  # the detailed sections are kept below
    data = json.loads(js.read_text())
    assert data["headline"]["images_with_overflow"] == 3 and data["headline"]["presumptive_accuracy"] == 0.712
    assert data["headline"]["real_test_accuracy"] == 0.886 and data["headline"]["fid_ratio"] == pytest.approx(20)
    assert data["headline"]["sharpness_ratio"] == 0.4567 and data["headline"]["class_agreement_real_blurred"] == 0.371
    assert data["headline"]["variety_ratio"] == 0.6123
    assert data["headline"]["lattice_peak"] == 17.346 and data["headline"]["lattice_peak_real"] == 1.084
    assert data["headline"]["class_agreement_per_class"] == [0.25, 0.9876]
    assert data["headline"]["class_names"] == ["non-COVID", "COVID"]


def test_write_report_rejects_missing_metric(tmp_path):
    with pytest.raises(ValueError, match="tstr.recall"):
        write_report(tmp_path, {"trtr": _SCORES, "tstr": {"accuracy": 1, "f1": 1, "precision": 1}, "fid": 0.1})
    with pytest.raises(ValueError, match="fid"):
        write_report(tmp_path, {"trtr": _SCORES, "tstr": _SCORES, "fid": math.nan})
    assert not (tmp_path / "metrics.json").exists()


class _Centroid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_channels = 2
        self.centroids = nn.Parameter(torch.tensor([0.2, 0.8]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.embed(x) - self.centroids).abs()


def _fit(network, train, val, *, seed, device, **kwargs):
    with torch.no_grad():
        for c in range(2):
            network.centroids[c] = train[0][train[1] == c].mean()
    return network


class _FlowStandIn(nn.Module):
    """Keeps the mean intensity ``z`` and adds noise; the first image of every call is NaN (must be dropped)."""

    def sample(self, condition, temperature=0.9, generator=None):
        x = condition.reshape(-1, 1, 1, 1) + 0.05 * temperature * torch.randn(
            condition.shape[0], 1, 4, 4, generator=generator
        )
        x[0] = float("nan")
        return x


class _ClampingFlow(nn.Module):
    """Like ``ConditionalGlow.sample``: its inverse overflows (1e6 in image 1, NaN in image 2 of every call); it counts
    per image before clamping and hands back finite images in [0, 1] with ``return_stats``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def inverse(self, condition, temperature, generator):
        x = condition.reshape(-1, 1, 1, 1) + 0.05 * temperature * torch.randn(
            condition.shape[0], 1, 4, 4, generator=generator
        )
        if x.shape[0] > 2:
            x[1, 0, 0, :2] = 1e6
            x[2, 0, 0, 0] = float("nan")
        return x

    def sample(self, condition, temperature=0.9, generator=None, return_stats=False):
        x = self.inverse(condition, temperature, generator)
        flat = x.flatten(1)
        finite = torch.isfinite(flat)
        stats = {
            "overflow_pixels": (~finite | (flat < -0.25) | (flat > 1.25)).sum(1),
            "nonfinite_pixels": (~finite).sum(1),
        }
        x = torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1)
        return (x, stats) if return_stats else x


class _MemorisingFlow(_FlowStandIn):
    """Bits/dim = distance to the nearest of its training images: every member scores 0, every non-member more."""

    def __init__(self, members: torch.Tensor) -> None:
        super().__init__()
        self.members = members.flatten(1)

    def bits_per_dim(self, x, condition=None, n_bits=8):
        return torch.cdist(x.flatten(1), self.members).min(1).values + n_bits


class _GanStandIn(nn.Module):
    def sample(self, labels, generator=None):
        return (
            0.3
            + 0.4 * labels.float().reshape(-1, 1, 1, 1)
            + 0.1 * torch.randn(labels.shape[0], 1, 4, 4, generator=generator)
        )


def _data(n0, n1, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
    return (0.2 + 0.6 * labels.float()).reshape(-1, 1, 1, 1) + 0.05 * torch.randn(n0 + n1, 1, 4, 4, generator=g), labels


def test_run_evaluation_end_to_end(tmp_path):
    metrics = run_evaluation(
        tmp_path,
        _data(40, 12, 0),
        _data(20, 10, 1),
        _data(20, 10, 2),
        classifier=_Centroid(),
        flow=_FlowStandIn(),
        acgan=_GanStandIn(),
        eval_network_factory=_Centroid,
        fit_fn=_fit,
        n_synthetic_sets=2,
        n_bootstrap=10,
        augmentation=True,
        batch_size=16,
        class_names=["non-COVID", "COVID"],
        train_kwargs={"max_epochs": 3, "schedule": "onecycle"},
    )
    assert metrics["trtr"]["accuracy"] == 1.0 and metrics["tstr"]["accuracy"] > 0.95
    assert metrics["evaluation_training"] == {"max_epochs": 3, "schedule": "onecycle"}
    assert metrics["class_agreement"] > 0.95 and metrics["nonfinite_fraction"] > 0
    # per conditioning class; the overall agreement of a set is their count-weighted mean, so it lies between them,
    # and an overall agreement above 0.95 with 12 of 52 conditions in class 1 leaves each class above 0.78
    per_class = metrics["class_agreement_per_class_per_set"]
    assert len(per_class) == 2 and all(len(row) == 2 for row in per_class)
    for row, overall in zip(per_class, metrics["class_agreement_per_set"]):
        assert min(row) <= overall <= max(row) and min(row) > 0.75
    assert metrics["class_agreement_per_class"] == pytest.approx([sum(col) / 2 for col in zip(*per_class)])
    assert metrics["class_names"] == ["non-COVID", "COVID"]
    base = metrics["baseline"]["class_agreement_per_class"]
    assert len(base) == 2 and all(0.0 <= v <= 1.0 for v in base)
    # the stand-in's first image of every call (16 per batch) is NaN: counted before clamping, then dropped
    samples = metrics["samples"]
    assert samples["n_images"] == 2 * 52 and samples["images_with_nonfinite"] == 2 * 4
    assert samples["images_with_overflow"] >= 8 and samples["n_dropped_nonfinite"] == 8
    assert samples["nonfinite_pixel_fraction"] == pytest.approx(8 / (2 * 52))
    assert samples["counted_on"] == "flow" and samples["range"] == [-0.25, 1.25]
    assert samples["sampling_prior"] == {"kind": "standard"}  # a flow without a fitted sampling prior
    assert metrics["nonfinite_fraction"] == pytest.approx(8 / 104)
    assert metrics["baseline"]["samples"]["counted_on"] == "sampler output"
    assert metrics["presumptive_accuracy"] is None and metrics["presumptive_labels"] is None
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["fid_floor"])
    assert metrics["baseline"]["fid"] > metrics["fid"]  # the stand-in GAN shifts both class means
    assert [r["n_added"] for r in metrics["augmentation"]["rows"]] == [0, 7, 14, 28]
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["baseline"]["tstr"]["recall"] == pytest.approx(metrics["baseline"]["tstr"]["recall"])
    text = (tmp_path / "report.md").read_text()
    assert "grid_flow_COVID.png" in text and "augmentation.png" in text
    assert text.index("## Headline") < text.index("| class | real | flow | acgan |") < text.index("## Data")
    assert "| 8 / 104 (" in text and "non-finite flow samples dropped" not in text
    assert "8 of 104 images had pixels outside [-0.25, 1.25] or non-finite" in text
    assert "standard N(0, T^2 I)" in text
    assert "(by conditioning class: non-COVID " in text and ", COVID " in text
    assert (
        "| evaluation classifiers (TRTR, TSTR, augmentation, FID features) | max_epochs 3, schedule onecycle (_fit) |"
        in text
    )
    assert data["samples"]["images_with_overflow"] == samples["images_with_overflow"]
    assert (tmp_path / "figures" / "augmentation.png").is_file()


def test_run_evaluation_with_two_judges_reports_both_and_their_means(tmp_path):
    seeds = []

    def judge_fit(network, train, val, *, seed, device, **kwargs):
        # the judge of seed 1 puts class 1's centroid far out: it calls every image class 0
        seeds.append(seed)
        network = _fit(network, train, val, seed=seed, device=device)
        if seed == 1:
            with torch.no_grad():
                network.centroids[1] += 1.0
        return network

    common = dict(
        classifier=_Centroid(), flow=_FlowStandIn(), eval_network_factory=_Centroid, fit_fn=judge_fit,
        n_synthetic_sets=2, n_bootstrap=0, batch_size=16, privacy_audit=False, class_names=["non-COVID", "COVID"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="'n_judges' must be an integer >= 1"):
        run_evaluation(tmp_path, _data(40, 12, 0), _data(20, 10, 1), _data(20, 10, 2), n_judges=0, **common)
    assert seeds == [] and not (tmp_path / "metrics.json").exists()  # refused before any training
    metrics = run_evaluation(tmp_path, _data(40, 12, 0), _data(20, 10, 1), _data(20, 10, 2), n_judges=2, **common)
    assert seeds[:2] == [0, 1] and metrics["n_judges"] == 2
    # batches of 16 conditions drop images 0, 16, 32 (class 0) and 48 (class 1): 37 of the 48 kept are class 0
    good, zero = metrics["class_agreement_per_judge"]
    assert good > 0.95 and zero == pytest.approx(37 / 48)
    assert metrics["class_agreement"] == pytest.approx((good + zero) / 2)
    assert metrics["class_agreement_per_class"][1] < 0.51  # the second judge never agrees on class 1
    # the judges' own test accuracy: 1.0 and 20 / 30
    assert metrics["real_classifier_test_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert len(metrics["fid_per_judge"]) == len(metrics["fid_floor_per_judge"]) == 2
    assert metrics["fid_floor"] == pytest.approx(sum(metrics["fid_floor_per_judge"]) / 2)
    assert metrics["fid"] == pytest.approx(sum(metrics["fid_per_judge"]) / 2)
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["fid_floor"])
    assert metrics["fid_ratio_per_judge"] == pytest.approx(
        [f / fl for f, fl in zip(metrics["fid_per_judge"], metrics["fid_floor_per_judge"])]
    )
    text = (tmp_path / "report.md").read_text()
    assert f"; 2 evaluation classifiers: {zero:.3f} to {good:.3f}) |" in text
    ratios = metrics["fid_ratio_per_judge"]
    assert f"(2 evaluation classifiers: {min(ratios):.3g} to {max(ratios):.3g}) |" in text
    assert "TRTR over 2 real-data classifiers" in text
    assert f"(reference): {metrics['class_agreement_real']:.3f} (mean over 2 classifiers)." in text


@pytest.mark.parametrize("held_back", [False, True])
def test_run_evaluation_privacy_block(tmp_path, held_back):
    train = _data(40, 12, 0)
    mask = torch.zeros(52, dtype=torch.bool)
    mask[::4] = True  # 13 held-back images
    members = train[0][~mask] if held_back else train[0]
    metrics = run_evaluation(
        tmp_path,
        train,
        _data(20, 10, 1),
        _data(20, 10, 2),
        classifier=_Centroid(),
        flow=_MemorisingFlow(members),
        eval_network_factory=_Centroid,
        fit_fn=_fit,
        n_synthetic_sets=1,
        n_bootstrap=5,
        batch_size=16,
        audit_holdout=mask if held_back else None,
    )
    block = json.loads((tmp_path / "metrics.json").read_text())["privacy"]
    assert block["epsilon"] is None and block["delta"] is None  # no DP stage info in this run folder
    assert block["mia_auc"] == 1.0  # the memorising flow gives every member a lower bits/dim than any non-member
    assert block["mia"]["n_train"] == (39 if held_back else 52)
    assert block["mia"]["n_holdout"] == (13 if held_back else 30)
    assert block["holdout"] == ("held-back training images" if held_back else "real test split")
    assert set(block["dcr"]) == {"pixel", "embedding"} and block["dcr"]["pixel"]["n_synthetic"] > 0
    assert metrics["privacy"]["mia_auc"] == 1.0
    text = (tmp_path / "report.md").read_text()
    assert "## Privacy" in text and "AUC = 1.000" in text
    with pytest.raises(ValueError, match="audit_holdout has 3 entries"):
        run_evaluation(
            tmp_path / "bad",
            train,
            _data(20, 10, 1),
            _data(20, 10, 2),
            classifier=_Centroid(),
            flow=_MemorisingFlow(members),
            eval_network_factory=_Centroid,
            fit_fn=_fit,
            n_synthetic_sets=1,
            n_bootstrap=5,
            audit_holdout=torch.ones(3, dtype=torch.bool),
        )


def test_report_metrics_and_figures_get_normal_permissions(tmp_path):
    """Results meant to be shared (metrics.json, report.md, figures) are 0644 under umask 022, not mkstemp's 0600."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        metrics = {"trtr": _SCORES, "tstr": _SCORES, "fid": 0.1}
        report, js = write_report(tmp_path, metrics, sample_images={"c": torch.rand(2, 1, 8, 8)})
    finally:
        os.umask(old)
    files = [report, js, *(tmp_path / "figures").iterdir()]
    assert len(files) >= 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_too_few_validation_or_test_images_for_fid_fail_before_any_training(tmp_path):
    """the evaluation refuses sets too small for FID (N <= D) before it trains its classifier or samples."""
    trained = []

    def fit(network, train, val, **kwargs):
        trained.append(1)
        return _fit(network, train, val, **kwargs)

    class _Wide(_Centroid):  # D = 16 features
        def embed(self, x):
            return x.flatten(1)

    common = {"classifier": _Centroid(), "flow": _FlowStandIn(), "eval_network_factory": _Wide, "fit_fn": fit,
              "n_synthetic_sets": 1, "n_bootstrap": 2, "augmentation": False, "privacy_audit": False}  # fmt: skip
    with pytest.raises(ValueError, match=r"validation set has N=10 .*D=16.*before training anything"):
        run_evaluation(tmp_path, _data(40, 12, 0), _data(6, 4, 1), _data(20, 10, 2), **common)
    with pytest.raises(ValueError, match=r"test set has N=16 .*D=16"):
        run_evaluation(tmp_path, _data(40, 12, 0), _data(20, 10, 1), _data(8, 8, 2), **common)
    # the synthetic sets have one image per training image: a small training split is named, not "features_a"
    with pytest.raises(ValueError, match=r"the training set \(each synthetic set has one image per training image\) "
                       r"has N=12 .*D=16.*add training images"):
        run_evaluation(tmp_path, _data(6, 6, 0), _data(20, 10, 1), _data(20, 10, 2), **common)
    # class names are checked as the synthetic set's manifest checks them: one per class, a list in id order (a
    # name -> id dict would name the classes in key order)
    for names, match in ((["non-COVID"], r"num_classes 2 has class id\(s\) \[1\]"),
                         ({"COVID": 1, "non-COVID": 0}, "list of non-empty names in class-id order")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            run_evaluation(tmp_path, _data(40, 12, 0), _data(20, 10, 1), _data(20, 10, 2), class_names=names, **common)
    assert trained == [] and not (tmp_path / "metrics.json").exists()


def _records(images: torch.Tensor, labels: torch.Tensor, name: str) -> list[dict]:
    return [{"image": im.numpy(), "label": int(y), "image_path": f"{name}_{i}.png"} for i, (im, y) in
            enumerate(zip(images, labels))]  # fmt: skip


def test_check_evaluation_data_refuses_a_shared_image_and_splits_too_small_for_fid():
    """The evaluation's requirements of the real splits, checked on preprocessed records before any training (the
    pipeline's pre-flight): an image in two splits names both files; a split with N <= D (the default evaluation
    classifier's 32-d embedding) names the split and N; good splits pass."""
    from monai_condflow.data.errors import DataError
    from monai_condflow.evaluation.report import check_evaluation_data

    def split(n, seed, name):
        images = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        return _records(images, torch.arange(n) % 2, name)

    train, val, test = split(40, 0, "train"), split(34, 1, "val"), split(33, 2, "test")
    assert check_evaluation_data(train, val, test, 2) is True
    with pytest.raises(ValueError, match=r"the test set has N=32 .*D=32.*at least 33.*add test images"):
        check_evaluation_data(train, val, test[:32], 2)
    with pytest.raises(ValueError, match=r"the validation set has N=20 .*D=32"):
        check_evaluation_data(train, val[:20], test, 2)
    with pytest.raises(ValueError, match=r"the training set \(each synthetic set .*\) has N=30 .*D=32"):
        check_evaluation_data(train[:30], val, test, 2)
    with pytest.raises(ValueError, match="the validation split is empty"):
        check_evaluation_data(train, [], test, 2)
    leaked = test[:-1] + [dict(train[5], image_path="test_copy.png")]
    with pytest.raises(DataError, match=r"train_5\.png.*test_copy\.png"):
        check_evaluation_data(train, val, leaked, 2)

    class _Wide(_Centroid):  # another evaluation network: its own feature dimension D = 256
        def embed(self, x):
            return x.flatten(1)

    with pytest.raises(ValueError, match=r"the training set .* has N=40 .*D=256"):
        check_evaluation_data(train, val, test, 2, classifier_factory=_Wide)


def test_run_evaluation_counts_an_overflowing_inverse(tmp_path):
    """a flow whose inverse returns 1e6 / NaN in some pixels but clamps its output: the pre-clamp counts reach
    metrics.json and report.md (the old code saw clean images and reported 0)."""
    clamping = _ClampingFlow()
    # a flow whose sampling prior was fitted (the report names it and its shrinkage)
    clamping.sampling_prior = type("Fitted", (), {"fitted": True, "shrinkage": torch.tensor(0.25)})()
    metrics = run_evaluation(
        tmp_path,
        _data(40, 12, 0),
        _data(20, 10, 1),
        _data(20, 10, 2),
        classifier=_Centroid(),
        flow=clamping,
        eval_network_factory=_Centroid,
        fit_fn=_fit,
        n_synthetic_sets=2,
        n_bootstrap=5,
        batch_size=16,
        privacy_audit=False,
    )
    samples = json.loads((tmp_path / "metrics.json").read_text())["samples"]
    # 52 images per set in batches of 16, 16, 16, 4: images 1 and 2 of every batch overflow, image 2 non-finite
    assert samples["n_images"] == 104 and samples["images_with_overflow"] == 16
    assert samples["images_with_nonfinite"] == 8 and samples["n_dropped_nonfinite"] == 0
    assert samples["sampling_prior"] == {"kind": "fitted", "shrinkage": 0.25}
    assert "fitted to the encoded training set (covariance shrinkage 0.25)" in (tmp_path / "report.md").read_text()
    assert samples["overflow_pixel_fraction"] == pytest.approx((8 * 2 + 8) / (104 * 16))
    assert samples["nonfinite_pixel_fraction"] == pytest.approx(8 / (104 * 16))
    assert metrics["nonfinite_fraction"] == pytest.approx(8 / 104)
    text = (tmp_path / "report.md").read_text()
    assert "| 16 / 104 (1.44 % of pixels) |" in text


def test_run_evaluation_presumptive_label_accuracy(tmp_path):
    """Presumptive labels of classifier/train_labels.json are scored against the true labels of the same records."""
    from monai_condflow.engines.stage_io import write_training_labels

    train = _data(40, 12, 0)
    records = [{"image": f"/d/img_{i}.png", "source": f"train.txt:{i + 1}", "label": int(y)} for i, y in
               enumerate(train[1])]  # fmt: skip
    labelled, unlabelled = records[:10], records[10:]
    guesses = [r["label"] for r in unlabelled]
    for i in range(0, 42, 6):  # 7 of 42 wrong
        guesses[i] = 1 - guesses[i]
    write_training_labels(tmp_path / "classifier", labelled, unlabelled, guesses)
    metrics = run_evaluation(
        tmp_path,
        train,
        _data(20, 10, 1),
        _data(20, 10, 2),
        classifier=_Centroid(),
        flow=_FlowStandIn(),
        eval_network_factory=_Centroid,
        fit_fn=_fit,
        n_synthetic_sets=1,
        n_bootstrap=5,
        batch_size=16,
        privacy_audit=False,
        true_train_records=records,
    )
    assert metrics["presumptive_accuracy"] == pytest.approx(35 / 42)
    block = json.loads((tmp_path / "metrics.json").read_text())["presumptive_labels"]
    assert block["n_presumptive"] == 42 and block["n_compared"] == 42 and block["n_labelled"] == 10
    assert "| presumptive-label accuracy (label propagation) | 0.833 |" in (tmp_path / "report.md").read_text()
    # without the true labels: the last label-propagation round of classifier.json
    (tmp_path / "classifier" / "classifier.json").write_text(json.dumps({"rounds": [{"presumptive_accuracy": 0.7}]}))
    again = run_evaluation(
        tmp_path,
        train,
        _data(20, 10, 1),
        _data(20, 10, 2),
        classifier=_Centroid(),
        flow=_FlowStandIn(),
        eval_network_factory=_Centroid,
        fit_fn=_fit,
        n_synthetic_sets=1,
        n_bootstrap=5,
        batch_size=16,
        privacy_audit=False,
    )
    assert again["presumptive_accuracy"] == 0.7 and again["presumptive_labels"]["n_compared"] == 0


def test_load_module_reads_the_stages_model_pt_and_nothing_else(tmp_path):
    """One name per stage model: ``model.pt`` with its weights under ``network``; no guessing among other files."""
    from monai_condflow.evaluation.report import load_module

    net = nn.Linear(3, 2)
    (tmp_path / "stage").mkdir()
    torch.save({"network": net.state_dict()}, tmp_path / "stage" / "other_best.pt")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_module(tmp_path / "stage", lambda: nn.Linear(3, 2), "stage")
    torch.save({"network": net.state_dict(), "optimizer": {}}, tmp_path / "stage" / "model.pt")
    loaded = load_module(tmp_path / "stage", lambda: nn.Linear(3, 2), "stage")
    assert torch.equal(loaded.weight, net.weight) and not loaded.training
    torch.save(net.state_dict(), tmp_path / "bare.pt")  # a bare state dict file
    assert torch.equal(load_module(tmp_path / "bare.pt", lambda: nn.Linear(3, 2), "x").bias, net.bias)


def test_evaluation_training_records_a_transform_chain_by_its_steps():
    from monai.transforms import Compose, RandAffined, RandShiftIntensityd

    from monai_condflow.evaluation.report import _describe

    chain = Compose([RandAffined("image", prob=1.0), Compose([RandShiftIntensityd("image", offsets=0.1)])])
    assert _describe(chain) == "Compose(RandAffined, Compose(RandShiftIntensityd))"
    assert _describe(0.5) == "0.5" and _describe([1, 2]) == "[1, 2]"


def test_the_report_names_the_classes_of_per_class_recall_and_the_augmentations_minority(tmp_path):
    """Three classes: "per-class recall (%)" gave bare numbers ("13.9, 63.3, 0.0") and the augmentation section never
    said which class it topped up; both are named from metrics' class_names (bare numbers without them)."""
    scores = dict(_SCORES, per_class_recall=[0.139, 0.633, 0.0])
    row = {"fraction": 1.0, "n_added": 30, "minority_recall": 0.5, "recall": 0.6, "accuracy": 0.7, "f1": 0.6}
    metrics = {"trtr": scores, "tstr": scores, "fid": 0.1, "class_names": ["normal", "pneumonia", "COVID-19"],
               "augmentation": {"minority_class": 2, "gap": 30, "rows": [row]}}  # fmt: skip
    text = write_report(tmp_path, metrics)[0].read_text()
    assert "- per-class recall (%), real (TRTR): normal 13.9, pneumonia 63.3, COVID-19 0.0" in text
    assert "Minority class: COVID-19 (class 2), the rarest in the real training split" in text
    metrics.pop("class_names")
    text = write_report(tmp_path / "bare", metrics)[0].read_text()
    assert "- per-class recall (%), real (TRTR): 13.9, 63.3, 0.0" in text and "Minority class: class 2," in text
