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
"""Tests for the augmentation study: a prior-sensitive stand-in classifier whose minority recall rises with balance."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_condflow.evaluation.augmentation import augmentation_study, plot_augmentation


class _Prior(nn.Module):
    """Predicts the majority class of its training set, unless the set is balanced: then the true brightness class."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = 2
        self.register_buffer("balanced", torch.tensor(0.0))
        self.register_buffer("majority", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.flatten(1).mean(1) > 0.5).long()
        pred = bright if self.balanced > 0 else torch.full_like(bright, int(self.majority))
        return nn.functional.one_hot(pred, 2).float()


def _fit(network, train, val, *, seed, device, **kwargs):
    counts = torch.bincount(train[1], minlength=2)
    network.majority.fill_(int(counts.argmax()))
    network.balanced.fill_(float(counts.min() >= counts.max()))
    return network


def _data(n0, n1):
    labels = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
    return (0.2 + 0.6 * labels.float()).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone(), labels


def test_minority_recall_rises_to_balance(tmp_path):
    train, test = _data(30, 10), _data(10, 10)
    pool = _data(0, 25)
    res = augmentation_study(train, None, test, pool, network_factory=_Prior, fit_fn=_fit, n_bootstrap=0)
    assert res["minority_class"] == 1 and res["gap"] == 20
    rows = res["rows"]
    assert [r["n_added"] for r in rows] == [0, 5, 10, 20]
    assert [r["minority_recall"] for r in rows] == [0.0, 0.0, 0.0, 1.0]
    assert rows[0]["recall"] == 0.5 and rows[-1]["accuracy"] == 1.0
    assert plot_augmentation(res, tmp_path / "aug.png").is_file()
    with pytest.raises(ValueError, match="25 images of class 1, 40 are needed"):
        augmentation_study(train, None, test, pool, network_factory=_Prior, fit_fn=_fit, fractions=(2.0,))


def test_augmentation_study_reports_progress_and_writes_a_pdf_beside_the_plot(tmp_path, caplog, monkeypatch):
    """Issue 16: one progress count per fraction; the plot has error bars' data and a vector copy."""
    import logging

    monkeypatch.delenv("CONDFLOW_PROGRESS", raising=False)
    train, test, pool = _data(30, 10), _data(10, 10), _data(0, 25)
    with caplog.at_level(logging.INFO, logger="monai_condflow.progress"):
        res = augmentation_study(train, None, test, pool, network_factory=_Prior, fit_fn=_fit, n_bootstrap=3)
    assert "augmentation study: 4/4 trainings (100 %)" in caplog.text
    png = plot_augmentation(res, tmp_path / "aug.png")
    assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_the_real_classifier_is_the_zero_fraction_model_and_is_not_trained_again():
    """The evaluation passes its TRTR classifier: the f = 0 row is scored with it and ``fit_fn`` runs only for the
    fractions that add images; every row equals the study that trains all fractions itself."""
    train, test, pool = _data(30, 10), _data(10, 10), _data(0, 25)
    fitted = []

    def counting_fit(network, data, val, **kwargs):
        fitted.append(int(data[1].numel()))
        return _fit(network, data, val, **kwargs)

    own = augmentation_study(train, None, test, pool, network_factory=_Prior, fit_fn=counting_fit, n_bootstrap=5)
    assert fitted == [40, 45, 50, 60]
    fitted.clear()
    reference = counting_fit(_Prior(), train, None, seed=0, device="cpu")
    fitted.clear()
    reused = augmentation_study(
        train, None, test, pool, network_factory=_Prior, fit_fn=counting_fit, n_bootstrap=5, real_classifier=reference
    )
    assert fitted == [45, 50, 60]  # no second training on the real set alone
    assert reused["rows"] == own["rows"]


def test_the_real_pepx_classifier_equals_the_zero_fraction_retraining():
    """With the project's own classifier and fit function, the TRTR classifier trained by ``train_real_classifier``
    is the same model (same test predictions) as the study's own f = 0 training, so reusing it changes no figure."""
    from monai_condflow.evaluation.tstr import train_real_classifier
    from monai_condflow.networks.nets import PEPXNet

    def factory():
        return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)

    g = torch.Generator().manual_seed(3)
    images = torch.rand(24, 1, 32, 32, generator=g)
    labels = (torch.arange(24) % 3 == 0).long()
    images[labels == 1] += 0.3
    kwargs = {"max_epochs": 2, "batch_size": 8}
    real = train_real_classifier((images, labels), None, network_factory=factory, train_kwargs=kwargs, seed=5)
    pool = (images[labels == 1][:4].clone(), torch.ones(4, dtype=torch.long))

    def study(**extra):
        return augmentation_study(
            (images, labels), None, (images, labels), pool, network_factory=factory, fractions=(0.0,),
            train_kwargs=kwargs, n_bootstrap=0, seed=5, **extra,
        )  # fmt: skip

    res = study()
    torch.manual_seed(5)
    again = study(real_classifier=real)
    assert res["rows"] == again["rows"]
