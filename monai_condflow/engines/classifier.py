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
"""Training of the PEPX classifier ``C = h(g(x))`` with MONAI engines, and extraction of its embeddings ``z``.

:func:`create_classifier_trainer` wires a MONAI :class:`~monai.engines.SupervisedTrainer` (AdamW, cross-entropy,
per-epoch exponential lr decay) and a :class:`~monai.engines.SupervisedEvaluator` (accuracy, macro F1 / precision /
recall; macro F1 is the key metric) with the standard MONAI handlers. With ``output_dir`` it writes the files of
the bundle's classifier stage (``train_classifier.json``), under the same names:

- ``model.pt`` (:data:`~monai_condflow.utils.io.MODEL_FILE`): the network's plain ``state_dict`` at the best
  validation macro F1,
- ``state_checkpoint_epoch=N.pt`` (prefix :data:`~monai_condflow.utils.io.STATE_PREFIX`): the full training state
  after the latest epoch (network, optimizer, lr scheduler, trainer, loader random state, best-metric tracking),
  what ``resume_from`` reads; the previous epoch's file is deleted once the new one is in place,
- TensorBoard event files (``train_loss`` per iteration; ``lr``, ``train_accuracy`` and the ``val_*`` metrics per
  epoch).

Both checkpoints are written atomically (temporary file + fsync + ``os.replace``), so a run killed mid-save keeps
the previous file and never shows a partial one. Checkpoints are loaded with ``torch.load(..., weights_only=True)``
(MONAI 1.6.1's :class:`~monai.handlers.CheckpointLoader` does so).

Determinism: with ``seed`` set, every epoch starts from ``torch.manual_seed(seed + epoch)`` and the data order
depends only on ``(seed, epoch)`` (``DistributedSampler.set_epoch`` from MONAI's workflow, or the loader's reseeded
generator), so two seeded CPU runs give identical losses and a run resumed at an epoch boundary ends with the weights
of an uninterrupted run.

Distributed (``torchrun``): when a process group is initialised (:func:`~monai_condflow.utils.distributed.
init_distributed`), the network is wrapped in DDP, metrics are all-reduced, and only rank 0 logs and writes files.
Loaders should come from :func:`~monai_condflow.utils.distributed.create_loader` (as :func:`train_classifier`
does), whose ``batch_size`` is the global batch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.utils import IgniteInfo, min_version, optional_import
from torch.utils.data import DataLoader, Dataset

from monai_condflow.handlers.checkpoint import LoaderRandomState, find_latest_checkpoint
from monai_condflow.handlers.checkpoint_saver import AtomicCheckpointSaver, BestMetricState
from monai_condflow.handlers.learning_rate import LearningRateRecorder
from monai_condflow.metrics.classification import (
    ClassificationAccuracy,
    MacroF1,
    MacroPrecision,
    MacroRecall,
)
from monai_condflow.networks.embeddings import compute_embeddings
from monai_condflow.utils.checks import check_positive_int
from monai_condflow.utils.distributed import create_loader, get_rank, is_distributed, unwrap_model, wrap_ddp
from monai_condflow.utils.io import MODEL_FILE, STATE_PREFIX

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
else:
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = [
    "KEY_METRIC_NAME",
    "lr_decay_for_label_fraction",
    "balanced_class_weights",
    "create_classifier_trainer",
    "train_classifier",
    "compute_embeddings",
]

logger = logging.getLogger(__name__)

KEY_METRIC_NAME = "val_macro_f1"
"""Name of the evaluator's key metric (the best checkpoint is chosen by it)."""

# paper appendix: label level -> per-epoch exponential lr decay
_PAPER_DECAY_FULL = 0.99  # 100 % of the labels (and presumptive-label epochs)
_PAPER_DECAY_5PC = 0.998  # 5 %
_PAPER_DECAY_1PC = 0.999  # 1 % and 0.5 %
_PAPER_DECAY_FEW = 0.9998  # 50 and 20 samples
_FEW_SAMPLES = 50


def lr_decay_for_label_fraction(fraction_or_count: float | int, total: int | None = None) -> float:
    """The paper's per-epoch exponential lr decay for a level of label availability.

    Paper appendix: 0.99 with 100 % of the labels, 0.998 with 5 %, 0.999 with 1 % and 0.5 %, 0.9998 with 50 or 20
    labelled samples.

    Args:
        fraction_or_count: a ``float`` in ``(0, 1]`` is the labelled fraction; an ``int`` is a number of labelled
            samples. A count of at most 50 (that is not the whole training set) maps to 0.9998; a larger count is
            turned into a fraction with ``total``. A fraction is snapped to the nearest paper level on a log scale
            (boundaries at the geometric midpoints: >= 22.4 % -> 0.99, >= 2.24 % -> 0.998, below -> 0.999).
        total: size of the training set, needed for counts above 50.

    Returns:
        The decay factor ``gamma`` for ``torch.optim.lr_scheduler.ExponentialLR``.

    Raises:
        ValueError: for a non-positive value, a fraction above 1, or a count above 50 without ``total``.
        TypeError: for a ``bool``.
    """
    if isinstance(fraction_or_count, bool) or not isinstance(fraction_or_count, (int, float)):
        raise TypeError(f"fraction_or_count must be an int (count) or float (fraction), got {fraction_or_count!r}.")
    if fraction_or_count <= 0:
        raise ValueError(f"fraction_or_count must be positive, got {fraction_or_count!r}.")
    if isinstance(fraction_or_count, int):
        if total is not None and (total < 1 or fraction_or_count > total):
            raise ValueError(f"total must be >= the labelled count {fraction_or_count}, got {total!r}.")
        if fraction_or_count <= _FEW_SAMPLES and (total is None or fraction_or_count < total):
            return _PAPER_DECAY_FEW
        if total is None:
            raise ValueError(
                f"a label count above {_FEW_SAMPLES} ({fraction_or_count}) needs `total` (the training-set size)."
            )
        fraction = fraction_or_count / total
    else:
        fraction = float(fraction_or_count)
        if fraction > 1.0:
            raise ValueError(f"a label fraction must be in (0, 1], got {fraction!r}.")
    if fraction >= math.sqrt(1.0 * 0.05):
        return _PAPER_DECAY_FULL
    if fraction >= math.sqrt(0.05 * 0.01):
        return _PAPER_DECAY_5PC
    return _PAPER_DECAY_1PC


def _dataset_labels(loader: Iterable, label_key: str = "label") -> torch.Tensor:
    """All labels of a loader's dataset: from the records of a MONAI ``Dataset`` if possible, else by iterating."""
    dataset = getattr(loader, "dataset", None)
    records = getattr(dataset, "data", None)
    if isinstance(records, Sequence) and len(records) > 0 and all(isinstance(r, Mapping) for r in records):
        if all(label_key in r for r in records):
            return torch.as_tensor([int(r[label_key]) for r in records], dtype=torch.long)
    labels = [torch.as_tensor(batch[label_key]).reshape(-1).long() for batch in loader]
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def balanced_class_weights(labels: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights ``n / (C * n_c)`` (scikit-learn's "balanced"); absent classes get weight 0.

    Args:
        labels: class ids of the training samples.
        num_classes: number of classes ``C``.

    Returns:
        ``float32`` tensor ``[C]``.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    counts = torch.bincount(labels_t, minlength=num_classes).double()
    weights = torch.where(counts > 0, labels_t.numel() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def _infer_num_classes(network: torch.nn.Module) -> int:
    module = unwrap_model(network)
    for attr in ("out_channels", "num_classes"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("cannot infer the number of classes from the network; pass `num_classes`.")
    return int(linears[-1].out_features)


def _epoch_start_handler(loader: Iterable, seed: int | None) -> Callable[[SupervisedTrainer], None]:
    """Reseed the epoch (torch RNG and the sampler's generator) from ``seed + epoch``."""

    def _on_epoch_started(engine: SupervisedTrainer) -> None:
        if seed is None:
            return
        epoch_seed = int(seed) + int(engine.state.epoch)
        torch.manual_seed(epoch_seed)
        generator = getattr(getattr(loader, "sampler", None), "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)

    return _on_epoch_started


def _loss_output(output: Any) -> Any:
    """The iteration loss from a trainer output (a dict when ``decollate=False``, else a list of dicts)."""
    loss = output["loss"] if isinstance(output, Mapping) else from_engine(["loss"], first=True)(output)
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def create_classifier_trainer(
    network: torch.nn.Module,
    train_loader: Iterable | DataLoader,
    val_loader: Iterable | DataLoader | None = None,
    *,
    device: str | torch.device,
    max_epochs: int,
    lr: float = 1e-5,
    weight_decay: float = 1e-7,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_decay: float | None = None,
    schedule: str = "exponential",
    label_fraction: float | int | None = None,
    class_weights: str | torch.Tensor | Sequence[float] | None = None,
    num_classes: int | None = None,
    output_dir: str | os.PathLike | None = None,
    val_interval: int = 1,
    amp: bool = False,
    seed: int | None = 0,
    resume_from: str | os.PathLike | None = None,
    iteration_log: bool = True,
) -> tuple[SupervisedTrainer, SupervisedEvaluator | None]:
    """Build the classifier's MONAI trainer (and evaluator when ``val_loader`` is given).

    Args:
        network: a module with ``forward(x) -> logits [B, C]`` (and ``embed(x) -> z``), e.g. ``PEPXNet``. It is
            moved to ``device`` and, when a process group is initialised, wrapped in DDP (``trainer.network``).
        train_loader: batches ``{"image": [B, 1, S, S], "label": [B]}``; use
            :func:`~monai_condflow.utils.distributed.create_loader` for deterministic, torchrun-ready loading.
        val_loader: validation batches of the same form; ``None`` for no evaluator (and no best checkpoint).
        device: training device.
        max_epochs: total number of epochs (a resumed run continues up to this number).
        lr: AdamW learning rate. The paper uses 1e-5 (the default), which is slow for short CPU runs; small CPU
            presets pass about 1e-3.
        weight_decay: AdamW weight decay (paper: 1e-7).
        betas: AdamW betas (paper: (0.9, 0.999)).
        lr_decay: per-epoch ``ExponentialLR`` gamma. ``None`` derives it from ``label_fraction`` with
            :func:`lr_decay_for_label_fraction`, or uses 0.99 (all labels) when that is also ``None``.
        schedule: ``"exponential"`` (the paper: ``ExponentialLR(lr_decay)`` per epoch) or ``"onecycle"``
            (``OneCycleLR`` to ``lr`` over the whole run, per iteration, 15 % warm-up; measured on the phantom with 50
            labels: presumptive-label accuracy 0.965 vs 0.79 with the exponential schedule, docs/results.md).
        label_fraction: labelled fraction (float) or count (int) of the training set, used only for ``lr_decay``.
        class_weights: cross-entropy class weights: ``None`` (unweighted), ``"balanced"`` (``n / (C n_c)`` from the
            training labels) or a tensor / sequence of ``C`` weights.
        num_classes: number of classes; inferred from the network (``out_channels`` or its last ``Linear``) if
            ``None``.
        output_dir: directory for the checkpoints and TensorBoard files (rank 0 only); ``None`` writes nothing.
        val_interval: validate every ``val_interval`` epochs.
        amp: automatic mixed precision (CUDA).
        seed: per-epoch reseeding (see the module docstring); ``None`` leaves the RNG alone.
        resume_from: a training-state checkpoint to resume from (a ``state_checkpoint_epoch=N.pt`` file, or a
            directory whose newest complete one is used), loaded with MONAI's ``CheckpointLoader``
            (``weights_only=True``).
        iteration_log: also print the loss every iteration (TensorBoard always gets ``train_loss`` per iteration).

    Returns:
        ``(trainer, evaluator)``; ``evaluator`` is ``None`` without ``val_loader``. Run with ``trainer.run()``.

    Raises:
        ValueError: on a bad ``max_epochs``, ``val_interval``, ``lr``, ``lr_decay``, ``class_weights`` value, or a
            ``resume_from`` that is neither a file nor a directory holding a complete training-state checkpoint.
    """
    check_positive_int("max_epochs", max_epochs)
    if not isinstance(val_interval, int) or val_interval < 1:
        raise ValueError(f"val_interval must be a positive integer, got {val_interval!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if lr_decay is None:
        lr_decay = _PAPER_DECAY_FULL if label_fraction is None else lr_decay_for_label_fraction(label_fraction)
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}.")
    device = torch.device(device)
    num_classes = _infer_num_classes(network) if num_classes is None else int(num_classes)

    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a tensor, got {class_weights!r}.")
        weight: torch.Tensor | None = balanced_class_weights(_dataset_labels(train_loader), num_classes)
    elif class_weights is None:
        weight = None
    else:
        weight = torch.as_tensor(class_weights, dtype=torch.float32).reshape(-1)
        if weight.numel() != num_classes:
            raise ValueError(f"class_weights needs {num_classes} entries, got {weight.numel()}.")
    if weight is not None:
        logger.info("cross-entropy class weights: %s", [round(w, 4) for w in weight.tolist()])
        weight = weight.to(device)

    if is_distributed():
        # Ignite detects the process group lazily, and that detection is a collective (`new_group`): do it here on
        # every rank, before rank-0-only handlers (checkpoint savers) would trigger it on rank 0 alone -> deadlock.
        idist.sync()
    model = wrap_ddp(network, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if schedule == "exponential":
        scheduler: Any = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    elif schedule == "onecycle":
        total_steps = max(1, max_epochs * len(train_loader))  # type: ignore[arg-type]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    else:
        raise ValueError(f"schedule must be 'exponential' or 'onecycle', got {schedule!r}.")
    loss_function = torch.nn.CrossEntropyLoss(weight=weight)

    is_main = get_rank() == 0
    writer: SummaryWriter | None = None
    if output_dir is not None and is_main:
        os.makedirs(output_dir, exist_ok=True)
        writer = SummaryWriter(log_dir=str(output_dir))

    evaluator: SupervisedEvaluator | None = None
    best_state: BestMetricState | None = None
    best_saver: AtomicCheckpointSaver | None = None
    trainer_ref: list[SupervisedTrainer] = []
    if val_loader is not None:
        val_handlers: list[Any] = []
        if is_main:
            val_handlers.append(StatsHandler(iteration_log=False, name=__name__))
        if writer is not None:
            val_handlers.append(
                TensorBoardStatsHandler(
                    summary_writer=writer,
                    iteration_log=False,
                    global_epoch_transform=lambda e: trainer_ref[0].state.epoch,
                )
            )
            best_saver = AtomicCheckpointSaver(
                save_dir=str(output_dir),
                save_dict={"network": unwrap_model(model)},
                save_key_metric=True,
                key_metric_name=KEY_METRIC_NAME,
                key_metric_filename=MODEL_FILE,
            )
            val_handlers.append(best_saver)
        metric_io = from_engine(["pred", "label"])
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=val_loader,
            network=model,
            key_val_metric={KEY_METRIC_NAME: MacroF1(num_classes, output_transform=metric_io, device=device)},
            additional_metrics={
                "val_accuracy": ClassificationAccuracy(num_classes, output_transform=metric_io, device=device),
                "val_macro_precision": MacroPrecision(num_classes, output_transform=metric_io, device=device),
                "val_macro_recall": MacroRecall(num_classes, output_transform=metric_io, device=device),
            },
            val_handlers=val_handlers,
            amp=amp,
            decollate=False,
        )
        best_state = BestMetricState(evaluator)

    # training-state objects saved every epoch and restored by `resume_from`
    train_handlers: list[Any] = []
    trainer_state_objects: dict[str, Any] = {"network": unwrap_model(model), "optimizer": optimizer}
    trainer_state_objects["lr_scheduler"] = scheduler
    # the loader's own random streams (augmentation, its generators) at the epoch boundary, for an exact resume
    trainer_state_objects["loader_rng"] = LoaderRandomState(train_loader)
    if best_state is not None:
        trainer_state_objects["best"] = best_state
    if best_saver is not None:
        trainer_state_objects["best_saver"] = best_saver
    if resume_from is not None:
        resume_path = os.fspath(resume_from)
        if os.path.isdir(resume_path):
            found = find_latest_checkpoint(resume_path, STATE_PREFIX)
            resume_path = os.path.join(resume_path, f"{STATE_PREFIX}_*.pt") if found is None else os.fspath(found[0])
        if not os.path.isfile(resume_path):
            raise ValueError(f"resume_from: no checkpoint at {resume_path!r}.")
        logger.info("resuming the classifier from %s", resume_path)
        # filled with the trainer below, before the engine runs; CheckpointLoader uses weights_only=True
        loader_handler = CheckpointLoader(load_path=resume_path, load_dict=trainer_state_objects, map_location=device)
        train_handlers.append(loader_handler)
    train_handlers.append(
        LrScheduleHandler(
            lr_scheduler=scheduler, print_lr=is_main and schedule == "exponential", name=__name__,
            epoch_level=schedule == "exponential",
        )
    )  # fmt: skip
    if evaluator is not None:
        train_handlers.append(ValidationHandler(interval=val_interval, validator=evaluator, epoch_level=True))
    if is_main:
        train_handlers.append(
            StatsHandler(
                iteration_log=iteration_log,
                tag_name="train_loss",
                output_transform=_loss_output,
                state_attributes=["lr"],
                name=__name__,
            )
        )
    if writer is not None:
        train_handlers.append(
            TensorBoardStatsHandler(
                summary_writer=writer,
                iteration_log=True,
                tag_name="train_loss",
                output_transform=_loss_output,
                state_attributes=["lr"],
            )
        )

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=model,
        optimizer=optimizer,
        loss_function=loss_function,
        key_train_metric={
            "train_accuracy": ClassificationAccuracy(
                num_classes, output_transform=from_engine(["pred", "label"]), device=device
            )
        },
        train_handlers=None,
        amp=amp,
        decollate=False,
    )
    trainer_ref.append(trainer)
    trainer_state_objects["trainer"] = trainer
    # the epoch's lr in `state.lr` (read at EPOCH_COMPLETED by the stats handlers), then the epoch seeding
    LearningRateRecorder(optimizer).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_STARTED, _epoch_start_handler(train_loader, seed))
    for handler in train_handlers:
        handler.attach(trainer)
    if output_dir is not None and is_main:
        # last: it must see the stepped scheduler and the validation of this epoch
        AtomicCheckpointSaver(
            save_dir=str(output_dir),
            save_dict=trainer_state_objects,
            file_prefix=STATE_PREFIX,
            save_interval=1,
            n_saved=1,
            epoch_level=True,
        ).attach(trainer)
    if writer is not None:
        trainer.add_event_handler(Events.COMPLETED, lambda _: writer.flush())
    trainer.summary_writer = writer  # type: ignore[attr-defined]
    trainer.num_classes = num_classes  # type: ignore[attr-defined]
    trainer.best_metric_state = best_state  # type: ignore[attr-defined]
    return trainer, evaluator


def _make_loader(
    data: Dataset | Sequence | Iterable | None, batch_size: int, shuffle: bool, seed: int, num_workers: int
) -> Iterable | None:
    if data is None or isinstance(data, DataLoader):
        return data
    if isinstance(data, (Dataset, Sequence)):
        return create_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)
    return data  # any other iterable of batches


def train_classifier(
    network: torch.nn.Module,
    train_data: Dataset | Sequence | DataLoader,
    val_data: Dataset | Sequence | DataLoader | None = None,
    *,
    device: str | torch.device,
    max_epochs: int,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train the classifier and return its best validation metrics and checkpoint paths.

    Datasets are turned into loaders with :func:`~monai_condflow.utils.distributed.create_loader` (``batch_size``
    is the global batch; training data shuffled with ``seed``); loaders are used as given.

    Args:
        network: the classifier (see :func:`create_classifier_trainer`).
        train_data: training dataset (items ``{"image", "label"}``) or loader.
        val_data: validation dataset or loader, or ``None``.
        device: training device.
        max_epochs: number of epochs.
        batch_size: global batch size for datasets (paper: 64).
        num_workers: loader workers for datasets.
        seed: data-order and per-epoch seed.
        output_dir: directory for checkpoints and TensorBoard files.
        kwargs: any other argument of :func:`create_classifier_trainer` (``lr``, ``lr_decay``, ``class_weights``,
            ``resume_from``, ...).

    Returns:
        A dict with ``best_metric`` (validation macro F1, ``None`` without validation), ``best_metric_epoch``,
        ``best_metrics`` (all validation metrics at the best epoch), ``final_metrics`` (validation metrics of the
        last validation), ``train_metrics`` (last epoch), ``final_loss``, ``epochs``, ``best_checkpoint``
        (``output_dir/model.pt``) and ``last_checkpoint`` (the newest ``output_dir/state_checkpoint_epoch=N.pt``);
        paths, ``None`` when not written.
    """
    train_loader = _make_loader(train_data, batch_size, True, seed, num_workers)
    val_loader = _make_loader(val_data, batch_size, False, seed, num_workers)
    trainer, evaluator = create_classifier_trainer(
        network,
        train_loader,
        val_loader,
        device=device,
        max_epochs=max_epochs,
        seed=seed,
        output_dir=output_dir,
        **kwargs,
    )
    trainer.run()
    if trainer.summary_writer is not None:
        trainer.summary_writer.close()

    def _scalars(metrics: Mapping) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    result: dict[str, Any] = {
        "epochs": int(trainer.state.epoch),
        "train_metrics": _scalars(trainer.state.metrics),
        "final_loss": float(_loss_output(trainer.state.output)) if trainer.state.output is not None else None,
        "best_metric": None,
        "best_metric_epoch": None,
        "best_metrics": {},
        "final_metrics": {},
        "best_checkpoint": None,
        "last_checkpoint": None,
    }
    if evaluator is not None and evaluator.state.best_metric_epoch >= 0:
        result["best_metric"] = float(evaluator.state.best_metric)
        result["best_metric_epoch"] = int(evaluator.state.best_metric_epoch)
        result["best_metrics"] = dict(trainer.best_metric_state.best_metrics)
        result["final_metrics"] = _scalars(evaluator.state.metrics)
    if output_dir is not None:
        best = os.path.join(os.fspath(output_dir), MODEL_FILE)
        result["best_checkpoint"] = best if os.path.isfile(best) else None
        last = find_latest_checkpoint(output_dir, STATE_PREFIX)
        result["last_checkpoint"] = None if last is None else os.fspath(last[0])
    logger.info("classifier trained: %s", {k: v for k, v in result.items() if k != "train_metrics"})
    return result
