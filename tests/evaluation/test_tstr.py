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
"""Tests for TSTR / TRTR evaluation with a nearest-centroid stand-in classifier (hand-checkable results)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_condflow.evaluation.tstr import (
    as_image_set,
    bootstrap_indices,
    bootstrap_scores,
    class_agreement,
    default_fit_fn,
    evaluate_tstr,
    match_class_composition,
    summarize_scores,
)


class _Centroid(nn.Module):
    """Nearest class centroid on the mean intensity; ``fit`` sets the centroids from training data."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.out_channels = num_classes
        self.centroids = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x.flatten(1).mean(1, keepdim=True) - self.centroids).abs()


def _centroid_fit(network, train, val, *, seed, device, **kwargs):
    images, labels = train
    with torch.no_grad():
        for c in range(network.centroids.numel()):
            network.centroids[c] = images[labels == c].mean()
    return network


def _data(n0: int, n1: int, seed: int, swap: bool = False):
    """Class 0 dark (~0.2), class 1 bright (~0.8); ``swap`` flips the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
    images = (0.2 + 0.6 * labels.float()).reshape(-1, 1, 1, 1) + 0.05 * torch.randn(n0 + n1, 1, 4, 4, generator=g)
    return images, (1 - labels) if swap else labels


def test_bootstrap_and_summary_hand_values():
    y_true = torch.tensor([0, 0, 1, 1])
    y_pred = torch.tensor([0, 1, 1, 1])
    (full,) = bootstrap_scores(y_true, y_pred, 2, None)
    # precision: c0 1/1, c1 2/3 -> 5/6; recall: c0 1/2, c1 1 -> 3/4; F1: c0 2/3, c1 4/5 -> 11/15
    assert full == pytest.approx({"accuracy": 0.75, "precision": 5 / 6, "recall": 0.75, "f1": 11 / 15})
    rows = bootstrap_scores(y_true, y_pred, 2, torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]]))
    assert rows[0]["accuracy"] == 1.0 and rows[1]["accuracy"] == 0.5
    s = summarize_scores(rows)
    assert s["accuracy"] == pytest.approx(0.75) and s["accuracy_std"] == pytest.approx(0.25)
    idx = bootstrap_indices(10, 5, seed=3)
    assert idx.shape == (5, 10) and torch.equal(idx, bootstrap_indices(10, 5, seed=3))


def test_match_class_composition_counts():
    syn = _data(30, 5, 0)
    out_images, out_labels = match_class_composition(syn, torch.tensor([0] * 8 + [1] * 2), 2, seed=1)
    assert out_images.shape[0] == 10 and torch.bincount(out_labels).tolist() == [8, 2]
    _, up = match_class_composition(syn, torch.tensor([0] * 2 + [1] * 9), 2)  # class 1 with replacement
    assert torch.bincount(up).tolist() == [2, 9]
    with pytest.raises(ValueError, match="no image of class 1"):
        match_class_composition(_data(5, 0, 0), torch.tensor([0, 1]), 2)


def test_as_image_set_from_records():
    images, labels = as_image_set(
        [{"image": torch.zeros(1, 4, 4), "label": 1}, {"image": torch.ones(1, 4, 4), "label": 0}]
    )
    assert images.shape == (2, 1, 4, 4) and labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="non-finite"):
        as_image_set((torch.full((1, 1, 2, 2), float("nan")), torch.tensor([0])))


def test_evaluate_tstr_good_and_swapped_synthetic():
    train, val, test = _data(40, 10, 0), _data(10, 5, 1), _data(30, 20, 2)
    good, swapped = _data(60, 60, 3), _data(60, 60, 4, swap=True)
    net = _centroid_fit(_Centroid(), train, None, seed=0, device="cpu")
    assert class_agreement(net, *good) == 1.0 and class_agreement(net, *swapped) == 0.0
    res = evaluate_tstr(
        train, val, test, [good, swapped], network_factory=_Centroid, fit_fn=_centroid_fit, n_bootstrap=20, seed=0
    )
    assert res["trtr"]["accuracy"] == 1.0 and res["trtr"]["accuracy_std"] == 0.0
    # one synthetic set gives a perfect classifier, the swapped one a perfectly wrong one -> mean 0.5, std 0.5
    assert [r["accuracy"] for r in res["tstr_per_set"]] == [1.0, 0.0]
    assert res["tstr"]["accuracy"] == pytest.approx(0.5) and res["tstr"]["accuracy_std"] == pytest.approx(0.5)
    assert res["class_agreement"] == pytest.approx(0.5) and res["class_agreement_real"] == 1.0
    # per conditioning class: every image of the good set agrees, none of the swapped one
    assert res["class_agreement_per_class_per_set"] == [[1.0, 1.0], [0.0, 0.0]]
    assert res["class_agreement_per_class"] == pytest.approx([0.5, 0.5])
    assert res["tstr"]["per_class_recall"] == pytest.approx([0.5, 0.5])
    assert res["n_bootstrap"] == 20 and res["num_test"] == 50 and res["num_classes"] == 2


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_channels = 2
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1).mean(1, keepdim=True) * 4 - 2)


def test_default_fit_fn_trains_with_engine(tmp_path):
    pytest.importorskip("monai_condflow.engines.classifier")
    train, val = _data(32, 32, 0), _data(8, 8, 1)
    net = default_fit_fn(
        _Tiny(), train, val, seed=0, device="cpu", max_epochs=3, lr=0.1, batch_size=16, output_dir=tmp_path
    )
    assert (tmp_path / "model.pt").is_file()  # the best validation epoch, loaded back
    assert class_agreement(net, *val) >= 0.9


def test_default_fit_fn_reads_training_items_through_the_transform_and_validation_without(tmp_path):
    """``transform`` is applied to every training item on every read (each epoch), never to validation items."""
    pytest.importorskip("monai_condflow.engines.classifier")
    train, val = _data(32, 32, 0), _data(8, 8, 1)
    calls = []

    def transform(item):
        calls.append(tuple(item["image"].shape))
        return {"image": item["image"] * 1.0, "label": item["label"]}

    net = default_fit_fn(
        _Tiny(), train, val, seed=0, device="cpu", max_epochs=2, lr=0.1, batch_size=16, transform=transform
    )
    n_train = train[0].shape[0]
    assert len(calls) == 2 * n_train and set(calls) == {tuple(train[0].shape[1:])}
    assert class_agreement(net, *val) >= 0.9
    # the transform's changes are what the network learns from: labels swapped in every training item
    flipped = default_fit_fn(  # no validation: the last epoch's weights, not a selection that could hide it
        _Tiny(), train, None, seed=0, device="cpu", max_epochs=3, lr=0.1, batch_size=16,
        transform=lambda item: {"image": item["image"], "label": 1 - int(item["label"])},
    )  # fmt: skip
    assert class_agreement(flipped, *val) <= 0.1


def test_blurred_keeps_flat_images_and_matches_a_separable_gaussian():
    from monai.networks.layers import gaussian_1d

    from monai_condflow.evaluation.tstr import blurred

    flat = torch.full((2, 1, 9, 9), 0.3)
    # edges replicated: no dark border (zero padding would darken it)
    assert torch.allclose(blurred(flat), flat, atol=1e-5)
    impulse = torch.zeros(1, 1, 11, 11)
    impulse[0, 0, 5, 5] = 1.0
    k = gaussian_1d(torch.tensor(1.0), truncated=4.0)
    expected = torch.zeros(11, 11)
    half = k.numel() // 2
    expected[5 - half : 5 + half + 1, 5 - half : 5 + half + 1] = torch.outer(k, k)
    assert torch.allclose(blurred(impulse, sigma=1.0)[0, 0], expected, atol=1e-6)
    assert blurred(impulse, sigma=1.0, batch_size=1).shape == impulse.shape


def test_evaluate_tstr_reports_sharpness_and_the_blurred_reference():
    from monai_condflow.evaluation.tstr import blurred

    class _SharpIsZero(nn.Module):
        """Class 0 for images with fine detail, class 1 for smooth ones (a classifier that reads blur as a class)."""

        out_channels = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            detail = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1, keepdim=True)
            return torch.cat([detail - 0.15, 0.15 - detail], dim=1)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 12, 12, generator=g)
    labels = torch.zeros(20, dtype=torch.long)
    labels[:2] = 1
    train = (images, labels)
    sharp_syn, blurred_syn = (images.clone(), labels.clone()), (blurred(images, 2.0), labels.clone())
    res = evaluate_tstr(
        train, None, train, [sharp_syn, blurred_syn], network_factory=_Centroid, fit_fn=_centroid_fit,
        n_bootstrap=0, real_classifier=_SharpIsZero(), num_classes=2,
    )  # fmt: skip
    assert res["class_agreement_real"] == pytest.approx(0.9)  # the 18 class-0 images are sharp
    assert res["class_agreement_real_blurred"] == pytest.approx(0.1)  # blurred, every image reads as class 1
    assert res["class_agreement_per_set"] == pytest.approx([0.9, 0.1])
    # the classifier calls every blurred image class 1: all of its class-1 images agree, none of its class-0 ones
    assert res["class_agreement_per_class_per_set"] == [[1.0, 0.0], [0.0, 1.0]]
    assert res["class_agreement_per_class"] == pytest.approx([0.5, 0.5])
    assert res["sharpness_ratio_per_set"][0] == pytest.approx(1.0) and res["sharpness_ratio_per_set"][1] < 0.3
    assert res["blur_sigma"] == 1.0
    # variety, class by class: the copy varies as much as the real set, the blurred copy less
    assert res["variety_ratio_per_set"][0] == pytest.approx(1.0) and res["variety_ratio_per_set"][1] < 0.6
    assert res["variety_ratio"] == pytest.approx(sum(res["variety_ratio_per_set"]) / 2)


def test_evaluate_tstr_reports_the_squeeze_lattice_of_each_set_and_of_the_real_images():
    from monai_condflow.metrics.periodicity import lattice_peak

    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 12, 12, generator=g)
    labels = (torch.arange(20) % 2).long()
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    hatched = images + 0.5 * ((i + j) % 2).float()  # a checkerboard on every image: period 2
    res = evaluate_tstr(
        (images, labels), None, (images, labels), [(images.clone(), labels), (hatched, labels)],
        network_factory=_Centroid, fit_fn=_centroid_fit, n_bootstrap=0, num_classes=2,
    )  # fmt: skip
    assert res["lattice_peak_real"] == lattice_peak(images) < 2
    assert res["lattice_peak_per_set"][0] == res["lattice_peak_real"]
    assert res["lattice_peak_per_set"][1] == lattice_peak(hatched) > 20
    assert res["lattice_peak"] == pytest.approx(sum(res["lattice_peak_per_set"]) / 2)
    # sides the period (4) does not divide: not measured, said as None rather than a wrong figure
    odd = torch.rand(20, 1, 10, 10, generator=g)
    res = evaluate_tstr(
        (odd, labels), None, (odd, labels), [(odd, labels)], network_factory=_Centroid, fit_fn=_centroid_fit,
        n_bootstrap=0, num_classes=2,
    )  # fmt: skip
    assert res["lattice_peak"] is None and res["lattice_peak_per_set"] == [None] and res["lattice_peak_real"] is None


def test_evaluate_tstr_counts_the_classifier_trainings(caplog, monkeypatch):
    """Issue 16: one progress count per trained classifier (the given real classifier is not trained again)."""
    import logging

    monkeypatch.delenv("CONDFLOW_PROGRESS", raising=False)
    train, test = _data(40, 10, 0), _data(30, 20, 2)
    sets = [_data(60, 60, 3), _data(60, 60, 5), _data(60, 60, 6)]
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        evaluate_tstr(train, None, test, sets, network_factory=_Centroid, fit_fn=_centroid_fit, n_bootstrap=0,
                      n_real_models=2)  # fmt: skip
    assert "TRTR / TSTR classifiers: 5/5 trainings (100 %)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        evaluate_tstr(train, None, test, sets, network_factory=_Centroid, fit_fn=_centroid_fit, n_bootstrap=0,
                      progress=False)  # fmt: skip
    assert "classifiers:" not in caplog.text


def test_per_class_agreement_hand_values_and_errors():
    from monai_condflow.evaluation import per_class_agreement

    preds, labels = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0])
    # class 0: images 0 (right) and 4 (called 1); class 1: images 1 (called 0), 2, 3; class 2: no image
    assert per_class_agreement(preds, labels, 3) == pytest.approx([0.5, 2 / 3, None])
    everything_one = per_class_agreement(torch.ones(8, dtype=torch.long), torch.tensor([0] * 6 + [1] * 2), 2)
    assert everything_one == [0.0, 1.0]  # overall 0.25, but the per-class figures say what happened
    with pytest.raises(ValueError, match="4 predictions for 5 labels"):
        per_class_agreement(preds[:4], labels, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        per_class_agreement(preds, torch.tensor([0, 1, 2, 1, 0]), 2)
    with pytest.raises(ValueError, match="whole numbers"):
        per_class_agreement(preds, torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0]), 2)
    assert per_class_agreement(preds, labels.double(), 3) == pytest.approx([0.5, 2 / 3, None])  # float ids are fine


def test_evaluate_tstr_names_the_synthetic_set_with_a_bad_class_id():
    train, test = _data(20, 10, 0), _data(10, 10, 2)
    bad = _data(10, 10, 3)
    bad = (bad[0], bad[1].clone())
    bad[1][0] = 5  # no such class
    with pytest.raises(ValueError, match=r"synthetic set 2 of 2: .*labels must be in \[0, 2\)"):
        evaluate_tstr(train, None, test, [_data(10, 10, 4), bad], network_factory=_Centroid, fit_fn=_centroid_fit,
                      n_bootstrap=0, num_classes=2)  # fmt: skip


class _AlwaysZero(nn.Module):
    """A judge that calls every image class 0."""

    out_channels = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0]).expand(x.shape[0], 2)


def test_every_real_classifier_judges_class_agreement_and_the_spread_is_reported():
    train, test = _data(30, 10, 0), _data(20, 10, 2)
    sets = [_data(30, 10, 3), _data(30, 10, 4)]
    fitted = _centroid_fit(_Centroid(), train, None, seed=0, device="cpu")
    trained = []

    def counting_fit(network, train, val, *, seed, device, **kwargs):
        trained.append(seed)
        return _centroid_fit(network, train, val, seed=seed, device=device)

    res = evaluate_tstr(train, None, test, sets, network_factory=_Centroid, fit_fn=counting_fit, n_bootstrap=0,
                        real_classifier=[fitted, _AlwaysZero()], num_classes=2)  # fmt: skip
    assert trained == [100, 101]  # the two given judges are not trained again: only the TSTR classifiers
    assert res["n_judges"] == 2 and res["trtr"]["n_models"] == 2
    # the centroid judge gets every image right; the other calls the 30 of 40 class-0 images right
    assert res["class_agreement_per_judge"] == pytest.approx([1.0, 0.75])
    assert res["class_agreement_judge_std"] == pytest.approx(0.125)
    assert res["class_agreement"] == pytest.approx(0.875)
    assert res["class_agreement_per_set"] == pytest.approx([0.875, 0.875])
    assert res["class_agreement_per_class"] == pytest.approx([1.0, 0.5])  # class 1: 1.0 by one judge, 0.0 by the other
    assert res["class_agreement_real"] == pytest.approx(0.875)
    # TRTR over both: accuracy 1.0 and 20/30 on the test split
    assert [p["accuracy"] for p in res["trtr_point"]] == pytest.approx([1.0, 2 / 3])
    assert res["trtr"]["accuracy"] == pytest.approx(5 / 6)
    # one judge given, three asked for: two more trained with seeds 1 and 2
    trained.clear()
    res = evaluate_tstr(train, None, test, sets, network_factory=_Centroid, fit_fn=counting_fit, n_bootstrap=0,
                        real_classifier=_AlwaysZero(), n_real_models=3, num_classes=2)  # fmt: skip
    assert trained == [1, 2, 100, 101] and res["n_judges"] == 3
    assert res["class_agreement_per_judge"] == pytest.approx([0.75, 1.0, 1.0])
