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
"""
Maximum-likelihood training of the conditional flow as a MONAI ``SupervisedTrainer``.

The step differs from the supervised one in three ways, so :class:`FlowTrainer` overrides ``_iteration``:

- the loss is the flow's bits/dim of the batch, computed by :class:`FlowBitsPerDim` (a wrapper whose ``forward``
  returns per-sample bits/dim, so that DDP's gradient hooks fire through the wrapper's forward);
- gradients are clipped by norm (``max_grad_norm``);
- a non-finite loss or gradient norm on *any* rank skips the optimizer step on *all* ranks (an all-reduce
  decides); the backward pass always runs on every rank so that DDP never waits for a missing rank.

The bundle's ``train_flow.json`` wires the stage (AdamW, linear warm-up then exponential decay, ActNorm initialisation
once before DDP, validation bits/dim, atomic checkpoints with resume, TensorBoard, sample grids) from the pieces here;
:func:`monai_condflow.engines.flow_trainer.create_flow_trainer` builds the same config from Python.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import optional_import
from torch.utils.data import DataLoader

from monai_condflow.engines.outputs import StepOutput
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
from monai_condflow.metrics.bits_per_dim import bits_per_dim_from_latent
from monai_condflow.networks.blocks.compiled_steps import compiled_steps
from monai_condflow.networks.blocks.coupling import set_coupling_dtype
from monai_condflow.utils.checks import check_flag
from monai_condflow.utils.distributed import (
    all_gather_tensors,
    any_across_ranks,
    get_rank,
    unwrap_model,
)
from monai_condflow.utils.io import STATE_PREFIX
from monai_condflow.utils.precision import check_precision, coupling_dtype, precision_context

Events, _ = optional_import("ignite.engine", name="Events")

__all__ = [
    "FLOW_STATE_PREFIXES",
    "FlowBitsPerDim",
    "FlowDivergedError",
    "FlowTrainer",
    "warmup_exponential_lambda",
    "first_global_batch",
    "initialize_flow",
    "freeze_null_condition",
    "conditions_per_class",
    "lower_is_better",
]

logger = logging.getLogger(__name__)

LEGACY_STATE_PREFIX = "latest"
"""Prefix of the flow's resumable state before the one naming scheme: ``latest_checkpoint_N.pt`` (with
``best_flow_N.pt`` beside it). Still resumed; never written."""
FLOW_STATE_PREFIXES: tuple[str, ...] = (STATE_PREFIX, LEGACY_STATE_PREFIX)
"""The prefixes whose newest valid file a flow run resumes from: ``state_checkpoint_epoch=N.pt`` (written), and an
older run's ``latest_checkpoint_N.pt`` (so a run folder from before the rename resumes; its first new state file
rotates the old ones out)."""


class _FlowLoss(torch.nn.Module):
    """The per-sample loss of :class:`FlowBitsPerDim` (the module whose forward and backward CUDA graphs record;
    it never changes its own ``training`` flag: the regularisers follow ``flow.training``)."""

    def __init__(self, flow: torch.nn.Module, n_bits: int) -> None:
        super().__init__()
        self.flow = flow
        self.n_bits = n_bits

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.flow.training:
            noise_std = float(getattr(self.flow, "noise_std", 0.0))
            if noise_std > 0:
                x = x + noise_std * torch.randn_like(x)
            if condition is not None and hasattr(self.flow, "drop_condition"):
                condition = self.flow.drop_condition(condition)
        if hasattr(self.flow, "bits_per_dim"):
            return self.flow.bits_per_dim(x, condition, n_bits=self.n_bits)
        nu, logdet = self.flow(x, condition)
        return bits_per_dim_from_latent(nu, logdet, x[0].numel(), self.n_bits)


class FlowBitsPerDim(torch.nn.Module):
    """
    ``forward(x, condition) -> [B]`` bits/dim of a conditional flow; the module to wrap in DDP.

    Uses ``flow.bits_per_dim`` when the flow has it, else computes bits/dim from ``flow(x, condition) ->
    (nu, logdet)`` under a standard normal prior. In training mode it also applies the flow's training-time
    regularisers: Gaussian noise augmentation ``x + noise_std * eps`` (the flow's ``noise_std``, in image units;
    the model then learns the smoothed density that its sampler denoises) and condition dropout (the flow's
    ``drop_condition``, for classifier-free guidance). Evaluation mode sees the clean data and the true condition.

    With ``cuda_graphs=True`` a training call on CUDA (autograd on, a condition given) replays the forward and
    backward as CUDA graphs (:class:`~monai_condflow.utils.cuda_graphs.GraphedTraining`), recorded at the first
    such call for its batch shape (and again when the flow's weights move or the numeric settings change); other
    shapes (a smaller last batch), evaluation and the CPU run eagerly. The gradients are the eager ones up to
    floating-point summation order; the random draws differ from an eager run's.

    With ``compile=True`` the flow's steps are compiled for training (``flow.compile_steps()``, regional
    ``torch.compile``; a flow without ``compile_steps`` is refused; a flow whose training pass is already compiled
    keeps its compiler and options); the two combine (the graphs then replay the compiled kernels).

    Args:
        flow: the conditional flow.
        n_bits: bits of the quantised data (8 for PNG-derived images).
        cuda_graphs: record the training step as CUDA graphs (bundle id ``cuda_graphs``).
        compile: train through ``torch.compile``'d flow steps (bundle id ``compile``).

    Raises:
        ValueError: ``cuda_graphs`` or ``compile`` not a bool, or ``compile`` for a flow without ``compile_steps``.
    """

    def __init__(
        self, flow: torch.nn.Module, n_bits: int = 8, cuda_graphs: bool = False, compile: bool = False
    ) -> None:
        super().__init__()
        for key, value in (("cuda_graphs", cuda_graphs), ("compile", compile)):
            check_flag(value, key)
        if compile:
            if not hasattr(flow, "compile_steps"):
                raise ValueError(
                    f"config id 'compile': {type(flow).__name__} has no compile_steps(); only ConditionalGlow's steps "
                    "can be compiled."
                )
            existing = compiled_steps(flow)
            if existing is None or existing.compiled_forward is None:  # a flow compiled for training keeps its own
                flow.compile_steps(sampling=existing is not None and existing.compiled_inverse is not None)
        self.flow = flow
        self.n_bits = n_bits
        self.cuda_graphs = cuda_graphs
        self.compile_flow = compile  # not ``compile``: nn.Module.compile is a method
        # not registered (the state dict keeps only ``flow.*``); shares the flow's parameters
        self.__dict__["_loss"] = _FlowLoss(flow, n_bits)
        self.__dict__["_graphed"] = None

    @property
    def graphed(self) -> Any:
        """The :class:`~monai_condflow.utils.cuda_graphs.GraphedTraining` of this module (``None`` until the first
        training call with ``cuda_graphs``)."""
        return self.__dict__["_graphed"]

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.__dict__["_loss"]
        if self.cuda_graphs and self.training and condition is not None and x.is_cuda and torch.is_grad_enabled():
            if self.graphed is None:
                from monai_condflow.utils.cuda_graphs import GraphedTraining

                settings = getattr(self.flow, "graph_settings", None)  # e.g. the couplings' precision
                self.__dict__["_graphed"] = GraphedTraining(loss, "flow training step", settings)
            return self.graphed(x, condition)
        return loss(x, condition)


def _mean_loss(pred: torch.Tensor, target: Any = None) -> torch.Tensor:
    return pred.mean()


class FlowDivergedError(RuntimeError):
    """Flow training diverged: loss spikes persisted after restoring the last good state."""


class FlowTrainer(SupervisedTrainer):
    """
    ``SupervisedTrainer`` for maximum-likelihood flow training with all-rank non-finite step skipping.

    ``network`` is a :class:`FlowBitsPerDim` (or its DDP wrapper, or any module mapping ``(x, condition)`` to a
    per-sample loss); ``prepare_batch`` must return ``(image, label, (condition,), {})`` as
    :class:`~monai_condflow.engines.prepare_batch.ConditionPrepareBatch` does. The loss is
    ``loss_function(pred, label).mean()`` (the mean bits/dim by default).

    ``engine.state.skipped_steps`` counts skipped steps (saved in the engine's ``state_dict``);
    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (per-sample bits/dim), ``loss``, ``grad_norm``
    and ``skipped``; ``engine.state.lr`` the learning rate of the step. Without DP-SGD the step reads the device once
    (the loss and the gradient norm together, after the backward pass), and from ``MODEL_COMPLETED`` on ``loss`` is
    that host copy (a 0-d CPU tensor), so handlers reading it do not wait for the optimiser step queued behind it.
    The output is a :class:`~monai_condflow.engines.outputs.StepOutput` (read it like a dict): MONAI's handlers and
    its experiment-tracking settings read the loss with ``from_engine(["loss"], first=True)``.

    Args:
        device: device of the run.
        max_epochs: epochs to train.
        train_data_loader: dict batches with ``image`` (and ``condition`` or a classifier in ``prepare_batch``).
        network: see above.
        optimizer: optimizer of the flow's parameters.
        max_grad_norm: clip the total gradient norm to this value; ``None`` only measures it.
        prepare_batch: defaults to ``ConditionPrepareBatch()`` (``condition`` from the batch).
        loss_function: ``(pred, label) -> loss``; defaults to the mean of ``pred``.
        dp_module: for DP-SGD, the flow wrapped by :func:`monai_condflow.privacy.dp.make_private` (``optimizer`` is
            then its ``DPOptimizer``). Each step computes exact per-example gradients of the whole flow
            (:func:`~monai_condflow.privacy.dp.per_sample_gradients`); the optimizer clips each one to its
            ``max_grad_norm``, adds the calibrated noise and steps. ``max_grad_norm`` of this trainer is unused then.
        n_bits: bit depth of the data, added to the DP loss so that the logged loss is in bits/dim.
        spike_threshold: loss-spike guard (bits/dim; ``None``: off). A finite batch loss more than this above the
            running mean of the accepted losses skips the step on every rank (``engine.state.spike_steps``);
            ``spike_patience`` such steps in a row restore the weights and optimiser state of the last epoch that
            ended without a spike and halve the learning rate (``engine.state.spike_restores``); after
            ``max_restores`` restores training stops with :class:`FlowDivergedError` instead of carrying on.
        spike_patience: consecutive spikes that trigger a restore.
        max_restores: restores before the run is declared diverged.
        lr_scheduler: the learning-rate schedule of ``optimizer`` (stepped by a handler, e.g. ``LrScheduleHandler``);
            a spike restore halves its base learning rates too. ``None``: only the optimizer's rates are halved.
        ema: a :class:`~monai_condflow.engines.ema.ModelEMA` of the flow, updated after every step that was not
            skipped (attached here; kept as :attr:`ema`), or ``None``.
        precision: ``"fp32"``, ``"tf32"`` (default) or ``"bf16"`` (bundle id ``precision``; see
            :mod:`monai_condflow.utils.precision`): the TF32 switches are set around each step's forward and
            backward, and ``"bf16"`` puts the trained flow's coupling networks under bfloat16 autocast for the
            whole run (an EMA copy made before the trainer, as the bundle makes it, keeps full precision: validation,
            sample grids and ``model.pt`` through it run in fp32; the saved weights never carry the setting). Only
            GPUs are affected, except ``"bf16"``, which the CPU also honours (slowly).
        kwargs: other ``SupervisedTrainer`` arguments (``train_handlers``, ``epoch_length`` ...). ``amp`` is not
            supported (flows are trained in fp32), ``decollate`` is off, and ``optim_set_to_none`` defaults to
            ``True`` (gradients are set to ``None`` before each step; ``False``, zeroing them in place, is refused
            for a network with ``cuda_graphs``, whose replayed gradients it would double).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        prepare_batch: Callable | None = None,
        loss_function: Callable = _mean_loss,
        dp_module: torch.nn.Module | None = None,
        n_bits: int = 8,
        spike_threshold: float | None = None,
        spike_patience: int = 5,
        max_restores: int = 3,
        lr_scheduler: Any = None,
        ema: Any = None,
        precision: str = "tf32",
        **kwargs: Any,
    ) -> None:
        precision = check_precision(precision)
        if dp_module is not None and precision == "bf16":
            raise ValueError("DP-SGD flow training runs in float32: use precision 'fp32' or 'tf32', not 'bf16'.")
        if dp_module is not None:
            compiler = compiled_steps(dp_module)
            if getattr(unwrap_model(network), "compile_flow", False) is True or (
                compiler is not None and compiler.compiled_forward is not None
            ):
                raise ValueError(
                    "DP-SGD flow training runs eagerly (per-sample gradients): set config id 'compile' false (and do "
                    "not call compile_steps on the flow)."
                )
        if spike_threshold is not None and not spike_threshold > 0:
            raise ValueError(f"spike_threshold must be positive or None, got {spike_threshold}.")
        if spike_patience < 1 or max_restores < 0:
            raise ValueError(f"bad spike guard: spike_patience={spike_patience}, max_restores={max_restores}.")
        if kwargs.pop("amp", False):
            raise ValueError("FlowTrainer does not support amp; flows are trained in fp32.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("FlowTrainer does not support gradient accumulation.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
        kwargs.setdefault("decollate", False)
        # gradients set to None before each step (PyTorch's default; MONAI's is zeroing them in place). With
        # ``cuda_graphs`` it is required: the replayed backward's gradient buffers become the ``.grad`` tensors, so
        # an in-place zeroing would make the next replay's gradient be added to itself (twice the gradient)
        kwargs.setdefault("optim_set_to_none", True)
        if not kwargs["optim_set_to_none"] and getattr(unwrap_model(network), "cuda_graphs", False):
            raise ValueError(
                "optim_set_to_none=False cannot be combined with cuda_graphs: the graph's gradient buffers are the "
                "parameters' .grad, and zeroing them in place doubles the next step's gradient. Leave it True."
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=ConditionPrepareBatch() if prepare_batch is None else prepare_batch,
            **kwargs,
        )
        self.max_grad_norm = max_grad_norm
        self.dp_module = dp_module
        self.n_bits = n_bits
        self.state.skipped_steps = 0
        self.state.spike_steps = 0
        self.state.spike_restores = 0
        self.state.lr = float(optimizer.param_groups[0]["lr"])
        self.state_dict_user_keys.extend(["skipped_steps", "spike_steps", "spike_restores"])
        self.spike_threshold = spike_threshold
        self.spike_patience = int(spike_patience)
        self.max_restores = int(max_restores)
        self.lr_scheduler = lr_scheduler  # its base lrs are halved on a restore
        self.ema = ema
        if ema is not None:
            ema.attach(self)
        self._loss_ref: float | None = None
        self._walked: tuple | None = None
        self.add_event_handler(Events.EPOCH_STARTED, FlowTrainer._forget_walk)
        self._spikes_in_a_row = 0
        self._epoch_had_spike = False
        self._good_state: dict[str, Any] | None = None
        if spike_threshold is not None:
            self.add_event_handler(Events.EPOCH_COMPLETED, FlowTrainer._snapshot_good_state)
        self.resume_completed = False
        self.output_lock: Any = None
        self.precision = precision
        flow = getattr(unwrap_model(network), "flow", None)
        if precision == "bf16" and flow is not None:
            set_coupling_dtype(flow, coupling_dtype(precision))
        if getattr(unwrap_model(network), "cuda_graphs", False) and torch.device(device).type != "cuda":
            logger.warning("cuda_graphs is set but the device is %s: CUDA graphs need a GPU; training eagerly.",
                           device)  # fmt: skip

    def run(self) -> None:  # type: ignore[override]
        """Train; does nothing when the run was resumed from a checkpoint at (or past) ``max_epochs``. Releases the
        output folder's lock (``output_lock``) at the end, also after an error."""
        try:
            if self.resume_completed:
                logger.info("resumed at epoch %d: max_epochs already reached, nothing to train.", self.state.epoch)
                return
            super().run()
        finally:
            if self.output_lock is not None:
                self.output_lock.release()
                self.output_lock = None

    def _iteration(self, engine: FlowTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if self.dp_module is not None and not isinstance(batchdata, Mapping):
            # Opacus' Poisson loader collates an empty draw to a list of empty tensors: a normal (noise-only) step
            return self._dp_iteration(engine, *self._empty_dp_batch())
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        engine.state.output = StepOutput({Keys.IMAGE: inputs, Keys.LABEL: targets})
        engine.state.lr = float(engine.optimizer.param_groups[0]["lr"])
        if self.dp_module is not None:
            condition = args[0] if args else None
            self._dp_shapes = (inputs.shape[1:], None if condition is None else condition.shape[1:])
            return self._dp_iteration(engine, inputs, condition)

        modules, parameters = self._walk(engine.network)
        if not all(m.training for m in modules):
            engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with precision_context(self.precision):
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss = engine.state.output[Keys.LOSS]  # LOSS_COMPLETED handlers may have changed it
            # always backward: with DDP every rank must join the gradient all-reduce, whatever its loss
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        params = [p for p in parameters if p.grad is not None]
        if params:
            max_norm = float("inf") if self.max_grad_norm is None else self.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
        else:
            grad_norm = torch.zeros((), device=loss.device)
        # the one wait for the device in the step: the loss and the gradient norm in one copy (before: four
        # ``.item()`` calls, one of them between the forward and the backward pass)
        both = torch.promote_types(loss.dtype, grad_norm.dtype)  # float64 stays float64
        loss_value, norm_value = torch.stack(
            [loss.detach().reshape(()).to(both), grad_norm.reshape(()).to(loss.device, both)]
        ).tolist()
        loss_finite, grad_finite = math.isfinite(loss_value), math.isfinite(norm_value)
        # later readers of the loss (the stats and TensorBoard handlers, once per iteration) get the host copy
        # instead of waiting for the optimiser step queued behind it
        engine.state.output[Keys.LOSS] = torch.tensor(loss_value, dtype=loss.dtype)
        local_spike = (
            self.spike_threshold is not None
            and loss_finite
            and self._loss_ref is not None
            and loss_value > self._loss_ref + self.spike_threshold
        )
        # one all-reduce for both decisions (a collective per step, not two)
        nonfinite, spike = any_across_ranks([not (loss_finite and grad_finite), local_spike], device=grad_norm.device)
        skip = nonfinite or spike
        if spike:
            self._on_spike(engine, loss_value)
        elif not skip:
            self._spikes_in_a_row = 0
            if loss_finite:
                self._loss_ref = loss_value if self._loss_ref is None else 0.9 * self._loss_ref + 0.1 * loss_value
        if skip and not spike:
            engine.optimizer.zero_grad(set_to_none=True)
            engine.state.skipped_steps += 1
            logger.warning(
                "rank %d: skipped the optimizer step at iteration %d (local loss finite: %s, grad norm finite: %s); "
                "%d step(s) skipped so far.",
                get_rank(),
                engine.state.iteration,
                loss_finite,
                grad_finite,
                engine.state.skipped_steps,
            )
        elif spike:
            engine.optimizer.zero_grad(set_to_none=True)
        else:
            engine.optimizer.step()
        engine.state.output["grad_norm"] = norm_value
        engine.state.output["skipped"] = skip
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _walk(self, network: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
        """``network``'s modules and parameters, collected once per epoch (:meth:`_forget_walk`).

        Walking the ``paper`` flow's ~850 modules costs ~3 ms of host time per ``train()`` and ~2 ms per
        ``parameters()`` on a 2-core machine; a GPU step of tens of ms would wait for it every iteration.
        """
        walked = self._walked
        if walked is None or walked[0] is not network:
            walked = self._walked = (network, list(network.modules()), list(network.parameters()))
        return walked[1], walked[2]

    def _forget_walk(self) -> None:
        self._walked = None

    def _on_spike(self, engine: FlowTrainer, loss_value: float) -> None:
        engine.state.spike_steps += 1
        self._spikes_in_a_row += 1
        self._epoch_had_spike = True
        logger.warning(
            "loss spike at iteration %d: %.3f bits/dim vs a running mean of %.3f (threshold +%.3g): step skipped "
            "(%d in a row).", engine.state.iteration, loss_value, self._loss_ref, self.spike_threshold,
            self._spikes_in_a_row,
        )  # fmt: skip
        if self._spikes_in_a_row < self.spike_patience:
            return
        if self._good_state is None or engine.state.spike_restores >= self.max_restores:
            raise FlowDivergedError(
                f"flow training diverged at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                f"{self._spikes_in_a_row} loss spikes in a row ({loss_value:.3f} bits/dim vs a running mean of "
                f"{self._loss_ref:.3f}) after {engine.state.spike_restores} restore(s) of the last good state. "
                "Lower the learning rate (config id 'lr') or raise 'warmup_epochs', and start again with fresh=true."
            )
        self._restore_good_state(engine)

    @torch.no_grad()
    def _snapshot_good_state(self) -> None:
        """At an epoch end without a spike: keep the weights and optimiser state (on the CPU) to restore."""
        if not self._epoch_had_spike:
            model = unwrap_model(self.network)
            self._good_state = {
                "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            }
        self._epoch_had_spike = False

    def _restore_good_state(self, engine: FlowTrainer) -> None:
        model = unwrap_model(self.network)
        model.load_state_dict(self._good_state["model"])
        self.optimizer.load_state_dict(self._good_state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.base_lrs = [lr * 0.5 for lr in self.lr_scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5
        engine.state.spike_restores += 1
        self._spikes_in_a_row = 0  # the reference loss is kept: a model still diverging keeps spiking against it
        logger.warning(
            "restored the weights and optimiser state of the last good epoch and halved the learning rate "
            "(restore %d of at most %d).", engine.state.spike_restores, self.max_restores,
        )  # fmt: skip

    def _empty_dp_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        shapes = getattr(self, "_dp_shapes", None)
        if shapes is None:
            raise RuntimeError("DP-SGD: the first Poisson batch of the run was empty; use a larger batch size.")
        device = self.state.device
        self.state.output = StepOutput({Keys.IMAGE: None, Keys.LABEL: None})
        inputs = torch.zeros((0, *shapes[0]), device=device)
        return inputs, None if shapes[1] is None else torch.zeros((0, *shapes[1]), device=device)

    def _dp_iteration(self, engine: FlowTrainer, inputs: torch.Tensor, condition: torch.Tensor | None) -> dict:
        """One DP-SGD step: per-example gradients, then the ``DPOptimizer`` clips, adds noise and steps.

        An example whose loss or gradient is not finite contributes a zero gradient and the step still happens
        (clipped, noised and accounted: whether a step happens never depends on the data); an empty Poisson batch is a
        normal noisy step.
        """
        from monai_condflow.privacy.dp import drop_nonfinite_examples, flow_nll, per_sample_gradients

        self.dp_module.train()
        engine.optimizer.zero_grad(set_to_none=True)
        batch = (inputs,) if condition is None else (inputs, condition)
        grads, losses = per_sample_gradients(self.dp_module, flow_nll, *batch)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        dropped = drop_nonfinite_examples(grads, losses)
        if dropped.any():
            logger.warning("DP-SGD: %d example(s) with a non-finite loss or gradient at iteration %d contribute a zero "
                           "gradient; the step is still noised and accounted", int(dropped.sum()),
                           engine.state.iteration)  # fmt: skip
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1) if grads else None
        engine.optimizer.step()
        kept = losses[~dropped.to(losses.device)]
        loss = kept.mean() + self.n_bits if kept.numel() else torch.tensor(float("nan"))
        engine.state.output[Keys.PRED] = losses + self.n_bits
        engine.state.output[Keys.LOSS] = loss
        # the mean per-example gradient norm before clipping
        engine.state.output["grad_norm"] = float(norms.mean().item()) if norms is not None and norms.numel() else 0.0
        engine.state.output["skipped"] = False
        engine.state.output["nonfinite_examples"] = int(dropped.sum())
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def warmup_exponential_lambda(epoch_length: int, warmup_epochs: int, gamma: float) -> Callable[[int], float]:
    """
    Learning-rate factor per iteration for ``LambdaLR``: linear warm-up over ``warmup_epochs`` epochs
    (``(i + 1) / (warmup_epochs * epoch_length)`` at iteration ``i``), then ``gamma ** (epoch - warmup_epochs)``.
    """
    if epoch_length < 1:
        raise ValueError(f"epoch_length must be >= 1, got {epoch_length}.")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
    warmup_iters = warmup_epochs * epoch_length

    def factor(iteration: int) -> float:
        if iteration < warmup_iters:
            return (iteration + 1) / warmup_iters
        return float(gamma ** (iteration // epoch_length - warmup_epochs))

    return factor


def first_global_batch(
    train_loader: DataLoader, prepare_batch: Callable, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The first global batch of ``train_loader``: every rank's first batch, gathered across ranks.

    What the flow's data-dependent initialisation and the sample grids' conditions use, so that one process and N
    processes see the same images. A distributed sampler is set to epoch 1 first (the epoch the trainer starts with).

    Args:
        train_loader: the training loader (dict batches).
        prepare_batch: ``(batchdata, device, non_blocking) -> (image, label, (condition,), kwargs)``, e.g.
            :class:`~monai_condflow.engines.prepare_batch.ConditionPrepareBatch`.
        device: where to put the batch.

    Returns:
        ``(images [B, C, H, W], labels [B] or None, conditions [B, condition_dim] or None)``, ``B`` summed over ranks.
    """
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(1)  # the epoch the trainer starts with (MONAI workflows count epochs from 1)
    batchdata = next(iter(train_loader))
    images, labels, args, _ = prepare_batch(batchdata, torch.device(device), False)
    condition = args[0] if args else None
    images = all_gather_tensors(images)
    labels = all_gather_tensors(labels) if labels is not None else None
    condition = all_gather_tensors(condition) if condition is not None else None
    return images, labels, condition


def initialize_flow(
    flow: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
    skip: bool = False,
) -> torch.nn.Module:
    """The flow's data-dependent (ActNorm) initialisation on ``batch``, once, before any DDP wrapping.

    Does nothing when the flow is already initialised (a pretrained or reloaded flow), when ``skip`` is set (e.g. a
    run that resumes from a checkpoint, which brings its own initialised weights) or when ``batch`` is ``None``.

    Args:
        flow: a flow with ``initialize(x, condition)`` and ``is_initialized`` (``ConditionalGlow``).
        batch: ``(images [B, C, H, W], labels, conditions [B, condition_dim])``, see :func:`first_global_batch`.
        skip: leave the flow as it is.

    Returns:
        ``flow`` (initialised in place).
    """
    if skip or batch is None or getattr(flow, "is_initialized", True):
        return flow
    flow.initialize(batch[0], batch[2])
    logger.info("initialised the flow's ActNorm layers on a batch of %d images.", batch[0].shape[0])
    return flow


def freeze_null_condition(flow: torch.nn.Module) -> torch.nn.Module:
    """Freeze the flow's learned null condition (``null_condition``), if it has one, for DP-SGD.

    The DP step trains the plain likelihood (no condition dropout, no training noise); the null condition, which
    only condition dropout trains, stays frozen so that the accounting covers exactly what is trained.

    Returns:
        ``flow``.
    """
    null = getattr(flow, "null_condition", None)
    if isinstance(null, torch.nn.Parameter):
        null.requires_grad_(False)
    return flow


def conditions_per_class(
    labels: torch.Tensor | None, condition: torch.Tensor | None, per_class: int = 4
) -> dict[int, torch.Tensor]:
    """Up to ``per_class`` conditions of each class present in ``labels``: what the sample grids are drawn for.

    Args:
        labels: ``[B]`` class labels, or ``None``.
        condition: ``[B, condition_dim]`` conditions, or ``None``.
        per_class: rows per class.

    Returns:
        class -> ``[n, condition_dim]`` (on the CPU); empty when labels or conditions are missing.
    """
    if labels is None or condition is None:
        return {}
    out = {}
    for c in sorted({int(v) for v in labels.reshape(-1).tolist()}):
        out[c] = condition[labels.reshape(-1) == c][:per_class].detach().cpu()
    return out


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of an evaluator whose key metric improves downwards (bits/dim)."""
    return current < best
