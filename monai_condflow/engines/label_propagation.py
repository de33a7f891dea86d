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
"""The paper's semi-supervised step: centroid label propagation in the classifier's embedding space.

With few labelled samples ``(X_l, Y_l)`` and many unlabelled ``X_u``:

1. train the classifier on ``X_l``;
2. embed everything, compute one centroid ``c_k`` per class from the labelled embeddings and a similarity between
   every unlabelled embedding and every centroid: a Gaussian kernel ``exp(-||z - c_k||^2 / (2 h^2))`` or the inverse
   of a 1-D Wasserstein distance ``1 / (eps + W1(z, c_k))``;
3. greedy propagation: each unlabelled sample takes the label of its most similar centroid (presumptive labels);
   with a class prior (by default the labelled class ratio) the greedy assignment is capacitated: (sample, class)
   pairs are taken in order of decreasing similarity share, and a class stops taking samples once it holds its
   quota of the unlabelled set, so a weak early classifier cannot hand the minority class half of the data;
4. retrain the classifier on labelled + presumptive labels;
5. repeat 2-4 until fewer than ``tol`` of the presumptive labels change, or ``max_rounds`` retrains.

The similarity computations are vectorised (``torch.cdist``), so 100,000 embeddings of dimension 32 propagate in well
under a second on a CPU (see ``benchmarks/bench_label_propagation.py``).

Wasserstein similarity: the embedding ``z`` (``D`` coordinates) and a centroid ``c`` are each read as an empirical
1-D distribution of ``D`` equally weighted values, as ``scipy.stats.wasserstein_distance(z, c)`` does. For two
samples of equal size the optimal transport matches sorted values, so ``W1 = mean_i |sort(z)_i - sort(c)_i|``, which
is an L1 ``cdist`` between the row-sorted matrices divided by ``D``. This distance ignores *which* coordinate holds
which value (it is invariant to permuting the coordinates), so it separates classes only where their embeddings'
value distributions differ; the Gaussian kernel (the default) compares the vectors themselves.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset as MonaiDataset
from monai.utils import optional_import
from torch.utils.data import ConcatDataset, Dataset

from monai_condflow.engines.classifier import (
    compute_embeddings,
    lr_decay_for_label_fraction,
    train_classifier,
)
from monai_condflow.handlers.checkpoint import load_module_weights
from monai_condflow.handlers.tensorboard_stats import ITERATION_OFFSET
from monai_condflow.utils.distributed import (
    barrier,
    broadcast_tensor,
    create_loader,
    get_rank,
    is_distributed,
    refresh_sampler,
    unwrap_model,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
else:
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")
EventFileLoader, _ = optional_import("tensorboard.backend.event_processing.event_file_loader", name="EventFileLoader")

__all__ = [
    "SIMILARITY_KINDS",
    "class_centroids",
    "pairwise_distance",
    "median_bandwidth",
    "similarity",
    "propagate_labels",
    "class_quotas",
    "LabelPropagation",
    "RoundLRScheduler",
    "SemiSupervisedWorkflow",
    "run_semisupervised",
]

logger = logging.getLogger(__name__)

SIMILARITY_KINDS = ("gaussian", "wasserstein")
PRESUMPTIVE_LR_DECAY = 0.99
"""Per-epoch lr decay during presumptive-label epochs (paper appendix)."""


def _as_float_matrix(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or Inf values.")
    return t


def class_centroids(z: Any, labels: Any, num_classes: int) -> torch.Tensor:
    """Mean embedding of every class.

    Args:
        z: embeddings ``[N, D]``.
        labels: class ids ``[N]`` in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        Centroids ``[C, D]`` (same dtype / device as ``z``).

    Raises:
        ValueError: on shape mismatches, out-of-range labels or a class with no sample (its centroid is undefined).
    """
    z_t = _as_float_matrix(z, "z")
    y = torch.as_tensor(labels, device=z_t.device).reshape(-1).long()
    if y.numel() != z_t.shape[0]:
        raise ValueError(f"z has {z_t.shape[0]} rows but labels has {y.numel()} entries.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(y.min())}, max {int(y.max())}.")
    counts = torch.bincount(y, minlength=num_classes)
    missing = [k for k in range(num_classes) if int(counts[k]) == 0]
    if missing:
        raise ValueError(f"no labelled sample for class(es) {missing}; each class needs one for its centroid.")
    sums = torch.zeros(num_classes, z_t.shape[1], dtype=z_t.dtype, device=z_t.device).index_add_(0, y, z_t)
    return sums / counts.to(z_t.dtype).unsqueeze(1)


def pairwise_distance(z: Any, centroids: Any, kind: str = "gaussian") -> torch.Tensor:
    """Distances ``[N, C]`` between embeddings and centroids.

    Args:
        z: embeddings ``[N, D]``.
        centroids: ``[C, D]``.
        kind: ``"gaussian"`` -> Euclidean distance; ``"wasserstein"`` -> 1-D Wasserstein-1 distance between the
            empirical distributions of the ``D`` coordinates (equal sample sizes, sort-based closed form).

    Returns:
        ``[N, C]`` non-negative distances.
    """
    z_t = _as_float_matrix(z, "z")
    c_t = _as_float_matrix(centroids, "centroids").to(device=z_t.device, dtype=z_t.dtype)
    if z_t.shape[1] != c_t.shape[1]:
        raise ValueError(f"z has dimension {z_t.shape[1]} but centroids have {c_t.shape[1]}.")
    if kind == "gaussian":
        return torch.cdist(z_t, c_t, p=2.0)
    if kind == "wasserstein":
        z_sorted = torch.sort(z_t, dim=1).values
        c_sorted = torch.sort(c_t, dim=1).values
        return torch.cdist(z_sorted, c_sorted, p=1.0) / z_t.shape[1]
    raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")


def median_bandwidth(distances: torch.Tensor) -> float:
    """Median heuristic for the Gaussian bandwidth: the median of all distances (1.0 if that is 0).

    For an even count the median is the mean of the two middle values (``numpy.median`` semantics).

    Args:
        distances: ``[N, C]`` distances.
    """
    flat = distances.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 1.0
    if n % 2:
        h = float(torch.kthvalue(flat, (n + 1) // 2).values)
    else:
        h = 0.5 * (float(torch.kthvalue(flat, n // 2).values) + float(torch.kthvalue(flat, n // 2 + 1).values))
    return h if h > 0 else 1.0


def _log_similarity(distances: torch.Tensor, kind: str, bandwidth: float | None, eps: float) -> torch.Tensor:
    """Log of :func:`similarity` from the ``[N, C]`` distances (validated; no underflow far from the centroids)."""
    if kind == "gaussian":
        h = median_bandwidth(distances) if bandwidth is None else float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth!r}.")
        return -(distances**2) / (2.0 * h * h)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}.")
    return -torch.log(eps + distances)


def similarity(
    z: Any,
    centroids: Any,
    kind: str = "gaussian",
    bandwidth: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Similarity ``[N, C]`` of every embedding to every centroid.

    Args:
        z: embeddings ``[N, D]``.
        centroids: ``[C, D]``.
        kind: ``"gaussian"``: ``exp(-d^2 / (2 h^2))`` with Euclidean ``d``; ``"wasserstein"``: ``1 / (eps + W1)``.
        bandwidth: Gaussian bandwidth ``h``; ``None`` uses the median of the ``N x C`` distances.
        eps: guard of the Wasserstein inverse.

    Returns:
        ``[N, C]`` similarities (higher = closer).

    Raises:
        ValueError: on an unknown ``kind`` or a non-positive ``bandwidth`` / ``eps``.
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")
    distances = pairwise_distance(z, centroids, kind)
    return torch.exp(_log_similarity(distances, kind, bandwidth, eps))


def class_quotas(prior: Any, n: int) -> torch.Tensor:
    """Integer class sizes ``[C]`` summing to ``n`` in the proportions ``prior`` (largest remainders).

    Raises:
        ValueError: for a prior with a negative or non-finite entry, or one that sums to zero.
    """
    p = torch.as_tensor(np.asarray(prior, dtype=np.float64)).reshape(-1)
    if p.numel() == 0 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError(f"class_prior must be non-negative finite class weights with a positive sum, got {prior!r}.")
    exact = p / p.sum() * n
    quotas = exact.floor().long()
    short = n - int(quotas.sum())
    if short:
        order = torch.argsort(exact - quotas.double(), descending=True, stable=True)
        quotas[order[:short]] += 1
    return quotas


def propagate_labels(
    z_unlabelled: Any,
    centroids: Any,
    kind: str = "gaussian",
    bandwidth: float | None = None,
    eps: float = 1e-6,
    class_prior: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy propagation: each embedding takes the label of its most similar centroid.

    Args:
        z_unlabelled: embeddings ``[N, D]``.
        centroids: ``[C, D]``.
        kind: see :func:`similarity`.
        bandwidth: see :func:`similarity`.
        eps: see :func:`similarity`.
        class_prior: ``None``: plain nearest centroid (the paper). Class weights ``[C]``: capacitated greedy
            assignment; class ``k`` takes at most its quota (:func:`class_quotas`) of the ``N`` embeddings, and the
            (embedding, class) pairs are taken in order of decreasing similarity share.

    Returns:
        ``(labels, confidence)``: ``int64`` ``[N]`` presumptive labels and ``[N]`` confidences, the chosen
        centroid's share of the summed similarities (in ``[1/C, 1]`` without a prior; computed in log space, so
        it stays defined where every similarity underflows).

    Raises:
        ValueError: for an unknown ``kind``, a bad ``bandwidth`` / ``eps``, or a prior that does not match ``C``.
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")
    # shares from log-similarities: far from every centroid (all similarities ~0) they are still well defined
    log_sim = _log_similarity(pairwise_distance(z_unlabelled, centroids, kind), kind, bandwidth, eps)
    n, num_classes = log_sim.shape
    share = torch.softmax(log_sim, dim=1)
    if class_prior is None:
        confidence, labels = share.max(dim=1)
        return labels, confidence
    quotas = class_quotas(class_prior, n)
    if quotas.numel() != num_classes:
        raise ValueError(f"class_prior has {quotas.numel()} entries for {num_classes} centroids.")
    order = torch.argsort(share.reshape(-1), descending=True, stable=True).tolist()
    labels_np = np.full(n, -1, dtype=np.int64)
    left = quotas.tolist()
    remaining = n
    for flat in order:
        i, k = divmod(flat, num_classes)
        if labels_np[i] < 0 and left[k] > 0:
            labels_np[i] = k
            left[k] -= 1
            remaining -= 1
            if remaining == 0:
                break
    labels = torch.from_numpy(labels_np)
    return labels, share.gather(1, labels[:, None]).squeeze(1)


class LabelPropagation:
    """Centroid label propagation (fit on labelled embeddings, predict presumptive labels).

    Args:
        num_classes: number of classes ``C``.
        kind: ``"gaussian"`` or ``"wasserstein"`` (see :func:`similarity`).
        bandwidth: Gaussian bandwidth; ``None`` = median distance of the embeddings being labelled.
        eps: Wasserstein inverse guard.
        class_prior: ``None`` (nearest centroid), ``"labelled"`` (the class ratio of the labelled embeddings given to
            :meth:`fit`) or class weights ``[C]``; see :func:`propagate_labels`.

    Example::

        lp = LabelPropagation(num_classes=2).fit(z_labelled, y_labelled)
        labels, confidence = lp.predict(z_unlabelled)
    """

    def __init__(
        self,
        num_classes: int,
        kind: str = "gaussian",
        bandwidth: float | None = None,
        eps: float = 1e-6,
        class_prior: Any = None,
    ):
        if kind not in SIMILARITY_KINDS:
            raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        self.num_classes = num_classes
        self.kind = kind
        self.bandwidth = bandwidth
        self.eps = eps
        if isinstance(class_prior, str) and class_prior != "labelled":
            raise ValueError(f"class_prior must be None, 'labelled' or class weights, got {class_prior!r}.")
        self.class_prior = class_prior
        self.centroids: torch.Tensor | None = None
        # the weights propagate_labels gets: fixed here, or the labelled ratio from fit
        self.prior: torch.Tensor | None = None
        if class_prior is not None and not isinstance(class_prior, str):
            self.prior = torch.as_tensor(np.asarray(class_prior, dtype=np.float64)).reshape(-1)
            class_quotas(self.prior, 1)  # validates the weights
            if self.prior.numel() != num_classes:
                raise ValueError(f"class_prior has {self.prior.numel()} entries for num_classes={num_classes}.")

    def fit(self, z: Any, labels: Any) -> LabelPropagation:
        """Compute the class centroids (and the labelled class ratio) from embeddings ``z [N, D]``, labels ``[N]``."""
        self.centroids = class_centroids(z, labels, self.num_classes)
        if self.class_prior == "labelled":
            y = torch.as_tensor(labels).reshape(-1).long().cpu()
            self.prior = torch.bincount(y, minlength=self.num_classes).double() / y.numel()
        return self

    def predict(self, z: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Presumptive labels and confidences of ``z [N, D]`` (see :func:`propagate_labels`)."""
        if self.centroids is None:
            raise RuntimeError("LabelPropagation.predict called before fit.")
        return propagate_labels(
            z, self.centroids, kind=self.kind, bandwidth=self.bandwidth, eps=self.eps, class_prior=self.prior
        )


class _LabelledView(Dataset):
    """A dataset whose items get ``label_key`` replaced by a given label (presumptive labels)."""

    def __init__(self, base: Dataset, labels: Sequence[int], label_key: str = "label") -> None:
        if len(base) != len(labels):  # type: ignore[arg-type]
            raise ValueError(f"{len(base)} items but {len(labels)} labels.")  # type: ignore[arg-type]
        self.base = base
        self.labels = [int(v) for v in labels]
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        item = self.base[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"items must be dicts, got {type(item).__name__} at index {index}.")
        item = dict(item)
        item[self.label_key] = self.labels[index]
        return item


class _Augmented(Dataset):
    """``dataset`` with a (random) ``transform`` applied to every item it returns."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.dataset[index])


def _as_dataset(data: Dataset | Sequence, transform: Callable | None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    return MonaiDataset(data=list(data), transform=transform)


def _dataset_label_list(dataset: Dataset, label_key: str) -> list[int]:
    records = getattr(dataset, "data", None)
    if (
        isinstance(records, Sequence)
        and len(records) == len(dataset)
        and all(  # type: ignore[arg-type]
            isinstance(r, Mapping) and label_key in r for r in records
        )
    ):
        return [int(r[label_key]) for r in records]
    return [int(dataset[i][label_key]) for i in range(len(dataset))]  # type: ignore[arg-type]


def _propagate_round(
    propagation: LabelPropagation,
    z_labelled: torch.Tensor,
    labels_labelled: torch.Tensor,
    z_unlabelled: torch.Tensor,
    previous: torch.Tensor | None,
    true_labels: torch.Tensor | None,
    round_index: int,
    num_classes: int,
) -> dict[str, Any]:
    """Fit the centroids on the labelled embeddings, label the unlabelled ones and summarise the round.

    Args:
        propagation: the propagation rule (refitted here).
        z_labelled: labelled embeddings ``[N_l, D]``.
        labels_labelled: their labels ``[N_l]``.
        z_unlabelled: unlabelled embeddings ``[N_u, D]``.
        previous: the presumptive labels of the previous round ``[N_u]`` (``None`` in round 0).
        true_labels: true labels of the unlabelled data ``[N_u]`` to log the presumptive accuracy, or ``None``.
        round_index: the round.
        num_classes: number of classes ``C``.

    Returns:
        ``round``, ``fraction_changed`` (``None`` in round 0), ``class_balance`` (``C`` fractions),
        ``mean_confidence``, ``presumptive_accuracy`` (with ``true_labels``), and the tensors ``labels`` and
        ``confidence`` ``[N_u]``.
    """
    propagation.fit(z_labelled, labels_labelled)
    labels, confidence = propagation.predict(z_unlabelled)
    n = max(1, labels.numel())
    stats: dict[str, Any] = {
        "round": round_index,
        "fraction_changed": None if previous is None else float((labels != previous).float().mean()),
        "class_balance": (torch.bincount(labels, minlength=num_classes).double() / n).tolist(),
        "mean_confidence": float(confidence.mean()),
    }
    if true_labels is not None:
        stats["presumptive_accuracy"] = float((labels == true_labels).float().mean())
    logger.info(
        "label propagation round %d: changed %s, class balance %s, mean confidence %.4f%s",
        round_index,
        "-" if stats["fraction_changed"] is None else f"{stats['fraction_changed']:.4f}",
        [round(b, 4) for b in stats["class_balance"]],
        stats["mean_confidence"],
        "" if true_labels is None else f", presumptive accuracy {stats['presumptive_accuracy']:.4f}",
    )
    stats["labels"], stats["confidence"] = labels, confidence
    return stats


def _log_round(writer: Any, stats: Mapping[str, Any], after: int = -1) -> None:
    """Write a round's summary (see :func:`_propagate_round`) as TensorBoard scalars at step ``round``, unless that
    step is not after ``after`` (the last round already in the folder)."""
    if writer is None or stats["round"] <= after:
        return
    step = stats["round"]
    if stats["fraction_changed"] is not None:
        writer.add_scalar("fraction_changed", stats["fraction_changed"], step)
    for k, b in enumerate(stats["class_balance"]):
        writer.add_scalar(f"class_balance/{k}", b, step)
    writer.add_scalar("mean_confidence", stats["mean_confidence"], step)
    if "presumptive_accuracy" in stats:
        writer.add_scalar("presumptive_accuracy", stats["presumptive_accuracy"], step)
    writer.flush()


def _last_logged_round(log_dir: str | os.PathLike) -> int:
    """The last round whose summary (``mean_confidence``, written every round) is in ``log_dir``'s event files, -1
    for none: a resumed run does not write it again."""
    last = -1
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == "mean_confidence" for v in event.summary.value):
                last = max(last, int(event.step))
    return last


def _min_steps_repeats(min_steps: int, batch_size: int, epochs: int, n_labelled: int) -> int:
    """How many times round 0's epoch goes over the labelled set so that it trains at least ``min_steps`` steps."""
    return max(1, -(-min_steps * batch_size // max(1, epochs * n_labelled)))


def _check_round_options(max_rounds: int, tol: float, min_steps: int, network: Any) -> None:
    """Validate the options shared by :func:`run_semisupervised` and :class:`SemiSupervisedWorkflow`."""
    if type(network).__module__.startswith("opacus"):
        raise ValueError(
            "label propagation got an Opacus-wrapped (DP-SGD) network: it computes presumptive labels "
            "outside the DP mechanism, so train_semisupervised.json cannot be combined with train_classifier_dp.json."
            " Train the DP classifier on the labelled images only."
        )
    if not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds must be a non-negative integer, got {max_rounds!r}.")
    if not 0 <= tol <= 1:
        raise ValueError(f"tol must be in [0, 1], got {tol!r}.")
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be a non-negative integer, got {min_steps!r}.")


def run_semisupervised(
    network: torch.nn.Module | Callable[[], torch.nn.Module],
    labelled: Dataset | Sequence[Mapping],
    unlabelled: Dataset | Sequence[Mapping],
    *,
    device: str | torch.device,
    num_classes: int,
    initial_epochs: int = 10,
    epochs_per_round: int = 2,
    batch_size: int = 64,
    kind: str = "gaussian",
    bandwidth: float | None = None,
    max_rounds: int = 5,
    tol: float = 0.01,
    true_labels: Any = None,
    val_data: Dataset | Sequence[Mapping] | None = None,
    transform: Callable | None = None,
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    lr_decay: float | None = None,
    presumptive_lr_decay: float = PRESUMPTIVE_LR_DECAY,
    label_key: str = "label",
    class_prior: Any = "labelled",
    train_transform: Callable | None = None,
    min_steps: int = 0,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Alternate label propagation and classifier retraining until the presumptive labels converge (Python API).

    The bundle's overlay ``train_semisupervised.json`` runs the same rounds with :class:`SemiSupervisedWorkflow`
    around the config's own trainer; this function wires a trainer per round with
    :func:`~monai_condflow.engines.classifier.train_classifier`, for use outside a bundle.

    Round 0 trains on the labelled data only (``initial_epochs``, lr decay from the label count via
    :func:`~monai_condflow.engines.classifier.lr_decay_for_label_fraction` unless ``lr_decay`` is given) and
    propagates. Each further round retrains on labelled + presumptive labels (``epochs_per_round``, decay
    ``presumptive_lr_decay``) and propagates again; the loop stops when the fraction of changed presumptive labels
    is below ``tol`` or after ``max_rounds`` retrains. Centroids always come from the labelled embeddings.

    Args:
        network: the classifier (kept and fine-tuned from round to round) or a zero-argument factory (a fresh
            network every round).
        labelled: labelled dataset (or list of records with ``transform``) with items ``{"image", "label"}``.
        unlabelled: unlabelled dataset / records (``label`` absent or ignored).
        device: training device.
        num_classes: number of classes.
        initial_epochs: epochs of round 0.
        epochs_per_round: epochs of every retrain.
        batch_size: global batch size.
        kind: ``"gaussian"`` or ``"wasserstein"`` similarity.
        bandwidth: Gaussian bandwidth (``None``: median distance).
        max_rounds: maximum number of retrain rounds after round 0.
        tol: stop when fewer than this fraction of presumptive labels change between rounds.
        true_labels: optional true labels ``[N_u]`` of the unlabelled data (to log the presumptive-label accuracy).
        val_data: optional validation data for every training run.
        transform: transform for record lists.
        output_dir: per-round checkpoints (``round_<r>/``) and TensorBoard scalars (``label_propagation/``);
            rank 0 writes.
        seed: seed of every training run.
        lr_decay: decay of round 0 (``None``: from the label count).
        presumptive_lr_decay: decay of the retrain rounds (paper: 0.99).
        label_key: key of the labels.
        class_prior: class proportions the presumptive labels keep: ``"labelled"`` (default: the labelled set's
            ratio, which the stratified label sampler keeps equal to the data's), class weights ``[C]``, or ``None``
            for the paper's plain nearest-centroid rule (a weak round-0 classifier can then give the minority class
            a large share of the unlabelled data).
        train_transform: random augmentation applied to the training items of every round (labelled and
            presumptive); embeddings for the centroids and the propagation always see the un-augmented images.
        min_steps: round 0 trains at least this many optimiser steps: its epoch goes over the labelled set
            ``ceil(min_steps * batch_size / (initial_epochs * n_labelled))`` times (with 20-50 labels an epoch is one
            or two steps, far too few for a classifier whose embedding must carry the class).
        trainer_kwargs: passed to :func:`~monai_condflow.engines.classifier.train_classifier` (``lr``, ...).

    Returns:
        A dict: ``rounds`` (list of per-round dicts: ``round``, ``fraction_changed`` (``None`` in round 0),
        ``class_balance`` (fraction per class), ``mean_confidence``, ``presumptive_accuracy`` (when
        ``true_labels``), ``train`` (the training result)), ``presumptive_labels`` and ``confidence`` (tensors
        ``[N_u]``), ``centroids``, ``converged`` (bool), ``num_rounds`` and ``network`` (the final classifier).
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")
    _check_round_options(max_rounds, tol, min_steps, network)
    labelled_ds = _as_dataset(labelled, transform)
    unlabelled_ds = _as_dataset(unlabelled, transform)
    val_ds = None if val_data is None else _as_dataset(val_data, transform)
    n_labelled, n_unlabelled = len(labelled_ds), len(unlabelled_ds)  # type: ignore[arg-type]
    if n_labelled == 0 or n_unlabelled == 0:
        raise ValueError(f"need labelled and unlabelled data, got {n_labelled} and {n_unlabelled} items.")
    y_true = None if true_labels is None else torch.as_tensor(np.asarray(true_labels)).reshape(-1).long()
    if y_true is not None and y_true.numel() != n_unlabelled:
        raise ValueError(f"true_labels has {y_true.numel()} entries for {n_unlabelled} unlabelled items.")
    if lr_decay is None:
        lr_decay = lr_decay_for_label_fraction(n_labelled, total=n_labelled + n_unlabelled)

    factory = None if isinstance(network, torch.nn.Module) else network
    model = network if factory is None else factory()
    writer = None
    if output_dir is not None and get_rank() == 0:
        writer = SummaryWriter(log_dir=os.path.join(os.fspath(output_dir), "label_propagation"))
    propagation = LabelPropagation(num_classes, kind=kind, bandwidth=bandwidth, class_prior=class_prior)
    # deterministic, unshuffled, single-pass embedding loaders (every rank embeds everything)
    embed_labelled = MonaiDataLoader(labelled_ds, batch_size=batch_size, shuffle=False)
    unlabelled_view = _LabelledView(unlabelled_ds, [-1] * n_unlabelled, label_key)
    embed_unlabelled = MonaiDataLoader(unlabelled_view, batch_size=batch_size, shuffle=False)
    labels_l = torch.as_tensor(_dataset_label_list(labelled_ds, label_key), dtype=torch.long)

    rounds: list[dict[str, Any]] = []
    previous: torch.Tensor | None = None
    presumptive = confidence = None
    converged = False
    for round_index in range(max_rounds + 1):
        if round_index == 0:
            train_ds: Dataset = labelled_ds
            epochs, decay = initial_epochs, lr_decay
            repeats = _min_steps_repeats(min_steps, batch_size, initial_epochs, n_labelled)
            if repeats > 1:  # a longer epoch, not more epochs: validation and checkpoints stay once per epoch
                train_ds = ConcatDataset([labelled_ds] * repeats)
        else:
            train_ds = ConcatDataset([labelled_ds, _LabelledView(unlabelled_ds, presumptive.tolist(), label_key)])
            epochs, decay = epochs_per_round, presumptive_lr_decay
        if train_transform is not None:
            train_ds = _Augmented(train_ds, train_transform)
            if factory is not None:
                model = factory()
        round_dir = None if output_dir is None else os.path.join(os.fspath(output_dir), f"round_{round_index}")
        train_loader = create_loader(train_ds, batch_size=batch_size, shuffle=True, seed=seed + round_index)
        train_result = train_classifier(
            model,
            train_loader,
            val_ds,
            device=device,
            max_epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            output_dir=round_dir,
            lr_decay=decay,
            num_classes=num_classes,
            **trainer_kwargs,
        )
        z_l, _ = compute_embeddings(model, embed_labelled, device)
        z_u, _ = compute_embeddings(model, embed_unlabelled, device)
        stats = _propagate_round(propagation, z_l, labels_l, z_u, previous, y_true, round_index, num_classes)
        presumptive, confidence = stats.pop("labels"), stats.pop("confidence")
        stats["train"] = train_result
        rounds.append(stats)
        _log_round(writer, stats)
        if stats["fraction_changed"] is not None and stats["fraction_changed"] < tol:
            converged = True
            break
        previous = presumptive
    if writer is not None:
        writer.close()
    return {
        "rounds": rounds,
        "presumptive_labels": presumptive,
        "confidence": confidence,
        "centroids": propagation.centroids,
        "converged": converged,
        "num_rounds": len(rounds),
        "network": model,
        "last_checkpoint": rounds[-1]["train"]["last_checkpoint"] if rounds else None,
    }


SCHEDULES = ("exponential", "onecycle")


class RoundLRScheduler:
    """A learning-rate schedule that starts afresh in every round of label propagation.

    Each round trains as a new run would: the optimizer's ``lr`` (and betas) go back to their initial values, its
    moment estimates are cleared, and a new schedule covers the round: ``"exponential"`` (the paper:
    ``ExponentialLR`` with ``gamma`` in round 0 and ``presumptive_gamma`` afterwards, stepped once per epoch) or
    ``"onecycle"`` (``OneCycleLR`` to the initial ``lr`` over the round's steps, 15 % warm-up). Step it once per
    iteration (``LrScheduleHandler(epoch_level=False)``); the exponential schedule counts the iterations of an epoch
    itself. It saves and restores the round's schedule with ``state_dict`` / ``load_state_dict`` (tensors and
    numbers only), so a checkpointed run resumes mid-round.

    Args:
        optimizer: the classifier's optimizer (the config's ``optimizer`` id).
        schedule: ``"exponential"`` or ``"onecycle"``.
        gamma: per-epoch decay of round 0 (the config's ``lr_decay`` id).
        presumptive_gamma: per-epoch decay of the rounds with presumptive labels (paper: 0.99).
        pct_start: warm-up fraction of the one-cycle schedule.

    Example::

        scheduler = RoundLRScheduler(optimizer, "onecycle")
        scheduler.start_round(0, epochs=30, steps_per_epoch=8)  # then step() after every iteration
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str = "onecycle",
        gamma: float = PRESUMPTIVE_LR_DECAY,
        presumptive_gamma: float = PRESUMPTIVE_LR_DECAY,
        pct_start: float = 0.15,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        for name, value in (("gamma", gamma), ("presumptive_gamma", presumptive_gamma)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
        self.optimizer = optimizer
        self.schedule = schedule
        self.gamma = float(gamma)
        self.presumptive_gamma = float(presumptive_gamma)
        self.pct_start = float(pct_start)
        # the hyperparameters every round starts from
        self._initial = [{k: g[k] for k in ("lr", "betas") if k in g} for g in optimizer.param_groups]
        self.round = -1
        self.epochs = 0
        self.steps_per_epoch = 1
        self.steps = 0
        self.inner: Any = None

    def _build(self) -> None:
        for group, initial in zip(self.optimizer.param_groups, self._initial):
            group.update(initial)
            for key in ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"):
                group.pop(key, None)
        if self.schedule == "onecycle":
            total = max(1, self.epochs * self.steps_per_epoch)
            max_lr = [g["lr"] for g in self.optimizer.param_groups]
            self.inner = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=max_lr, total_steps=total, pct_start=self.pct_start
            )
        else:
            gamma = self.gamma if self.round == 0 else self.presumptive_gamma
            self.inner = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)

    def start_round(self, round_index: int, epochs: int, steps_per_epoch: int) -> None:
        """Reset the optimizer and begin the schedule of a round of ``epochs`` epochs of ``steps_per_epoch`` steps."""
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(f"a round needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}.")
        self.round, self.epochs, self.steps_per_epoch = int(round_index), int(epochs), int(steps_per_epoch)
        self.steps = 0
        self.optimizer.state.clear()
        self._build()

    def step(self) -> None:
        """Advance by one iteration (no-op before the first :meth:`start_round` and after the round's last step)."""
        if self.inner is None:
            return
        self.steps += 1
        if self.schedule == "onecycle":
            if self.steps < self.epochs * self.steps_per_epoch:  # OneCycleLR refuses a step past its total
                self.inner.step()
        elif self.steps % self.steps_per_epoch == 0:
            self.inner.step()

    def get_last_lr(self) -> list[float]:
        """The current learning rate of every parameter group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The round's schedule: round, epochs, steps per epoch, steps taken and the inner scheduler's state."""
        state: dict[str, Any] = {
            "round": self.round,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "steps": self.steps,
            "initial": [dict(g) for g in self._initial],
        }
        if self.inner is not None:
            state["inner"] = {k: v for k, v in self.inner.state_dict().items() if k != "optimizer"}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rebuild the saved round's schedule (the optimizer's own state is restored from its own entry)."""
        self.round, self.epochs = int(state["round"]), int(state["epochs"])
        self.steps_per_epoch, self.steps = int(state["steps_per_epoch"]), int(state["steps"])
        self._initial = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["initial"]]
        if "inner" not in state:
            self.inner = None
            return
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        betas = [g.get("betas") for g in self.optimizer.param_groups]
        self._build()
        self.inner.load_state_dict(dict(state["inner"]))
        for group, lr, beta in zip(self.optimizer.param_groups, lrs, betas):  # the optimizer's saved values win
            group["lr"] = lr
            if beta is not None:
                group["betas"] = beta


class SemiSupervisedWorkflow:
    """Label propagation around the bundle's own classifier trainer (``@train#trainer`` of ``train_classifier.json``).

    Round 0 trains the trainer on the labelled records, then every round embeds the labelled and unlabelled images,
    propagates labels from the labelled class centroids (:class:`LabelPropagation`) and, until the presumptive
    labels change by less than ``tol`` or after ``max_rounds`` retrains, trains on labelled + presumptive records.
    The training data of a round is set on the trainer's own dataset (``set_data`` of its ``CacheDataset``), so every
    round uses the config's transforms (augmentation), loader, loss, optimizer, handlers (validation, TensorBoard,
    checkpoints) and network. The trainer's epochs run on across rounds (round ``r`` continues the epoch count), and
    the workflow's own state (round, presumptive labels, round summaries) is saved with the trainer's checkpoints
    (put it in the ``state_saver`` / ``state_loader`` dicts), so a killed run resumes where it stopped.

    TensorBoard: the epoch-level scalars of the trainer and its validator continue with the epochs. Ignite needs
    ``trainer.state.iteration`` at a multiple of the round's epoch length, so the iteration count itself restarts
    with every round's epoch length; the workflow keeps the difference to the run's iteration count in
    ``trainer.state.iteration_offset`` (saved with its state), which
    :class:`~monai_condflow.handlers.tensorboard_stats.OffsetTensorBoardStatsHandler` adds to the step of
    ``train_loss``: every point of every round at its own step. A resumed run writes no round summary that the event
    files in ``log_dir`` already hold (a run killed early in a round resumes from the end of the previous one).

    Args:
        trainer: a MONAI ``SupervisedTrainer`` whose ``data_loader.dataset`` has ``set_data`` (``CacheDataset``).
        labelled: labelled records ``{"image", "label", ...}``.
        unlabelled: unlabelled records (their ``label``, if any, is replaced by the presumptive label).
        embed_labelled: dataset of the labelled images without augmentation (for the centroids), in ``labelled``'s
            order.
        embed_unlabelled: dataset of the unlabelled images without augmentation, in ``unlabelled``'s order.
        num_classes: number of classes ``C``.
        initial_epochs: epochs of round 0.
        epochs_per_round: epochs of each retrain round.
        max_rounds: retrain rounds after round 0 at most.
        tol: stop when fewer than this fraction of the presumptive labels change.
        kind: ``"gaussian"`` or ``"wasserstein"`` similarity.
        bandwidth: Gaussian bandwidth (``None``: median distance).
        class_prior: ``"labelled"``, class weights ``[C]`` or ``None`` (see :class:`LabelPropagation`).
        min_steps: round 0 trains at least this many optimiser steps (its epoch goes over the labelled set several
            times; with 20-50 labels an epoch is one or two steps).
        lr_scheduler: a :class:`RoundLRScheduler` to restart every round, or ``None`` to keep the trainer's schedule.
        true_labels: true labels ``[N_u]`` of the unlabelled records, to log the presumptive-label accuracy.
        log_dir: folder of the per-round TensorBoard scalars at step ``round`` (rank 0 writes), or ``None``.
        seed: the trainer loader's generator is reseeded with ``seed + round`` at the start of every round.
        batch_size: batch size of the embedding passes.
        label_key: key of the labels.
        selected_checkpoint: the file in which the trainer's validator keeps the best-validation weights so far
            (a state dict, bare or under ``"network"``; the overlay's ``model_best_val.pt``), or ``None``. Given,
            every round propagates with the embeddings of those weights instead of the round's last ones (selection on
            validation: with 20-50 labels the later epochs of a round can fit wrong presumptive labels), the
            returned ``network`` is a copy holding them, and each round's summary records ``selection``
            (``"best validation"`` or ``"last"``) and, with ``true_labels``, the accuracy the last weights would
            have given (``presumptive_accuracy_last``). The trainer itself always continues from its
            last weights.

    Example (the overlay ``train_semisupervised.json``)::

        "semi": {"workflow": {"_target_": "monai_condflow.engines.label_propagation.SemiSupervisedWorkflow",
                              "trainer": "@train#trainer", ...}, "result": "$@semi#workflow.run()"}
    """

    def __init__(
        self,
        trainer: Any,
        labelled: Sequence[Mapping],
        unlabelled: Sequence[Mapping],
        embed_labelled: Dataset,
        embed_unlabelled: Dataset,
        *,
        num_classes: int,
        initial_epochs: int,
        epochs_per_round: int,
        max_rounds: int = 3,
        tol: float = 0.01,
        kind: str = "gaussian",
        bandwidth: float | None = None,
        class_prior: Any = "labelled",
        min_steps: int = 0,
        lr_scheduler: RoundLRScheduler | None = None,
        true_labels: Sequence[int] | None = None,
        log_dir: str | os.PathLike | None = None,
        seed: int = 0,
        batch_size: int = 64,
        label_key: str = "label",
        selected_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        _check_round_options(max_rounds, tol, min_steps, trainer.network)
        for name, value in (("initial_epochs", initial_epochs), ("epochs_per_round", epochs_per_round)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not hasattr(trainer.data_loader.dataset, "set_data"):
            raise TypeError("the trainer's dataset must have `set_data` (a MONAI CacheDataset).")
        if not labelled or not unlabelled:
            raise ValueError(f"need labelled and unlabelled records, got {len(labelled)} and {len(unlabelled)}.")
        self.trainer = trainer
        self.labelled = list(labelled)
        self.unlabelled = list(unlabelled)
        self.num_classes = num_classes
        self.initial_epochs, self.epochs_per_round = initial_epochs, epochs_per_round
        self.max_rounds, self.tol, self.min_steps = max_rounds, tol, min_steps
        self.lr_scheduler = lr_scheduler
        self.log_dir = log_dir
        self.seed = seed
        self.label_key = label_key
        self.selected_checkpoint = None if selected_checkpoint is None else os.fspath(selected_checkpoint)
        self.propagation = LabelPropagation(num_classes, kind=kind, bandwidth=bandwidth, class_prior=class_prior)
        self.true_labels = None if true_labels is None else torch.as_tensor(list(true_labels)).reshape(-1).long()
        if self.true_labels is not None and self.true_labels.numel() != len(self.unlabelled):
            raise ValueError(f"true_labels has {self.true_labels.numel()} entries for {len(self.unlabelled)} records.")
        self.embed_labelled = MonaiDataLoader(embed_labelled, batch_size=batch_size, shuffle=False)
        self.embed_unlabelled = MonaiDataLoader(embed_unlabelled, batch_size=batch_size, shuffle=False)
        self.labels_labelled = torch.as_tensor([int(r[label_key]) for r in self.labelled], dtype=torch.long)
        # progress, saved with the trainer's checkpoints
        self.round = 0
        self.round_end_epoch = -1  # -1: the round's training has not started
        self.iteration_offset = 0  # the run's iteration count minus trainer.state.iteration in this round
        self.presumptive: torch.Tensor | None = None  # labels the current round trains on
        self.rounds: list[dict[str, Any]] = []
        self.converged = False
        self.confidence: torch.Tensor | None = None

    @property
    def max_epochs(self) -> int:
        """The most epochs the trainer can run over all rounds."""
        return self.initial_epochs + self.max_rounds * self.epochs_per_round

    def state_dict(self) -> dict[str, Any]:
        """Round, the round's last epoch and iteration offset, its presumptive labels and the finished rounds."""
        return {
            "round": self.round,
            "round_end_epoch": self.round_end_epoch,
            "iteration_offset": self.iteration_offset,
            "presumptive": torch.zeros(0, dtype=torch.long) if self.presumptive is None else self.presumptive,
            "rounds": [dict(r) for r in self.rounds],
            "converged": self.converged,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.round, self.round_end_epoch = int(state["round"]), int(state["round_end_epoch"])
        self.iteration_offset = int(state.get("iteration_offset", 0))  # absent from checkpoints of older versions
        presumptive = torch.as_tensor(state["presumptive"]).long()
        self.presumptive = presumptive if presumptive.numel() else None
        self.rounds = [dict(r) for r in state["rounds"]]
        self.converged = bool(state["converged"])

    def _round_records(self) -> list[dict]:
        if self.round == 0:
            batch = int(getattr(self.trainer.data_loader, "batch_size", None) or 1)
            repeats = _min_steps_repeats(self.min_steps, batch, self.initial_epochs, len(self.labelled))
            return [dict(r) for r in self.labelled] * repeats
        assert self.presumptive is not None
        presumptive = [{**r, self.label_key: int(y)} for r, y in zip(self.unlabelled, self.presumptive.tolist())]
        return [dict(r) for r in self.labelled] + presumptive

    def _train_round(self) -> None:
        trainer = self.trainer
        loader = trainer.data_loader
        loader.dataset.set_data(self._round_records())
        refresh_sampler(loader)  # under torchrun the DistributedSampler was sized for the first round's records
        steps = len(loader)
        starting = self.round_end_epoch < 0
        if starting:
            # the iteration count restarts below with this round's epoch length: the offset keeps the round's first
            # iteration at the run's next one in TensorBoard
            self.iteration_offset += int(trainer.state.iteration) - int(trainer.state.epoch) * steps
            epochs = self.initial_epochs if self.round == 0 else self.epochs_per_round
            self.round_end_epoch = int(trainer.state.epoch) + epochs
            if self.lr_scheduler is not None:
                self.lr_scheduler.start_round(self.round, epochs, steps)
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self.seed + self.round)
        # continue the epoch count with this round's epoch length; ignite starts an epoch at iteration % length == 0
        trainer.state.epoch_length = steps
        trainer.state.iteration = int(trainer.state.epoch) * steps
        setattr(trainer.state, ITERATION_OFFSET, self.iteration_offset)
        trainer.state.max_epochs = self.round_end_epoch
        if trainer.state.epoch < self.round_end_epoch:
            trainer.run()

    def resume(self, state_loader: Any) -> None:
        """Restore the trainer's checkpoint (with this workflow's state in its ``load_dict``) before :meth:`run`.

        Call it instead of attaching the loader to the trainer, which would reload at the start of every round.

        Args:
            state_loader: a MONAI ``CheckpointLoader``, or ``None`` (nothing to resume).
        """
        if state_loader is None:
            return
        self.trainer.state.max_epochs = self.max_epochs  # so that a checkpoint of a late round loads
        state_loader(self.trainer)

    def run(self) -> dict[str, Any]:
        """Train and propagate round by round (after :meth:`resume`, from where the checkpoint stopped).

        Returns:
            A dict: ``rounds`` (per round: ``round``, ``fraction_changed``, ``class_balance``, ``mean_confidence``,
            ``presumptive_accuracy`` with true labels, ``epochs`` (the trainer's epoch count at the round's end)),
            ``presumptive_labels`` and ``confidence`` (``[N_u]``), ``centroids`` ``[C, D]``, ``converged``,
            ``num_rounds`` and ``network``.
        """
        writer, logged = None, -1
        if self.log_dir is not None and get_rank() == 0:
            if self.round > 0 or self.round_end_epoch >= 0:  # resumed from a checkpoint
                logged = _last_logged_round(self.log_dir)
            writer = SummaryWriter(log_dir=os.fspath(self.log_dir))
        labels = None
        network = self.trainer.network
        try:
            while True:
                self._train_round()
                device = self.trainer.state.device
                network, selection = self._selected_network()
                last_accuracy = None
                if network is not self.trainer.network and self.true_labels is not None:
                    last_accuracy = self._last_weights_accuracy(device)
                z_l, _ = compute_embeddings(network, self.embed_labelled, device)
                z_u, _ = compute_embeddings(network, self.embed_unlabelled, device)
                # under torchrun every rank labels with rank 0's embeddings: the same labels, and the same decision to
                # stop (a rank that stopped alone would leave the others waiting in their next collective)
                z_l, z_u = broadcast_tensor(z_l), broadcast_tensor(z_u)
                stats = _propagate_round(
                    self.propagation, z_l, self.labels_labelled, z_u, self.presumptive, self.true_labels,
                    self.round, self.num_classes,
                )  # fmt: skip
                stats["selection"] = selection
                if last_accuracy is not None:
                    stats["presumptive_accuracy_last"] = last_accuracy
                labels, self.confidence = stats.pop("labels"), stats.pop("confidence")
                stats["epochs"] = int(self.trainer.state.epoch)
                self.rounds = [r for r in self.rounds if r["round"] != self.round] + [stats]
                _log_round(writer, stats, after=logged)
                changed = stats["fraction_changed"]
                self.converged = changed is not None and changed < self.tol
                if self.converged or self.round >= self.max_rounds:
                    break
                self.round, self.round_end_epoch, self.presumptive = self.round + 1, -1, labels
        finally:
            if writer is not None:
                writer.close()
        return {
            "rounds": self.rounds,
            "presumptive_labels": labels,
            "confidence": self.confidence,
            "centroids": self.propagation.centroids,
            "converged": self.converged,
            "num_rounds": len(self.rounds),
            "network": network,
        }

    def _selected_network(self) -> tuple[torch.nn.Module, str]:
        """The network whose embeddings label this round: a copy with the best-validation weights so far when
        :attr:`selected_checkpoint` exists, else the trainer's network (its last weights)."""
        if self.selected_checkpoint is None:
            return self.trainer.network, "last"
        if is_distributed():
            barrier()  # rank 0's validator may still be writing the file: every rank reads the same weights
        if not os.path.isfile(self.selected_checkpoint):
            logger.warning("no best-validation checkpoint at %s: this round propagates with the last weights",
                           self.selected_checkpoint)  # fmt: skip
            return self.trainer.network, "last"
        network = copy.deepcopy(unwrap_model(self.trainer.network))
        load_module_weights(network, self.selected_checkpoint, what="best-validation checkpoint")
        return network.eval(), "best validation"

    def _last_weights_accuracy(self, device: Any) -> float:
        """Presumptive-label accuracy that the trainer's last weights would give (a diagnostic; true labels only)."""
        z_l, _ = compute_embeddings(self.trainer.network, self.embed_labelled, device)
        z_u, _ = compute_embeddings(self.trainer.network, self.embed_unlabelled, device)
        probe = LabelPropagation(
            self.num_classes, kind=self.propagation.kind, bandwidth=self.propagation.bandwidth,
            class_prior=self.propagation.class_prior, eps=self.propagation.eps,
        ).fit(z_l, self.labels_labelled)  # fmt: skip
        labels, _ = probe.predict(z_u)
        assert self.true_labels is not None
        return float((labels == self.true_labels).float().mean())
