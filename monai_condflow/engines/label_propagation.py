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

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset as MonaiDataset
from monai.utils import optional_import
from torch.utils.data import ConcatDataset, Dataset

from monai_condflow.engines.classifier import (
    LAST_CHECKPOINT_NAME,
    compute_embeddings,
    lr_decay_for_label_fraction,
    train_classifier,
)
from monai_condflow.engines.distributed import create_loader, get_rank

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
else:
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = [
    "SIMILARITY_KINDS",
    "class_centroids",
    "pairwise_distance",
    "median_bandwidth",
    "similarity",
    "propagate_labels",
    "class_quotas",
    "LabelPropagation",
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
    """Alternate label propagation and classifier retraining until the presumptive labels converge.

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
    if type(network).__module__.startswith("opacus"):
        raise ValueError(
            "run_semisupervised got an Opacus-wrapped (DP-SGD) network: label propagation computes presumptive labels "
            "outside the DP mechanism, so train_semisupervised.json cannot be combined with train_classifier_dp.json."
            " Train the DP classifier on the labelled images only."
        )
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}.")
    if not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds must be a non-negative integer, got {max_rounds!r}.")
    if not 0 <= tol <= 1:
        raise ValueError(f"tol must be in [0, 1], got {tol!r}.")
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be a non-negative integer, got {min_steps!r}.")
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
            repeats = -(-min_steps * batch_size // max(1, initial_epochs * n_labelled))
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
        propagation.fit(z_l, labels_l)
        presumptive, confidence = propagation.predict(z_u)
        stats: dict[str, Any] = {
            "round": round_index,
            "fraction_changed": None if previous is None else float((presumptive != previous).float().mean()),
            "class_balance": (torch.bincount(presumptive, minlength=num_classes).double() / n_unlabelled).tolist(),
            "mean_confidence": float(confidence.mean()),
            "train": train_result,
        }
        if y_true is not None:
            stats["presumptive_accuracy"] = float((presumptive == y_true).float().mean())
        rounds.append(stats)
        logger.info(
            "label propagation round %d: changed %s, class balance %s, mean confidence %.4f%s",
            round_index,
            "-" if stats["fraction_changed"] is None else f"{stats['fraction_changed']:.4f}",
            [round(b, 4) for b in stats["class_balance"]],
            stats["mean_confidence"],
            "" if y_true is None else f", presumptive accuracy {stats['presumptive_accuracy']:.4f}",
        )
        if writer is not None:
            if stats["fraction_changed"] is not None:
                writer.add_scalar("fraction_changed", stats["fraction_changed"], round_index)
            for k, b in enumerate(stats["class_balance"]):
                writer.add_scalar(f"class_balance/{k}", b, round_index)
            writer.add_scalar("mean_confidence", stats["mean_confidence"], round_index)
            if y_true is not None:
                writer.add_scalar("presumptive_accuracy", stats["presumptive_accuracy"], round_index)
            writer.flush()
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
        "last_checkpoint": None
        if output_dir is None
        else os.path.join(os.fspath(output_dir), f"round_{len(rounds) - 1}", LAST_CHECKPOINT_NAME),
    }
