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
"""Tests of the semi-supervised label propagation (vectorised similarities vs brute force, the alternating loop)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_condflow.engines import (
    LabelPropagation,
    class_centroids,
    class_quotas,
    median_bandwidth,
    propagate_labels,
    run_semisupervised,
    similarity,
)
from monai_condflow.engines.label_propagation import RoundLRScheduler


def clusters(n_per_class: int, dim: int = 32, seed: int = 0, spread: float = 0.05):
    """Two clusters with different coordinate *distributions* (so both similarity kinds separate them)."""
    rng = np.random.default_rng(seed)
    centre0 = np.linspace(-1.0, 1.0, dim)
    centre1 = rng.permutation(np.linspace(-0.2, 0.2, dim)) + 0.3
    z = np.concatenate(
        [
            centre0 + spread * rng.standard_normal((n_per_class, dim)),
            centre1 + spread * rng.standard_normal((n_per_class, dim)),
        ]
    )
    labels = np.repeat([0, 1], n_per_class)
    order = rng.permutation(len(labels))
    return torch.tensor(z[order], dtype=torch.float32), torch.tensor(labels[order])


def test_class_centroids():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(class_centroids(z, [0, 0, 1], 2), torch.tensor([[1.0, 0.0], [1.0, 3.0]]))
    with pytest.raises(ValueError, match="class"):
        class_centroids(z, [0, 0, 0], 2)
    with pytest.raises(ValueError, match="labels"):
        class_centroids(z, [0, 1], 2)


@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_gaussian_similarity_matches_brute_force(bandwidth):
    z, labels = clusters(20, dim=8, spread=0.3)
    c = class_centroids(z, labels, 2)
    fast = similarity(z, c, kind="gaussian", bandwidth=bandwidth).double().numpy()
    zn, cn = z.double().numpy(), c.double().numpy()
    d = np.array([[np.sqrt(np.sum((zi - cj) ** 2)) for cj in cn] for zi in zn])
    h = np.median(d) if bandwidth is None else bandwidth
    np.testing.assert_allclose(fast, np.exp(-(d**2) / (2 * h * h)), rtol=1e-5, atol=1e-6)


def test_wasserstein_similarity_matches_scipy():
    z, labels = clusters(20, dim=32, spread=0.3)
    c = class_centroids(z, labels, 2)
    fast = similarity(z.double(), c.double(), kind="wasserstein", eps=1e-6).numpy()
    brute = np.array(
        [[1.0 / (1e-6 + wasserstein_distance(zi, cj)) for cj in c.double().numpy()] for zi in z.double().numpy()]
    )
    np.testing.assert_allclose(fast, brute, rtol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "wasserstein"])
def test_propagation_recovers_cluster_labels(kind):
    z, labels = clusters(200, spread=0.1)
    lp = LabelPropagation(num_classes=2, kind=kind).fit(z[:10], labels[:10])
    predicted, confidence = lp.predict(z[10:])
    assert (predicted == labels[10:]).float().mean() == 1.0
    assert bool(((confidence >= 0.5 - 1e-6) & (confidence <= 1.0 + 1e-6)).all())
    again, _ = propagate_labels(z[10:], lp.centroids, kind=kind)
    assert torch.equal(again, predicted)


def test_propagation_errors():
    with pytest.raises(ValueError, match="kind"):
        similarity(torch.zeros(2, 3), torch.zeros(2, 3), kind="cosine")
    with pytest.raises(ValueError, match="dimension"):
        similarity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        similarity(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="fit"):
        LabelPropagation(2).predict(torch.zeros(2, 3))


class TinyClassifier(torch.nn.Module):
    """A stand-in for PEPXNet: linear embedding of a flattened 8x8 image, linear head."""

    out_channels = 2

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(64, 8))
        self.head = torch.nn.Linear(8, 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.g(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g(x))


def square_records(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        label = i % 2
        image = torch.rand(1, 8, 8, generator=g) * 0.5
        if label:
            image[:, 2:6, 2:6] += 0.5
        records.append({"image": image, "label": label})
    return records


def _run(tmp_path=None, **kwargs):
    torch.manual_seed(0)
    labelled = square_records(8, seed=1)
    unlabelled = square_records(64, seed=2)
    true = [r["label"] for r in unlabelled]
    hidden = [{"image": r["image"]} for r in unlabelled]  # no labels in the unlabelled set
    options = {"initial_epochs": 10, "epochs_per_round": 1, "batch_size": 16, "lr": 1e-2, "iteration_log": False}
    options.update(kwargs)
    return run_semisupervised(
        options.pop("network", TinyClassifier()),
        labelled,
        hidden,
        device="cpu",
        num_classes=2,
        true_labels=true,
        output_dir=tmp_path,
        **options,
    ), true


def test_semisupervised_loop_recovers_labels_and_logs(tmp_path):
    result, true = _run(tmp_path, max_rounds=2, tol=0.0)
    rounds = result["rounds"]
    assert len(rounds) == 3 and result["num_rounds"] == 3 and not result["converged"]  # tol=0: never converges
    assert rounds[0]["fraction_changed"] is None
    assert all(0.0 <= r["fraction_changed"] <= 1.0 for r in rounds[1:])
    assert rounds[-1]["presumptive_accuracy"] >= 0.9
    assert (
        float((result["presumptive_labels"] == torch.tensor(true)).float().mean()) == rounds[-1]["presumptive_accuracy"]
    )
    assert sum(rounds[-1]["class_balance"]) == pytest.approx(1.0)
    assert result["presumptive_labels"].shape == (64,) and result["centroids"].shape == (2, 8)
    acc = EventAccumulator(str(tmp_path / "label_propagation"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"fraction_changed", "presumptive_accuracy", "class_balance/0", "class_balance/1", "mean_confidence"} <= tags
    assert [e.step for e in acc.Scalars("presumptive_accuracy")] == [0, 1, 2]
    last = Path(result["last_checkpoint"])  # the last round's training state, under the bundle's name
    assert last.parent == tmp_path / "round_2" and last.name.startswith("state_checkpoint_epoch=")
    assert [p.name for p in last.parent.glob("state_*.pt")] == [last.name]


def test_semisupervised_stops_on_tol_and_max_rounds():
    result, _ = _run(max_rounds=3, tol=1.0, kind="wasserstein")  # any change below 100 % counts as converged
    assert result["converged"] and result["num_rounds"] == 2
    result, _ = _run(max_rounds=0, tol=0.5, network=TinyClassifier)  # a factory; only the initial round
    assert result["num_rounds"] == 1 and not result["converged"]
    with pytest.raises(ValueError, match="tol"):
        _run(tol=1.5)


def test_class_quotas_sum_and_largest_remainders():
    assert class_quotas([0.86, 0.14], 10).tolist() == [9, 1]  # 8.6 / 1.4: the larger remainder gets the spare one
    assert class_quotas([1, 1, 1], 10).tolist() == [4, 3, 3]  # ties go to the first class
    assert class_quotas([2, 0], 5).tolist() == [5, 0]
    for bad in ([0, 0], [-1, 2], [float("nan"), 1]):
        with pytest.raises(ValueError, match="class_prior"):
            class_quotas(bad, 4)


def test_capacitated_greedy_matches_the_prior_and_takes_the_most_confident_first():
    # 1-D embeddings and centroids at -1 / +1: nearest centroid gives half to each class
    z = torch.tensor([[-2.0], [-1.0], [-0.5], [-0.1], [0.1], [0.5], [1.0], [3.0]])
    centroids = torch.tensor([[-1.0], [1.0]])
    plain, _ = propagate_labels(z, centroids, bandwidth=1.0)
    assert plain.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    labels, confidence = propagate_labels(z, centroids, bandwidth=1.0, class_prior=[3, 1])
    # class 1 takes only its quota of 2: the two embeddings with the largest class-1 share (z = 1.0 and 3.0)
    assert labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    share = torch.softmax(-((z - centroids.T) ** 2) / 2.0, dim=1)
    assert torch.allclose(confidence, share.gather(1, labels[:, None]).squeeze(1).float())


def test_capacitated_greedy_against_brute_force_optimum_on_two_classes():
    # with two classes the greedy order by share is the best split with those class sizes: compare with brute force
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 4, generator=g)
    centroids = torch.randn(2, 4, generator=g)
    labels, _ = propagate_labels(z, centroids, class_prior=[5, 4])
    share = torch.softmax(-(torch.cdist(z, centroids) ** 2) / (2 * median_bandwidth(torch.cdist(z, centroids)) ** 2), 1)
    gain = share[:, 1] - share[:, 0]  # objective of a split: sum(share0) + sum of gain over the class-1 set
    best = max(itertools.combinations(range(9), 4), key=lambda idx: float(gain[list(idx)].sum()))
    assert sorted(torch.nonzero(labels == 1).flatten().tolist()) == sorted(best)


def test_far_away_embeddings_keep_a_defined_share():
    # every Gaussian similarity underflows to 0 here; the share is still the nearer centroid's
    labels, confidence = propagate_labels(
        torch.tensor([[1000.0], [-1000.0]]), torch.tensor([[-1.0], [1.0]]), bandwidth=1.0
    )
    assert labels.tolist() == [1, 0] and torch.allclose(confidence, torch.ones(2))


def test_label_propagation_labelled_prior_and_bad_priors():
    z_l = torch.tensor([[-1.0], [-1.1], [-0.9], [1.0]])
    y_l = torch.tensor([0, 0, 0, 1])
    z_u = torch.tensor([[-0.2], [0.1], [0.2], [0.9]])
    lp = LabelPropagation(2, bandwidth=1.0, class_prior="labelled").fit(z_l, y_l)
    assert torch.allclose(lp.prior, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert lp.predict(z_u)[0].tolist() == [0, 0, 0, 1]
    assert LabelPropagation(2, bandwidth=1.0).fit(z_l, y_l).predict(z_u)[0].tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="class_prior"):
        LabelPropagation(2, class_prior="uniform")
    with pytest.raises(ValueError, match="3 entries"):
        LabelPropagation(2, class_prior=[1, 1, 1])


def test_min_steps_raises_round_zero_epochs_and_augmentation_sees_only_training_items():
    """Round 0 on 8 labels at batch 16 is one step per epoch: ``min_steps=12`` over 2 epochs makes each epoch go over
    the labelled set 12 times (6 steps). The training transform is applied to training items only; the embeddings
    that make the centroids see clean images."""
    seen: list[float] = []

    def mark(item):
        seen.append(1.0)
        return {**item, "image": item["image"] + 0.0}

    result, _ = _run(max_rounds=1, tol=0.0, initial_epochs=2, min_steps=12, train_transform=mark)
    rounds = result["rounds"]
    assert rounds[0]["train"]["epochs"] == 2
    assert rounds[1]["train"]["epochs"] == 1  # retrain rounds keep epochs_per_round
    # 8 labelled items x 12 repeats x 2 epochs in round 0, (8 + 64) items x 1 epoch in round 1; embeddings add none
    assert len(seen) == 8 * 12 * 2 + 72
    result, _ = _run(max_rounds=0, initial_epochs=2, min_steps=0)
    assert result["rounds"][0]["train"]["epochs"] == 2
    with pytest.raises(ValueError, match="min_steps"):
        _run(min_steps=-1)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_round_scheduler_exponential_uses_lr_decay_in_round_zero_and_restarts_each_round():
    opt = _optimizer()
    sched = RoundLRScheduler(opt, "exponential", gamma=0.5, presumptive_gamma=0.9)
    sched.start_round(0, epochs=3, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])  # once per epoch of two steps, by the config's lr_decay
    opt.state[opt.param_groups[0]["params"][0]] = {"step": torch.tensor(3.0)}
    sched.start_round(1, epochs=1, steps_per_epoch=1)
    assert sched.get_last_lr()[0] == pytest.approx(0.1) and not opt.state  # a fresh start: lr and moments
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.09)  # presumptive rounds decay by presumptive_gamma


def test_round_scheduler_onecycle_matches_torch_and_resumes_mid_round():
    reference_opt = _optimizer()
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=0.1, total_steps=8, pct_start=0.15)
    expected = []
    for _ in range(7):
        reference.step()
        expected.append(reference_opt.param_groups[0]["lr"])
    opt = _optimizer()
    sched = RoundLRScheduler(opt, "onecycle")
    sched.start_round(0, epochs=2, steps_per_epoch=4)
    got = []
    for _ in range(3):
        sched.step()
        got.append(sched.get_last_lr()[0])
    state, opt_state = sched.state_dict(), opt.state_dict()
    resumed_opt = _optimizer()
    resumed_opt.load_state_dict(opt_state)
    resumed = RoundLRScheduler(resumed_opt, "onecycle")
    resumed.load_state_dict(state)
    for _ in range(5):  # the last call is past OneCycleLR's total and leaves the lr where it is
        resumed.step()
        got.append(resumed.get_last_lr()[0])
    assert got[:7] == pytest.approx(expected) and got[7] == pytest.approx(expected[-1])
    with pytest.raises(ValueError, match="schedule"):
        RoundLRScheduler(opt, "cosine")
    with pytest.raises(ValueError, match="gamma"):
        RoundLRScheduler(opt, gamma=1.5)
