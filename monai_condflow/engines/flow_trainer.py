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
"""The flow stage's trainer for Python callers, built from the bundle's own config.

:func:`create_flow_trainer` parses ``common.json`` + ``train_flow.json`` (+ ``train_flow_dp.json``) of the bundle that
ships with the package and sets the ids that a bundle run computes from its data (the flow, the classifier, the
loaders) to the objects passed in. The optimiser, schedule, EMA, handlers, evaluator, checkpointer and resumer are the
config's, so a Python run and ``python -m monai.bundle run --config_file ... train_flow.json`` train the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.utils import optional_import
from torch.utils.data import DataLoader

from monai_condflow.engines.flow import FLOW_STATE_PREFIXES, FlowTrainer
from monai_condflow.engines.run_folder import open_run_folder
from monai_condflow.handlers.checkpoint import find_latest_checkpoint, load_checkpoint
from monai_condflow.utils.bundle import COMMON_CONFIG, read_bundle_config
from monai_condflow.utils.checks import check_flag, check_positive_int, check_temperature
from monai_condflow.utils.determinism import set_run_determinism
from monai_condflow.utils.distributed import get_rank, is_distributed, unwrap_model

Events, _ = optional_import("ignite.engine", name="Events")

__all__ = ["FLOW_CONFIGS", "FLOW_DP_CONFIGS", "create_flow_trainer"]

logger = logging.getLogger(__name__)

FLOW_CONFIGS: tuple[str, ...] = (COMMON_CONFIG, "train_flow.json")
"""The bundle configs of the flow stage, stacked in this order."""
FLOW_DP_CONFIGS: tuple[str, ...] = (*FLOW_CONFIGS, "train_flow_dp.json")
"""The flow stage under DP-SGD."""


def create_flow_trainer(
    flow: torch.nn.Module,
    classifier: torch.nn.Module | None,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    device: str | torch.device,
    max_epochs: int,
    output_dir: str | os.PathLike,
    lr: float = 5e-4,
    weight_decay: float = 1e-6,
    betas: tuple[float, float] = (0.5, 0.999),
    warmup_epochs: int = 10,
    lr_decay: float = 0.99,
    max_grad_norm: float | None = 50.0,
    n_bits: int = 8,
    val_interval: int = 1,
    sample_every: int = 0,
    sample_conditions: Mapping[int, torch.Tensor] | None = None,
    sample_temperature: float = 0.9,
    resume_from: str | os.PathLike | None = None,
    seed: int = 0,
    log_every: int = 10,
    tensorboard: bool = True,
    tensorboard_dir: str | os.PathLike | None = None,
    n_saved: int = 2,
    extra_train_handlers: Sequence[Any] = (),
    dp: Mapping[str, Any] | None = None,
    public_init: bool = False,
    settings: Mapping[str, Any] | None = None,
    ema_decay: float | None = None,
    spike_threshold: float | None = None,
    early_stop_patience: int = 0,
    precision: str = "tf32",
    cuda_graphs: bool = False,
    compile: bool = False,
    deterministic: bool = True,
) -> tuple[FlowTrainer, SupervisedEvaluator | None]:
    """
    Build the flow trainer (and its validation evaluator) from the bundle's ``train_flow.json`` (and
    ``train_flow_dp.json`` under ``dp``): the one wiring of the flow stage, here with Python objects in place of the
    config's data ids (``flow``, ``classifier``, ``train#dataloader``, ``validate#dataloader``) and the arguments
    below as the config's ids. What the bundle's ``initialize`` / ``run`` sections do around ``trainer.run()`` (lock
    and check the output folder, seed, attach the checkpointer and the resumer) is done here; the checkpoint to resume
    from is read (and refused if unsafe or from an incompatible run) before anything is built.

    Order of set-up: the checkpoint to resume from is read and checked; the flow is moved to ``device``; on a fresh
    start (no checkpoint) and only if the flow is not initialised, its ActNorms are initialised on the first global
    training batch (every rank gathers the first batches of all ranks, so one process and N processes initialise on
    the same images); then the network is wrapped in DDP (which broadcasts rank 0's parameters); a resumed run then
    loads every rank's flow, optimiser, schedule, EMA and bookkeeping from the checkpoint (the same file on every
    rank), and its random streams at ``STARTED``.

    Outputs in ``output_dir``, the names of the bundle's flow stage (``train_flow.json``):
    ``state_checkpoint_epoch={epoch}.pt`` (prefix :data:`~monai_condflow.utils.io.STATE_PREFIX`: flow, optimizer, lr
    scheduler, trainer, random states, checkpoint bookkeeping; the last ``n_saved`` epochs), ``model.pt``
    (:data:`~monai_condflow.utils.io.MODEL_FILE`: ``{"network": state_dict}`` of the evaluated flow, the EMA average
    when ``ema_decay`` is set, at the lowest validation bits/dim so far; replaced only by a better epoch),
    ``tensorboard/`` (or ``tensorboard_dir``) and ``samples/``. All files are written atomically by rank 0.
    Without ``val_loader`` or under ``dp`` no ``model.pt`` is written during training
    (:func:`~monai_condflow.engines.stages.finish_flow_stage` then writes the last epoch's weights).

    Args:
        flow: the conditional flow (``ConditionalGlow`` or any module with ``forward(x, z) -> (nu, logdet)``).
        classifier: frozen classifier computing ``z = embed(x)`` on the fly, or ``None`` when the batches carry a
            ``condition`` key.
        train_loader: training batches (use :func:`~monai_condflow.utils.distributed.create_loader`).
        val_loader: validation batches, or ``None`` (no evaluator, no ``model.pt`` chosen on validation).
        device: the run's device.
        max_epochs: total epochs (also when resuming).
        output_dir: where checkpoints, TensorBoard logs and sample grids go.
        lr: AdamW learning rate (peak, after warm-up).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_epochs: epochs of linear warm-up (per iteration).
        lr_decay: exponential decay factor per epoch after warm-up.
        max_grad_norm: gradient-norm clipping threshold (``None``: no clipping).
        n_bits: bits of the quantised data for bits/dim.
        val_interval: validate every N epochs.
        sample_every: write sample grids every N epochs (0: never).
        sample_conditions: class -> ``[n, condition_dim]`` conditions for the grids; default: up to 4 per class from
            the first training batch.
        sample_temperature: temperature of the grids.
        resume_from: a ``.pt`` checkpoint file (must exist), or a folder whose newest valid ``state_*.pt`` is used
            (an older run's ``latest_*.pt`` too, :data:`FLOW_STATE_PREFIXES`; a missing or empty folder starts
            fresh, so the same command serves first start and restart).
        seed: seeds torch / numpy / random (``monai.utils.set_determinism``).
        log_every: log the training loss every N iterations.
        tensorboard: write TensorBoard scalars (and grids) on rank 0.
        tensorboard_dir: folder of the TensorBoard files (default ``output_dir/tensorboard``; the bundle's flow
            stage uses ``OUTPUT_DIR/tensorboard/flow`` beside the other stages).
        n_saved: how many ``state`` checkpoints to keep.
        extra_train_handlers: more handlers to attach to the trainer.
        dp: DP-SGD settings, or ``None`` for ordinary training: ``target_epsilon``, ``target_delta`` (required),
            ``max_grad_norm`` (per-example clipping norm, default 1.0), ``accountant`` (default ``"prv"``). The flow
            keeps the identity ActNorm / PixelNorm initialisation (no data-dependent init), the loader becomes a
            Poisson loader, the noise follows from the target over ``max_epochs``, the accountant's state is saved
            in the ``state`` checkpoints (a resumed run continues the accounting; resuming with another
            ``max_epochs`` or target is refused), ``output_dir/privacy.json`` and the
            TensorBoard tag ``privacy/epsilon`` record the epsilon spent, and no epoch is selected on validation
            data (no ``model.pt`` during training: the last epoch is the model). One process only.
        public_init: with ``dp``: the ``flow`` passed in is already initialised with weights learned on *public*
            data only (e.g. :func:`monai_condflow.privacy.public.load_pretrained_weights`), so DP-SGD fine-tunes it
            instead of starting from the identity initialisation. An initialised flow without it is refused under DP.
        settings: more settings the run's files depend on (dataset, labels, hold-out, preset ...), recorded with the
            trainer's own (lr, weight decay, betas, warm-up, decay, clipping, bits, seed) in
            ``output_dir/run_settings.json``; a rerun into the folder with another value is refused with the setting
            named.
        ema_decay: keep an exponential moving average of the weights (:class:`~monai_condflow.engines.ema.ModelEMA`)
            with this decay; validation, ``model.pt`` and the sample grids then use the average
            (``trainer.ema.module``), and the ``state`` checkpoints hold it for resume. ``None`` or 0: off. Not
            used under DP.
        spike_threshold: the trainer's loss-spike guard in bits/dim (see :class:`FlowTrainer`); ``None``: off.
        early_stop_patience: stop when validation bits/dim has not improved for this many validations (0: never).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (see :mod:`monai_condflow.utils.precision`).
        cuda_graphs: replay each training step's forward and backward as CUDA graphs on a GPU (see
            :class:`~monai_condflow.engines.flow.FlowBitsPerDim`); ignored, with a warning, on the CPU.
        compile: train through ``torch.compile``'d flow steps (``ConditionalGlow.compile_steps``; the first steps
            compile: 68 s for the ``small`` and 106 s for the ``paper`` preset on 2 CPU cores); refused under ``dp``.
        deterministic: ``False`` lets cuDNN autotune its convolution algorithms on a GPU instead of using
            deterministic ones (:func:`~monai_condflow.utils.determinism.set_run_determinism`; the bundle id
            ``deterministic``): maybe faster, not reproducible bit for bit; no effect on the CPU.

    Crash safety: every file is written aside and moved into place; an old checkpoint is deleted only
    after its successor is written; bookkeeping restored from a checkpoint forgets files that are gone; temp files
    of an interrupted save are deleted; a ``model.pt`` of an earlier run is never taken for this run's (a fresh
    start's empty bookkeeping replaces it at the first validation). One process writes into ``output_dir`` at a
    time (a lock, rank 0). The loader's own random streams (shuffling, dequantisation noise, augmentation) are
    saved with each ``state`` checkpoint, so a resumed run equals the uninterrupted one.

    Returns:
        ``(trainer, evaluator)``; ``evaluator`` is ``None`` without ``val_loader``. Call ``trainer.run()``.

    Raises:
        ValueError: bad hyper-parameters.
        CheckpointError: ``resume_from`` is a file that cannot be loaded safely.
        RunSettingsError: ``output_dir`` holds the files of a run with other settings.
        OutputFolderLockedError: another process writes into ``output_dir``.
    """
    check_positive_int("max_epochs", max_epochs)
    check_flag(deterministic, "deterministic")
    if not lr > 0 or weight_decay < 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"bad optimiser settings: lr={lr}, weight_decay={weight_decay}, lr_decay={lr_decay}.")
    check_temperature(sample_temperature, "sample_temperature")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
    if warmup_epochs < 0 or n_saved < 1:
        raise ValueError(f"bad settings: warmup_epochs={warmup_epochs}, n_saved={n_saved}.")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}.")
    if early_stop_patience < 0:
        raise ValueError(f"early_stop_patience must be >= 0, got {early_stop_patience}.")
    if dp is not None:
        from monai_condflow.privacy.dp import check_dp_settings

        dp = check_dp_settings(dp)
        if compile:
            raise ValueError("DP-SGD flow training runs eagerly (per-sample gradients): set config id 'compile' false.")
        if is_distributed():
            raise ValueError("DP-SGD flow training runs in one process; start it without torchrun.")
    if val_interval < 1 or sample_every < 0 or log_every < 1:
        raise ValueError(
            f"bad intervals: val_interval={val_interval}, sample_every={sample_every}, log_every={log_every}."
        )
    device = torch.device(device)
    output_dir = Path(output_dir)
    rank = get_rank()
    output_lock = open_run_folder(
        output_dir,
        {"lr": lr, "weight_decay": weight_decay, "betas": list(betas), "warmup_epochs": warmup_epochs,
         "lr_decay": lr_decay, "max_grad_norm": max_grad_norm, "n_bits": n_bits, "seed": seed,
         **dict(settings or {})},
        section="trainer", fresh_hint=f"delete the folder {output_dir}",
    )  # fmt: skip
    try:
        trainer, evaluator = _build(
            flow, classifier, train_loader, val_loader, device=device, max_epochs=max_epochs, output_dir=output_dir,
            ids={"lr": lr, "weight_decay": weight_decay, "optimizer#betas": list(betas), "warmup_epochs": warmup_epochs,
                 "lr_decay": lr_decay, "max_grad_norm": max_grad_norm, "n_bits": n_bits, "val_interval": val_interval,
                 "sample_every": sample_every, "temperature": sample_temperature, "seed": seed,
                 "log_every": log_every, "n_saved": n_saved, "ema_decay": ema_decay,
                 "spike_threshold": spike_threshold, "early_stop_patience": early_stop_patience,
                 "precision": precision, "cuda_graphs": cuda_graphs, "compile": compile,
                 "deterministic": deterministic},
            sample_conditions=sample_conditions, resume_from=resume_from, tensorboard=tensorboard and rank == 0,
            tensorboard_dir=tensorboard_dir, extra_train_handlers=extra_train_handlers, dp=dp, public_init=public_init,
        )  # fmt: skip
    except BaseException:
        if output_lock is not None:
            output_lock.release()
        raise
    trainer.output_lock = output_lock
    return trainer, evaluator


def _resume_checkpoint(resume_from: str | os.PathLike | None) -> tuple[Path | None, dict | None]:
    """``(file, checkpoint)`` to resume from: a checkpoint file of any name (must load safely; a missing ``*.pt`` path
    is an error naming it), or the newest valid state file of a folder (``(None, None)`` when the folder holds none or
    does not exist yet, or when ``resume_from`` is ``None``)."""
    if resume_from is None:
        return None, None
    path = Path(resume_from)
    # a file, or a missing ``.pt`` (load_checkpoint names it), is read; anything else is a folder, existing or not.
    # Under torchrun rank 0 creates the run folder while the other ranks get here, so a missing folder can exist at
    # the next check: one decision per path (two checks once read a new folder as a file: IsADirectoryError).
    if path.is_file() or (path.suffix == ".pt" and not path.is_dir()):
        return path, load_checkpoint(path)
    found = find_latest_checkpoint(path, FLOW_STATE_PREFIXES)
    if found is None:
        logger.info("no valid checkpoint in %s: starting from scratch.", path)
        return None, None
    return found


def _build(
    flow: torch.nn.Module,
    classifier: torch.nn.Module | None,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    device: torch.device,
    max_epochs: int,
    output_dir: Path,
    ids: Mapping[str, Any],
    sample_conditions: Mapping[int, torch.Tensor] | None,
    resume_from: str | os.PathLike | None,
    tensorboard: bool,
    tensorboard_dir: str | os.PathLike | None,
    extra_train_handlers: Sequence[Any],
    dp: Mapping[str, Any] | None,
    public_init: bool,
) -> tuple[FlowTrainer, SupervisedEvaluator | None]:
    """Parse the flow stage's configs with the Python objects in place, then do the config's ``run`` steps up to
    (not including) ``trainer.run()``."""
    resume_path, checkpoint = _resume_checkpoint(resume_from)
    set_run_determinism(int(ids["seed"]), ids["deterministic"])
    parser = read_bundle_config(FLOW_DP_CONFIGS if dp is not None else FLOW_CONFIGS)
    parser.get_parsed_content("imports")  # the modules the expressions name (``os``, ``monai_condflow``, ...)
    overrides: dict[str, Any] = {
        **ids,
        "device": device,
        "max_epochs": max_epochs,
        "flow_dir": str(output_dir),
        "tb_dir": str(output_dir / "tensorboard" if tensorboard_dir is None else tensorboard_dir),
        "flow": unwrap_model(flow).to(device),
        "classifier": None if classifier is None else classifier.to(device),
        "resume_from": None if resume_path is None else str(resume_path),
        "validate#dataloader": val_loader,
    }
    if dp is None:
        overrides["train#dataloader"] = train_loader
    else:
        overrides.update(
            plain_dataloader=train_loader, target_epsilon=dp["target_epsilon"], target_delta=dp["target_delta"],
            dp_max_grad_norm=dp["max_grad_norm"], dp_accountant=dp["accountant"],
            public_init=public_init,
        )  # fmt: skip
    if sample_conditions is not None:
        overrides["sample_conditions"] = dict(sample_conditions)
    if not tensorboard:
        overrides["tb_writer"] = None
        overrides[_handler_id(parser, "train#handlers", "TensorBoardStatsHandler") + "#_disabled_"] = True
        overrides[_handler_id(parser, "validate#handlers", "TensorBoardStatsHandler") + "#_disabled_"] = True
    if val_loader is None:  # no evaluator: no validation, no best model, no early stopping
        overrides[_handler_id(parser, "train#handlers", "ValidationHandler") + "#_disabled_"] = True
        overrides.update({
            "checkpointer#save_dict#best_checkpoint": None, "checkpointer#save_dict#early_stopping": None,
            "resumer#load_dict#best_checkpoint": None, "resumer#load_dict#early_stopping": None,
            "resumer#checkpointers": ["@checkpointer"],
        })  # fmt: skip
    for key, value in overrides.items():
        parser[key] = value
    if extra_train_handlers:
        parser["train#handlers"] = list(parser["train#handlers"]) + list(extra_train_handlers)

    with _config_errors():
        resumer = parser.get_parsed_content("resumer")
        if checkpoint is not None:
            resumer.check(checkpoint)  # refuses an incompatible checkpoint before anything is built or written
        trainer: FlowTrainer = parser.get_parsed_content("train#trainer")
        evaluator = parser.get_parsed_content("validate#evaluator") if val_loader is not None else None
        early_stop = None
        if val_loader is not None:
            stop_id = _handler_id(parser, "validate#handlers", "ResumableEarlyStopHandler")
            early_stop = parser.get_parsed_content(stop_id)
        checkpointer = parser.get_parsed_content("checkpointer")
        writer = parser.get_parsed_content("tb_writer")
        grids = int(ids["sample_every"]) > 0 and bool(parser.get_parsed_content("sample_conditions"))
    if early_stop is not None:
        early_stop.set_trainer(trainer)
    checkpointer.attach(trainer)
    if checkpoint is not None:
        # the bundle's resumer restores at STARTED; a Python caller sees the resumed state at once (the random
        # streams still at STARTED, so that the resumed run draws what the uninterrupted one draws)
        resumer.restore(trainer, checkpoint)
        trainer.add_event_handler(Events.STARTED, lambda _: resumer.restore_random_state(checkpoint))
        trainer.resume_completed = resumer.resumed_epoch >= max_epochs
    if int(ids["sample_every"]) > 0 and not grids:
        logger.warning("sample grids disabled: no labelled conditions available.")
    if writer is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: writer.flush())
        trainer.add_event_handler(Events.COMPLETED, lambda _: writer.close())
    return trainer, evaluator


def _handler_id(parser: Any, list_id: str, target: str) -> str:
    """The id (``list_id#i``) of the one handler of ``list_id`` whose ``_target_`` ends with ``target``.

    Raises:
        KeyError: none or several match (the bundle config changed; the message names both).
    """
    found = [i for i, h in enumerate(parser[list_id]) if str(h.get("_target_", "")).split(".")[-1] == target]
    if len(found) != 1:
        raise KeyError(f"the bundle config's '{list_id}' must hold exactly one {target}, found {len(found)}.")
    return f"{list_id}#{found[0]}"


@contextmanager
def _config_errors() -> Iterator[None]:
    """Raise the error of a failed config expression or instantiation itself (MONAI wraps it in a ``RuntimeError``
    "Failed to evaluate / instantiate ..."), so that Python callers see e.g. the ``ValueError`` naming a bad value."""
    try:
        yield
    except RuntimeError as err:
        cause: BaseException = err
        while isinstance(cause, RuntimeError) and str(cause).startswith("Failed to ") and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is err:
            raise
        raise cause from None
