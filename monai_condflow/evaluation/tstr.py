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
"""Train-on-synthetic / test-on-real (TSTR) versus train-on-real / test-on-real (TRTR), and class agreement.

Protocol (paper, "Evaluation protocol"): a fresh classifier is trained on a synthetic set of the same size and class
ratio as the real training set (TSTR) and another on the real training set (TRTR); both are tested on the held-out
real test split. Accuracy, macro-F1, macro-precision and macro-recall are repeated over test-set bootstraps and over
synthetic sets drawn with different seeds and reported as mean +- std (the paper's Table 3 format). The bootstrap
resamples are shared by TRTR and TSTR (paired comparison).

Class agreement is the fraction of synthetic images that the real-trained classifier assigns to their conditioning
class; the same fraction on the real training images is reported beside it as the reference. Per conditioning class
(:func:`per_class_agreement`) it shows the commonest failure at once: a classifier that calls nearly every synthetic
image one class agrees on that class's images and on almost none of the others'.

Image sets are ``(images [N, 1, S, S] float32 in [0, 1], labels [N] int64)`` tuples; :func:`as_image_set` also
accepts a MONAI-style sequence of ``{"image", "label"}`` dicts (e.g. a ``Dataset`` after its transform chain).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset
from monai.networks.layers import gaussian_1d, separable_filtering

from monai_condflow.engines.classifier import train_classifier
from monai_condflow.handlers.checkpoint import load_module_weights
from monai_condflow.metrics.classification import confusion_matrix, report_from_confusion_matrix
from monai_condflow.metrics.periodicity import lattice_peak
from monai_condflow.metrics.sharpness import sharpness_ratio
from monai_condflow.metrics.variety import variety_ratio
from monai_condflow.progress import ProgressLog
from monai_condflow.utils.io import MODEL_FILE

__all__ = [
    "BLUR_SIGMA",
    "LATTICE_PERIOD",
    "METRIC_KEYS",
    "ImageSet",
    "as_image_set",
    "bootstrap_indices",
    "blurred",
    "bootstrap_scores",
    "class_agreement",
    "default_fit_fn",
    "evaluate_tstr",
    "match_class_composition",
    "per_class_agreement",
    "predict",
    "summarize_scores",
    "train_real_classifier",
    "train_real_classifiers",
]

logger = logging.getLogger(__name__)

ImageSet = tuple[torch.Tensor, torch.Tensor]
"""``(images [N, C, *S], labels [N])``."""

# Gaussian blur (pixels) of the real training images for the class-agreement reference: on the embedded phantom a
# real-trained classifier calls most slices blurred by 0.8 px and every slice blurred by 1.2 px COVID-19
# (docs/results.md), so an agreement close to this reference says the synthetic images are blurred, not off-class.
BLUR_SIGMA = 1.0

# period (pixels) of the squeeze lattice the evaluation measures: two 2x squeezes, period 2 included (their hatching
# is what the flows draw; docs/metrics.md)
LATTICE_PERIOD = 4

METRIC_KEYS = ("accuracy", "f1", "precision", "recall")
"""Keys of a score dict; ``f1`` / ``precision`` / ``recall`` are macro averages over all classes."""

_REPORT_KEYS = {"accuracy": "accuracy", "f1": "macro_f1", "precision": "macro_precision", "recall": "macro_recall"}


def as_image_set(data: ImageSet | Sequence[Mapping[str, Any]], image_key: str = "image", label_key: str = "label"):
    """Normalise an image set to ``(images float32 [N, C, *S], labels int64 [N])`` on the CPU.

    Args:
        data: an ``(images, labels)`` pair, or a sequence of dicts with ``image_key`` / ``label_key`` (arrays or
            tensors ``[C, *S]``).
        image_key: image key of dict items.
        label_key: label key of dict items.

    Raises:
        ValueError: on an empty set, different lengths, or non-finite images.
    """
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], Mapping):
        images, labels = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    else:
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError("image set is empty.")
        images = torch.stack([torch.as_tensor(np.asarray(it[image_key])) for it in items])
        labels = torch.as_tensor([int(it[label_key]) for it in items])
    images = images.detach().cpu().float()
    labels = labels.detach().cpu().long().reshape(-1)
    if images.shape[0] == 0:
        raise ValueError("image set is empty.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"image set has {images.shape[0]} images but {labels.shape[0]} labels.")
    if not torch.isfinite(images).all():
        raise ValueError(f"image set holds {int((~torch.isfinite(images)).sum())} non-finite pixel values.")
    return images, labels


def predict(
    network: nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None
) -> torch.Tensor:
    """Class predictions ``argmax(network(x))`` ``[N]`` (int64, CPU), in eval mode without gradients."""
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = network.training
    network.eval()
    preds = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                logits = network(images[start : start + batch_size].to(device))
                preds.append(logits.argmax(dim=1).cpu())
    finally:
        network.train(was_training)
    return torch.cat(preds).long()


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> torch.Tensor:
    """``[n_bootstrap, n]`` resampling indices (with replacement), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_bootstrap, n), generator=g)


def bootstrap_scores(
    y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int, indices: torch.Tensor | None
) -> list[dict[str, float]]:
    """Scores of every bootstrap resample (or of the full set when ``indices`` is ``None`` or empty).

    Returns:
        A list of dicts with :data:`METRIC_KEYS`.
    """
    rows = [None] if indices is None or indices.shape[0] == 0 else list(indices)
    out = []
    for idx in rows:
        t, p = (y_true, y_pred) if idx is None else (y_true[idx], y_pred[idx])
        rep = report_from_confusion_matrix(confusion_matrix(t, p, num_classes))
        out.append({k: float(rep[v]) for k, v in _REPORT_KEYS.items()})
    return out


def summarize_scores(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and population std of each metric: ``{accuracy, accuracy_std, f1, f1_std, ...}`` (fractions in [0, 1])."""
    out: dict[str, float] = {}
    for k in METRIC_KEYS:
        values = np.asarray([s[k] for s in scores], dtype=np.float64)
        out[k] = float(values.mean())
        out[f"{k}_std"] = float(values.std())
    return out


def match_class_composition(
    synthetic: ImageSet, target_labels: torch.Tensor, num_classes: int, seed: int = 0
) -> ImageSet:
    """Subsample a synthetic set to the size and per-class counts of ``target_labels`` (the real training set).

    Classes with fewer synthetic images than needed are drawn with replacement (a warning is logged).

    Raises:
        ValueError: when a class present in ``target_labels`` has no synthetic image.
    """
    images, labels = synthetic
    g = torch.Generator().manual_seed(int(seed))
    need = torch.bincount(target_labels.reshape(-1).long(), minlength=num_classes)
    chosen = []
    for c in range(num_classes):
        n_c = int(need[c])
        if n_c == 0:
            continue
        pool = torch.nonzero(labels == c).reshape(-1)
        if pool.numel() == 0:
            raise ValueError(f"synthetic set has no image of class {c}, the real training set has {n_c}.")
        if pool.numel() >= n_c:
            chosen.append(pool[torch.randperm(pool.numel(), generator=g)[:n_c]])
        else:
            logger.warning(
                "class %d: %d synthetic images for %d needed; drawing with replacement", c, pool.numel(), n_c
            )
            chosen.append(pool[torch.randint(0, pool.numel(), (n_c,), generator=g)])
    idx = torch.cat(chosen)
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    return images[idx], labels[idx]


def default_fit_fn(
    network: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    *,
    seed: int,
    device: str | torch.device,
    output_dir: str | os.PathLike | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **train_kwargs: Any,
) -> nn.Module:
    """Train a classifier with :func:`monai_condflow.engines.classifier.train_classifier` and keep the best weights.

    With ``val`` the weights of the best validation macro-F1 epoch are loaded back (from ``model.pt``);
    without it the last epoch's weights are kept. Files go to ``output_dir`` (a temporary folder when ``None``).

    Args:
        network: fresh classifier (``forward -> logits [B, C]``).
        train: training ``(images, labels)``.
        val: validation ``(images, labels)`` or ``None``.
        seed: data-order seed.
        device: training device.
        output_dir: where the classifier's checkpoints / TensorBoard files go.
        transform: a (random) dictionary transform applied to every training item ``{"image": [1, S, S], "label"}``
            each time it is read, e.g. the classifier stage's augmentation (``evaluate.json`` id
            ``train_augmentation``); ``None``: the images as they are. Validation images are never transformed.
        train_kwargs: ``max_epochs`` (default 10), ``batch_size``, ``lr`` (default 1e-3) and any other argument of
            ``train_classifier`` / ``create_classifier_trainer``.

    Returns:
        The trained ``network`` (same object) in eval mode.
    """

    kwargs = {"max_epochs": 10, "lr": 1e-3, "iteration_log": False}
    kwargs.update(train_kwargs)

    def _records(s: ImageSet) -> list[dict[str, Any]]:
        return [{"image": img, "label": int(lbl)} for img, lbl in zip(s[0], s[1])]

    with tempfile.TemporaryDirectory() as tmp:
        out = os.fspath(output_dir) if output_dir is not None else tmp
        train_items: Any = _records(train) if transform is None else Dataset(_records(train), transform=transform)
        result = train_classifier(
            network,
            train_items,
            _records(val) if val is not None else None,
            device=device,
            seed=seed,
            output_dir=out,
            **kwargs,
        )
        best = result.get("best_checkpoint")
        if val is not None and best is not None and os.path.isfile(best):
            load_module_weights(network, best, what="best validation checkpoint")
        elif val is not None:
            logger.warning("no %s written; keeping the last epoch's weights", MODEL_FILE)
    return network.eval()


def _seeded_network(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(int(seed))
    return factory()


def train_real_classifier(
    real_train: ImageSet,
    real_val: ImageSet | None,
    *,
    network_factory: Callable[[], nn.Module],
    fit_fn: Callable[..., nn.Module] = default_fit_fn,
    train_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train the *evaluation* classifier on real data only (TRTR classifier, FID feature extractor, class agreement).

    Args:
        real_train: real training ``(images, labels)``.
        real_val: real validation set for epoch selection, or ``None``.
        network_factory: ``() -> nn.Module`` building a fresh classifier (e.g.
            ``lambda: PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)``).
        fit_fn: ``fit_fn(network, train, val, *, seed, device, **train_kwargs) -> network``.
        train_kwargs: passed to ``fit_fn``.
        seed: initialisation and data-order seed.
        device: training device.
    """
    net = _seeded_network(network_factory, seed)
    return fit_fn(net, real_train, real_val, seed=seed, device=device, **dict(train_kwargs or {}))


def train_real_classifiers(
    real_train: ImageSet,
    real_val: ImageSet | None,
    seeds: Sequence[int],
    *,
    network_factory: Callable[[], nn.Module],
    fit_fn: Callable[..., nn.Module] = default_fit_fn,
    train_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressLog | None = None,
) -> list[nn.Module]:
    """One :func:`train_real_classifier` per seed in ``seeds`` (the evaluation's judges / TRTR classifiers), in
    order; ``progress`` (a :class:`~monai_condflow.progress.ProgressLog`) counts one step per trained classifier."""
    nets = []
    for k, seed in enumerate(seeds):
        logger.info("training real-data classifier %d/%d (seed %d)", k + 1, len(seeds), seed)
        nets.append(
            train_real_classifier(
                real_train,
                real_val,
                network_factory=network_factory,
                fit_fn=fit_fn,
                train_kwargs=train_kwargs,
                seed=seed,
                device=device,
            )
        )
        if progress is not None:
            progress.update()
    return nets


def class_agreement(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels`` (their conditioning class)."""
    preds = predict(classifier, images, batch_size)
    return float((preds == labels.reshape(-1).long()).double().mean())


def per_class_agreement(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per conditioning class ``c``, the fraction of the images conditioned on ``c`` that are predicted as ``c``.

    Args:
        predictions: ``[N]`` predicted classes.
        labels: ``[N]`` conditioning classes in ``[0, num_classes)``.
        num_classes: number of classes.

    Returns:
        ``num_classes`` fractions; ``None`` for a class without images.

    Raises:
        ValueError: different lengths, fractional labels, or a label outside ``[0, num_classes)``.
    """
    if torch.is_floating_point(labels) and not bool((labels == labels.round()).all()):
        raise ValueError("per_class_agreement: labels must be class ids (whole numbers), got fractional values.")
    preds, labels = predictions.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
    if preds.numel() != labels.numel():
        raise ValueError(f"per_class_agreement: {preds.numel()} predictions for {labels.numel()} labels.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"per_class_agreement: labels must be in [0, {num_classes}), got [{low}, {high}].")
    out: list[float | None] = []
    for c in range(num_classes):
        mine = labels == c
        out.append(float((preds[mine] == c).double().mean()) if bool(mine.any()) else None)
    return out


def _mean_per_class(per_set: list[list[float | None]]) -> list[float | None]:
    """Mean over synthetic sets (or judges), class by class (``None`` where one has no image of the class)."""
    return [None if any(v is None for v in col) else float(np.mean(col)) for col in zip(*per_set)]


def _lattice_or_none(images: torch.Tensor) -> float | None:
    """:func:`~monai_condflow.metrics.periodicity.lattice_peak` at :data:`LATTICE_PERIOD`, or ``None`` where it does
    not apply (not ``[N, C, H, W]``, or sides the period does not divide)."""
    if images.ndim != 4 or images.shape[-1] % LATTICE_PERIOD or images.shape[-2] % LATTICE_PERIOD:
        return None
    return lattice_peak(images, period=LATTICE_PERIOD)


def blurred(images: torch.Tensor, sigma: float = BLUR_SIGMA, batch_size: int = 256) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` smoothed by a Gaussian of ``sigma`` pixels (MONAI's separable filter, edges
    replicated), in batches on the images' device."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0)
    out = [
        separable_filtering(images[i : i + batch_size], [kernel.to(images.device, images.dtype)] * 2, mode="replicate")
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else images.clone()


def evaluate_tstr(
    real_train: ImageSet | Sequence[Mapping[str, Any]],
    real_val: ImageSet | Sequence[Mapping[str, Any]] | None,
    real_test: ImageSet | Sequence[Mapping[str, Any]],
    synthetic_sets: Sequence[ImageSet],
    *,
    network_factory: Callable[[], nn.Module],
    num_classes: int | None = None,
    fit_fn: Callable[..., nn.Module] = default_fit_fn,
    train_kwargs: Mapping[str, Any] | None = None,
    n_bootstrap: int = 200,
    n_real_models: int = 1,
    real_classifier: nn.Module | Sequence[nn.Module] | None = None,
    match_composition: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """TSTR vs TRTR on the real test split, mean +- std over bootstraps and synthetic sets; class agreement.

    Each synthetic set (drawn with its own seed) trains one fresh classifier (TSTR); ``n_real_models`` classifiers
    with different seeds are trained on the real training set (TRTR; the ``real_classifier`` ones, when given, are
    used first). Every classifier is scored on the same ``n_bootstrap`` resamples of the test split (the full split
    when ``n_bootstrap == 0``); the mean and std are taken over all (classifier, resample) pairs. ``real_val`` selects
    the epoch of both kinds of classifiers (a mild use of real data in TSTR, as in the paper's practice; pass ``None``
    for strict TSTR).

    Every real-data classifier is also a *judge* of class agreement: each judges every synthetic set, and the figures
    are means over (judge, set) pairs. Two classifiers trained alike can disagree on synthetic images far more than on
    real ones (their decision boundaries differ off the real data), so with several judges the spread over judges
    (``class_agreement_judge_std``, ``class_agreement_per_judge``) says how much of a figure is the judge's.

    Args:
        real_train: real training set (sets the size and class ratio of each synthetic training set).
        real_val: real validation set or ``None``.
        real_test: held-out real test set.
        synthetic_sets: ``(images [M, 1, S, S], conditioning labels [M])`` per seed; non-finite images must have been
            removed.
        network_factory: ``() -> nn.Module`` building a fresh classifier.
        num_classes: number of classes; ``max(label) + 1`` over the real sets when ``None``.
        fit_fn: training function, see :func:`train_real_classifier`.
        train_kwargs: passed to ``fit_fn``.
        n_bootstrap: test-set resamples per classifier (0 for the plain test set).
        n_real_models: TRTR classifiers and class-agreement judges (seeds ``seed, seed + 1, ...``); at least the
            number of ``real_classifier`` modules given.
        real_classifier: already trained real-data classifier(s) to reuse as the first ones (a module or a sequence
            of modules; each skips one TRTR training).
        match_composition: subsample each synthetic set to the real training set's size and class counts.
        seed: base seed (bootstrap, subsampling, initialisation).
        device: training device.
        progress: log ``TRTR / TSTR classifiers: done/total, ETA`` lines
            (:class:`~monai_condflow.progress.ProgressLog`).

    Returns:
        ``{"trtr": scores, "tstr": scores, "tstr_per_set": [point scores per synthetic set], "trtr_point": ...,
        "class_agreement": float (mean over judges and sets), "class_agreement_std": float (over sets),
        "class_agreement_per_set": [mean over judges, per set], "class_agreement_per_judge": [mean over sets, per
        judge], "class_agreement_judge_std": float (std over judges; 0 with one), "n_judges": int,
        "class_agreement_per_class": [float | None per conditioning class] (:func:`per_class_agreement`, mean over
        judges and sets), "class_agreement_per_class_per_set": [[...] per set, mean over judges],
        "class_agreement_real": float (real training images, mean over judges),
        "class_agreement_real_blurred": float (the same images smoothed by a Gaussian of
        ``blur_sigma`` = :data:`BLUR_SIGMA` pixels: how much of the agreement is a test of sharpness),
        "sharpness_ratio": float (:func:`~monai_condflow.metrics.sharpness.sharpness_ratio` of each synthetic set to
        the real training images, mean over sets), "sharpness_ratio_per_set": [...], "variety_ratio": float
        (:func:`~monai_condflow.metrics.variety.variety_ratio` of each synthetic set to the real training images: how
        much the images of a class vary, mean over sets), "variety_ratio_per_set": [...], "lattice_peak": float or
        None (:func:`~monai_condflow.metrics.periodicity.lattice_peak`, period :data:`LATTICE_PERIOD`: the squeeze
        lattice of the synthetic images, mean over sets; about 1 without one; ``None`` for image sides it does not
        divide or images that are not 2-D), "lattice_peak_per_set": [...], "lattice_peak_real": the same of the real
        training images, "tstr_trtr_accuracy_ratio":
        float, "n_bootstrap": int, "n_synthetic_sets": int,
        "num_test": int}`` where ``scores`` holds :data:`METRIC_KEYS`, their ``*_std``, ``per_class_recall`` and
        ``per_class_precision`` (full test set, averaged over classifiers). All scores are fractions in [0, 1].

    Raises:
        ValueError: without synthetic sets, or with a class missing from a synthetic set.
    """
    if not synthetic_sets:
        raise ValueError("evaluate_tstr needs at least one synthetic set.")
    if real_classifier is None:
        given = []
    else:
        given = [real_classifier] if isinstance(real_classifier, nn.Module) else list(real_classifier)
    if n_bootstrap < 0 or n_real_models < 1:
        raise ValueError(f"need n_bootstrap >= 0 and n_real_models >= 1, got {n_bootstrap}, {n_real_models}.")
    if len(given) > n_real_models:
        n_real_models = len(given)
    train = as_image_set(real_train)
    val = as_image_set(real_val) if real_val is not None else None
    test = as_image_set(real_test)
    if num_classes is None:
        num_classes = int(max(int(s[1].max()) for s in (train, test) + ((val,) if val is not None else ()))) + 1
    kwargs = dict(train_kwargs or {})
    idx = bootstrap_indices(test[1].numel(), n_bootstrap, seed)

    def _score(net: nn.Module) -> tuple[list[dict[str, float]], dict[str, Any]]:
        preds = predict(net, test[0])
        point = report_from_confusion_matrix(confusion_matrix(test[1], preds, num_classes))
        return bootstrap_scores(test[1], preds, num_classes, idx), point

    def _collect(runs: list[tuple[list[dict[str, float]], dict[str, Any]]]) -> dict[str, Any]:
        summary: dict[str, Any] = summarize_scores([s for scores, _ in runs for s in scores])
        for key in ("recall", "precision"):
            per_class = np.mean([point["per_class"][key] for _, point in runs], axis=0)
            summary[f"per_class_{key}"] = [float(v) for v in per_class]
        summary["n_models"] = len(runs)
        return summary

    n_fits = n_real_models - len(given) + len(synthetic_sets)
    bar = ProgressLog(n_fits, "TRTR / TSTR classifiers", unit="trainings", enabled=progress)
    real_nets = [net.eval() for net in given] + train_real_classifiers(
        train,
        val,
        [seed + r for r in range(len(given), n_real_models)],
        network_factory=network_factory,
        fit_fn=fit_fn,
        train_kwargs=kwargs,
        device=device,
        progress=bar,
    )
    trtr_runs = [_score(n) for n in real_nets]

    tstr_runs, per_class, sharpness, variety, lattice = [], [], [], [], []
    agreement = np.zeros((len(real_nets), len(synthetic_sets)))  # [judge, set]
    for i, syn in enumerate(synthetic_sets):
        syn = as_image_set(syn)
        by_judge = []
        for j, judge in enumerate(real_nets):
            judged = predict(judge, syn[0])
            agreement[j, i] = float((judged == syn[1].reshape(-1).long()).double().mean())
            try:
                by_judge.append(per_class_agreement(judged, syn[1], num_classes))
            except ValueError as err:
                raise ValueError(f"synthetic set {i + 1} of {len(synthetic_sets)}: {err}") from err
        per_class.append(_mean_per_class(by_judge))
        sharpness.append(sharpness_ratio(syn[0], train[0]))
        variety.append(variety_ratio(syn[0], syn[1], train[0], train[1]))
        lattice.append(_lattice_or_none(syn[0]))
        if match_composition:
            syn = match_class_composition(syn, train[1], num_classes, seed=seed + 1000 + i)
        logger.info(
            "TSTR: training classifier on synthetic set %d/%d (%d images)", i + 1, len(synthetic_sets), syn[1].numel()
        )
        net = _seeded_network(network_factory, seed + 100 + i)
        net = fit_fn(net, syn, val, seed=seed + 100 + i, device=device, **kwargs)
        tstr_runs.append(_score(net))
        bar.update()
    bar.close()

    trtr, tstr = _collect(trtr_runs), _collect(tstr_runs)
    train_blurred = blurred(train[0])
    return {
        "trtr": trtr,
        "tstr": tstr,
        "tstr_per_set": [{k: float(p[v]) for k, v in _REPORT_KEYS.items()} for _, p in tstr_runs],
        "trtr_point": [{k: float(p[v]) for k, v in _REPORT_KEYS.items()} for _, p in trtr_runs],
        "class_agreement": float(agreement.mean()),
        "class_agreement_std": float(np.std(agreement.mean(axis=0))),
        "class_agreement_per_set": [float(v) for v in agreement.mean(axis=0)],
        "class_agreement_per_judge": [float(v) for v in agreement.mean(axis=1)],
        "class_agreement_judge_std": float(np.std(agreement.mean(axis=1))),
        "n_judges": len(real_nets),
        "class_agreement_per_class": _mean_per_class(per_class),
        "class_agreement_per_class_per_set": per_class,
        "class_agreement_real": float(np.mean([class_agreement(n, train[0], train[1]) for n in real_nets])),
        "class_agreement_real_blurred": float(
            np.mean([class_agreement(n, train_blurred, train[1]) for n in real_nets])
        ),
        "blur_sigma": BLUR_SIGMA,
        "sharpness_ratio": float(np.mean(sharpness)),
        "sharpness_ratio_per_set": sharpness,
        "variety_ratio": float(np.mean(variety)),
        "variety_ratio_per_set": variety,
        "lattice_peak": None if None in lattice else float(np.mean(lattice)),
        "lattice_peak_per_set": lattice,
        "lattice_peak_real": _lattice_or_none(train[0]),
        "tstr_trtr_accuracy_ratio": tstr["accuracy"] / trtr["accuracy"] if trtr["accuracy"] > 0 else float("nan"),
        "n_bootstrap": int(n_bootstrap),
        "n_synthetic_sets": len(synthetic_sets),
        "num_test": int(test[1].numel()),
        "num_classes": int(num_classes),
    }
