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
Adversarial fine-tuning of a likelihood-trained conditional flow (a hybrid "Flow-GAN" phase of the flow stage).

At the main job's budget the maximum-likelihood Glow samples pixel grain without the anatomy or the findings
(docs/results.md, "Fidelity ablations"). After the likelihood epochs, :class:`AdversarialFlowTrainer` trains the same
flow for a fixed number of steps on

    ``bits/dim(x | z) + adversarial_weight * -D(x_fake, z) + range_weight * excess(x_fake)
    (+ consistency_weight * (1 - cos(embed(x_fake), z)))``

where ``x_fake = flow.inverse(T * eps, z)`` is decoded *with gradients* through the exact inverse at the sampling
temperature ``T``, ``D`` is a :class:`~monai_condflow.networks.nets.ProjectionDiscriminator` trained with the hinge
loss on real ``(x, z)`` pairs against ``(x_fake, z)`` (both randomly translated by a few pixels, the
differentiable augmentation of limited-data GANs), and ``excess`` is the squared distance of every decoded pixel
beyond ``[0, 1]`` (so overflowing samples are pulled back rather than clamped). The likelihood term keeps the flow a
density with an exact inverse; the samples move towards what the discriminator cannot tell from the data.

Under ``torch.distributed`` every rank runs the phase on its shard and the gradients of the flow and of the
discriminator are averaged over the ranks before each step (no DDP wrapper: the flow is called through both its
forward and its inverse), so all ranks keep identical weights. Under DP-SGD (``train_flow_dp.json``) the phase is
switched off: its discriminator would read the private images without the DP noise.

:func:`run_adversarial_phase` is the bundle step (``train_flow.json``, ids ``adversarial_*``): it fine-tunes from the
likelihood-selected weights (kept as ``flow/model_likelihood.pt``), writes the EMA of the fine-tuned weights to
``flow/model.pt`` atomically and records the phase in ``flow/flow.json``. A run killed during the phase redoes the
phase from ``model_likelihood.pt`` when it is run again. Its step losses go to the flow's TensorBoard folder as
``adversarial/*`` (:data:`TENSORBOARD_SCALARS`, every ``log_every``-th step and the last; docs/tensorboard.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from torch.utils.data import DataLoader

from monai_condflow.engines.ema import ModelEMA
from monai_condflow.engines.flow import FlowBitsPerDim
from monai_condflow.engines.outputs import StepOutput
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
from monai_condflow.networks.nets.conditional_glow import SAMPLE_RANGE
from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.distributed import barrier, get_rank, get_world_size, unwrap_model
from monai_condflow.utils.io import MODEL_FILE, atomic_torch_save, atomic_write_text

__all__ = [
    "LIKELIHOOD_MODEL_FILE",
    "AdversarialFlowTrainer",
    "average_gradients",
    "check_adversarial",
    "frozen_parameters",
    "hinge_discriminator_loss",
    "random_translate",
    "range_excess",
    "run_adversarial_phase",
    "SPECTRUM_EPS",
    "power_spectrum",
    "log_power_spectrum",
    "spectral_distance",
    "TENSORBOARD_SCALARS",
    "tensorboard_scalars",
    "every_and_last_step",
]

logger = logging.getLogger(__name__)

LIKELIHOOD_MODEL_FILE = "model_likelihood.pt"
"""The likelihood-selected weights the adversarial phase starts from (kept beside ``model.pt``)."""

TENSORBOARD_SCALARS = {
    "adversarial/bpd": "loss",
    "adversarial/d_loss": "d_loss",
    "adversarial/g_adversarial": "g_adversarial",
    "adversarial/consistency": "consistency",
    "adversarial/excess": "excess",
}
"""TensorBoard tag -> key of the phase's step output (:class:`AdversarialFlowTrainer`) that the bundle logs."""


_LAST_KEYS = ("loss", "d_loss", "g_adversarial", "consistency", "excess")


def tensorboard_scalars(output: Mapping[str, Any]) -> dict[str, float]:
    """The losses of a phase step as TensorBoard scalars (:data:`TENSORBOARD_SCALARS`), for the ``output_transform``
    of MONAI's ``TensorBoardStatsHandler``: values the step already computed, only read.

    Args:
        output: the step output (``loss``, ``d_loss``, ``g_adversarial``, ``consistency``, ``excess``).
    """
    return {tag: float(output[key]) for tag, key in TENSORBOARD_SCALARS.items()}


def every_and_last_step(every: int) -> Callable[[Any, int], bool]:
    """An ``iteration_log`` filter of MONAI's stats handlers: every ``every``-th iteration and the engine's last one
    (so a phase shorter than ``every`` steps still logs)."""

    def _filter(engine: Any, iteration: int) -> bool:
        return iteration % every == 0 or iteration == engine.state.epoch_length * engine.state.max_epochs

    return _filter


def random_translate(x: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate every image by its own random integer offset of up to ``shift`` pixels per axis (edges
    replicated); differentiable in ``x``.

    Args:
        x: ``[B, C, *spatial]`` (2 or 3 spatial dims).
        shift: largest offset (0: ``x`` unchanged).
        generator: CPU generator of the offsets.
    """
    if shift <= 0:
        return x
    spatial = x.shape[2:]
    padded = F.pad(x, (shift,) * (2 * len(spatial)), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (x.shape[0], len(spatial)), generator=generator).tolist()
    return torch.stack(
        [padded[(i, slice(None), *(slice(o, o + s) for o, s in zip(off, spatial)))] for i, off in enumerate(offsets)]
    )


SPECTRUM_EPS = 1e-6
"""Added to the power before the log of :func:`log_power_spectrum` (a bin without power gives ``log(eps)``)."""


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``mean_b |FFT2(x_b - mean(x_b))|^2`` of a batch ``[B, C, H, W]`` (orthonormal 2-D real FFT, each image's mean
    removed): ``[C, H, W // 2 + 1]``, the batch's average power per spatial frequency."""
    return torch.fft.rfft2(x - x.mean(dim=(-2, -1), keepdim=True), norm="ortho").abs().square().mean(0)


def log_power_spectrum(x: torch.Tensor, eps: float = SPECTRUM_EPS) -> torch.Tensor:
    """``log(power_spectrum(x) + eps)``: ``[C, H, W // 2 + 1]``."""
    return torch.log(power_spectrum(x) + eps)


def spectral_distance(fake: torch.Tensor, real_log_power: torch.Tensor, eps: float = SPECTRUM_EPS) -> torch.Tensor:
    """Mean squared difference between the log power spectrum of ``fake`` (:func:`log_power_spectrum`) and a
    reference ``real_log_power`` (``[C, H, W // 2 + 1]``): large when the samples carry a periodic pattern (a
    lattice at the squeeze period) or lack frequencies the real images have. A scalar with gradients to ``fake``."""
    return (log_power_spectrum(fake, eps) - real_log_power).square().mean()


def range_excess(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Per-image sum of the squared distances of the pixels beyond ``[low, high]``: ``[B]`` (0 for an image inside)."""
    return (F.relu(x - high) + F.relu(low - x)).pow(2).flatten(1).sum(1)


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block ``module``'s trainable parameters do not require gradients; afterwards (also on an error)
    exactly those are trainable again. A backward pass through ``module`` then computes the gradients of its inputs
    only: the flow's adversarial pass through the critic needs ``dD/dx``, not the critic's weight gradients."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def hinge_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` (2 at chance, 0 when every margin holds)."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of ``module``'s parameters over the ranks of the default process group (one
    all-reduce of the flattened gradients; nothing outside ``torch.distributed`` or with one rank)."""
    world = get_world_size()
    if world < 2:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def check_adversarial(
    steps: Any, adversarial_weight: Any, consistency_weight: Any, range_weight: Any, temperature: Any, lr: Any,
    discriminator_lr: Any, shift: Any, sampling_prior_shrinkage: Any = None, batch_size: Any = 1,
    high_pass: Any = False, likelihood_every: Any = 1, spectral_weight: Any = 0.0,
) -> bool:  # fmt: skip
    """Validate the ``adversarial_*`` ids of ``train_flow.json``; raises ``ConfigValueError`` naming the key.

    The phase cannot be combined with a fitted sampling prior (``sampling_prior_shrinkage``: the prior is fitted to
    the likelihood-selected weights, which the phase then changes)."""

    def bad(key: str, value: Any, want: str) -> ConfigValueError:
        return ConfigValueError(f"train_flow.json: '{key}' must be {want}, got {value!r}.")

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise bad("adversarial_steps", steps, "an integer >= 0 (0: no adversarial fine-tuning)")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise bad("adversarial_shift", shift, "an integer >= 0")
    if not isinstance(high_pass, bool):
        raise bad("discriminator_high_pass", high_pass, "true or false")
    if isinstance(likelihood_every, bool) or not isinstance(likelihood_every, int) or likelihood_every < 1:
        raise bad("adversarial_likelihood_every", likelihood_every, "an integer >= 1 (1: every step)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise bad("adversarial_batch_size", batch_size, "an integer >= 1 (images decoded and read per step)")
    for key, value in (("adversarial_weight", adversarial_weight), ("consistency_weight", consistency_weight),
                       ("range_weight", range_weight), ("spectral_weight", spectral_weight)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise bad(key, value, "a finite number >= 0")
    for key, value in (("adversarial_temperature", temperature), ("adversarial_lr", lr),
                       ("discriminator_lr", discriminator_lr)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise bad(key, value, "a finite number > 0")
    if steps > 0 and sampling_prior_shrinkage is not None:
        raise ConfigValueError(
            "train_flow.json: 'sampling_prior_shrinkage' needs 'adversarial_steps' 0 (the fitted prior belongs to the "
            f"likelihood-trained weights that the adversarial phase changes); got adversarial_steps={steps}."
        )
    return True


class AdversarialFlowTrainer(Trainer):
    """
    MONAI ``Trainer`` of the hybrid likelihood + adversarial phase (see the module docstring): one epoch of ``steps``
    iterations over ``train_data_loader`` (restarted when it runs out).

    ``engine.state.output`` (a :class:`~monai_condflow.engines.outputs.StepOutput`) holds ``loss`` (the batch's mean
    bits/dim, what MONAI's stats handlers log), ``d_loss``, ``g_adversarial``, ``consistency``, ``excess`` (mean
    per image), ``grad_norm`` and ``skipped``; ``engine.state.skipped_steps`` counts flow steps skipped for a
    non-finite gradient (the same decision on every rank, as the gradients are averaged first).

    Args:
        device: device of the run.
        steps: iterations of the phase (> 0).
        train_data_loader: dict batches with ``image`` (and ``condition`` or a classifier in ``prepare_batch``).
        flow: the conditional flow (not a DDP wrapper), in training mode during the phase.
        discriminator: ``D(x, z) -> [B]`` logits.
        optimizer: optimiser of the flow's parameters.
        d_optimizer: optimiser of the discriminator's parameters.
        prepare_batch: returns ``(image, label, (condition,), {})``; default ``ConditionPrepareBatch()``.
        n_bits: bit depth of the data (the likelihood term's bits/dim).
        adversarial_weight: weight of the flow's adversarial loss ``-mean(D(x_fake, z))``.
        consistency_weight: weight of ``1 - cos(classifier.embed(x_fake), z)``; needs ``classifier`` (or the
            classifier of ``prepare_batch``) when > 0. It steers the samples along the conditioning classifier's
            gradients, which a judge of the same architecture shares: measured, it lifts a PEPXNet judge's class
            agreement and not a plain CNN's (docs/results.md, twelfth session), so 0 by default.
        range_weight: weight of :func:`range_excess` of the decoded samples (10 leaves no sample overflowed at T = 0.9
            over three flow seeds but narrows the modes: docs/results.md, twentieth session).
        temperature: temperature of the decoded latents.
        shift: largest random translation of real and fake images before the discriminator.
        max_grad_norm: clip the flow's gradient norm (``None``: no clipping).
        classifier: frozen network with ``embed``; default: ``prepare_batch.classifier``.
        ema: EMA of the flow updated after every flow step that was not skipped.
        seed: seed of the phase's own CPU generator (latents and translations; the rank is added).
        likelihood_batch_size: images of each (per-rank) batch in the likelihood term (the first ones; ``None``: all).
            The adversarial terms still read the whole batch; a smaller likelihood batch makes a step cheaper.
        spectral_weight: weight of :func:`spectral_distance` between the decoded samples and a running average
            (decay ``spectral_decay``) of the real batches' power spectra (0: not computed).
        spectral_decay: decay of that running average.
        likelihood_every: compute the likelihood term on every ``k``-th step only (steps 1, 1 + k, ...), weighted by
            ``k`` so that its time average is unchanged; the steps between skip the likelihood's forward and
            backward pass (measured: 0.39 s instead of 0.46 s a step at batch 16 on 2 CPU threads with k = 2).
            ``output["loss"]`` repeats the last computed bits/dim on the skipped steps.
        kwargs: other ``Trainer`` arguments (``handlers`` ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        steps: int,
        train_data_loader: DataLoader,
        flow: torch.nn.Module,
        discriminator: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        prepare_batch: Callable | None = None,
        n_bits: int = 8,
        adversarial_weight: float = 1.0,
        consistency_weight: float = 0.0,
        range_weight: float = 0.5,
        temperature: float = 0.9,
        shift: int = 3,
        max_grad_norm: float | None = 50.0,
        classifier: torch.nn.Module | None = None,
        ema: ModelEMA | None = None,
        seed: int = 0,
        likelihood_batch_size: int | None = None,
        likelihood_every: int = 1,
        spectral_weight: float = 0.0,
        spectral_decay: float = 0.9,
        **kwargs: Any,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"AdversarialFlowTrainer needs steps >= 1, got {steps!r}.")
        prepare_batch = ConditionPrepareBatch() if prepare_batch is None else prepare_batch
        kwargs.setdefault("decollate", False)
        super().__init__(
            device=device, max_epochs=1, data_loader=train_data_loader, epoch_length=steps,
            prepare_batch=prepare_batch, **kwargs,
        )  # fmt: skip
        self.flow = unwrap_model(flow)
        self.nll = FlowBitsPerDim(self.flow, n_bits=n_bits)
        self.discriminator = discriminator
        self.optimizer = optimizer
        self.d_optimizer = d_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.consistency_weight = float(consistency_weight)
        self.range_weight = float(range_weight)
        self.temperature = float(temperature)
        self.shift = int(shift)
        self.max_grad_norm = max_grad_norm
        self.classifier = classifier if classifier is not None else getattr(prepare_batch, "classifier", None)
        if self.consistency_weight > 0 and self.classifier is None:
            raise ValueError("consistency_weight > 0 needs a classifier with embed() (or one in prepare_batch).")
        lik = likelihood_batch_size
        if lik is not None and (isinstance(lik, bool) or not isinstance(lik, int) or lik < 1):
            raise ValueError(f"likelihood_batch_size must be None or an integer >= 1, got {lik!r}.")
        self.likelihood_batch_size = likelihood_batch_size
        if isinstance(likelihood_every, bool) or not isinstance(likelihood_every, int) or likelihood_every < 1:
            raise ValueError(f"likelihood_every must be an integer >= 1, got {likelihood_every!r}.")
        self.likelihood_every = likelihood_every
        if not 0.0 <= float(spectral_decay) < 1.0:
            raise ValueError(f"spectral_decay must be in [0, 1), got {spectral_decay!r}.")
        if float(spectral_weight) < 0:
            raise ValueError(f"spectral_weight must be >= 0, got {spectral_weight!r}.")
        self.spectral_weight = float(spectral_weight)
        self.spectral_decay = float(spectral_decay)
        self._real_power: torch.Tensor | None = None
        self._last_bpd = float("nan")
        self.ema = ema
        self.generator = torch.Generator().manual_seed(int(seed) + 1000 * get_rank())
        self.state.skipped_steps = 0
        self.state_dict_user_keys.append("skipped_steps")

    def _iteration(self, engine: AdversarialFlowTrainer, batchdata: dict[str, torch.Tensor]) -> StepOutput:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x, _, args, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        z = args[0]
        flow, disc, gen = engine.flow, engine.discriminator, engine.generator
        cond = z if getattr(flow, "condition_dim", 1) else None  # an unconditional flow (e.g. a background flow)
        flow.train()
        disc.train()
        nu = torch.randn(x.shape[0], flow.latent_dim(x.shape[2:]), generator=gen).to(x.device) * engine.temperature
        fake, _ = flow.inverse(nu, cond, x.shape[2:])
        excess = range_excess(fake).mean()
        fake = fake.clamp(*SAMPLE_RANGE)  # the excess term pulls overflow back; no inf reaches the discriminator
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # discriminator step (hinge loss), gradients averaged over the ranks
        d_loss = hinge_discriminator_loss(
            disc(random_translate(x, engine.shift, gen), cond),
            disc(random_translate(fake.detach(), engine.shift, gen), cond),
        )
        engine.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        average_gradients(disc)
        engine.d_optimizer.step()
        # flow step: likelihood + adversarial + range (+ consistency)
        every = engine.likelihood_every
        bpd = None
        if (engine.state.iteration - 1) % every == 0:  # the same decision on every rank
            k = x.shape[0] if engine.likelihood_batch_size is None else min(engine.likelihood_batch_size, x.shape[0])
            bpd = engine.nll(x[:k], None if cond is None else cond[:k]).mean()
            engine._last_bpd = float(bpd.detach())
        # the flow's step needs dD/dx only: the critic's weight gradients are neither computed nor accumulated (the
        # flow's gradient is unchanged; benchmarks/bench_channels_last.py)
        with frozen_parameters(disc):
            g_adv = -disc(random_translate(fake, engine.shift, gen), cond).mean()
            adv = engine.adversarial_weight * g_adv
            loss = (adv if bpd is None else every * bpd + adv) + engine.range_weight * excess
            spectral = None
            if engine.spectral_weight > 0:
                with torch.no_grad():  # running average of the real batches' spectra (the first batch starts it)
                    power = power_spectrum(x)
                    previous, decay = engine._real_power, engine.spectral_decay
                    engine._real_power = power if previous is None else decay * previous + (1 - decay) * power
                spectral = spectral_distance(fake, torch.log(engine._real_power + SPECTRUM_EPS))
                loss = loss + engine.spectral_weight * spectral
            consistency = torch.zeros((), device=x.device)
            if engine.consistency_weight > 0 and cond is not None:
                consistency = 1 - F.cosine_similarity(engine.classifier.embed(fake.clamp(0, 1)), z, dim=1).mean()
                loss = loss + engine.consistency_weight * consistency
            engine.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        average_gradients(flow)
        params = [p for p in flow.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, engine.max_grad_norm if engine.max_grad_norm else float("inf"))
        skipped = not bool(torch.isfinite(norm))
        if skipped:
            engine.state.skipped_steps += 1
            engine.optimizer.zero_grad(set_to_none=True)
        else:
            engine.optimizer.step()
            if engine.ema is not None:
                engine.ema.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return StepOutput({
            "loss": engine._last_bpd, "d_loss": float(d_loss.detach()), "g_adversarial": float(g_adv.detach()),
            "consistency": float(consistency.detach()), "excess": float(excess.detach()), "grad_norm": float(norm),
            "spectral": 0.0 if spectral is None else float(spectral.detach()), "skipped": skipped,
        })  # fmt: skip


def run_adversarial_phase(
    flow_dir: str | Path, trainer: AdversarialFlowTrainer | None, ema_decay: float = 0.99, write: bool | None = None
) -> dict[str, Any] | None:
    """The bundle step after the likelihood epochs: fine-tune from the likelihood-selected weights and settle
    ``model.pt`` (the EMA of the fine-tuned weights) and ``flow.json``.

    The selected ``flow_dir/model.pt`` is first kept as :data:`LIKELIHOOD_MODEL_FILE` (when that file exists, from a
    run killed during the phase, the phase starts from it again). Rank 0 writes ``model.pt`` atomically, then
    ``flow.json`` (``adversarial``: the phase's settings, time and last losses; ``selected`` gains
    ``" + adversarial fine-tuning (N steps)"``).

    Args:
        flow_dir: the flow stage's folder (``model.pt`` and ``flow.json`` written by the likelihood epochs).
        trainer: the phase's trainer, or ``None`` (``adversarial_steps`` 0): nothing is done.
        ema_decay: decay of the EMA whose weights are saved (0: the last weights).
        write: write the files (default: rank 0 only).

    Returns:
        The record written under ``flow.json["adversarial"]``, or ``None`` when nothing was done.
    """
    if trainer is None:
        return None
    from monai_condflow.handlers.checkpoint import load_checkpoint

    folder = Path(flow_dir)
    write = get_rank() == 0 if write is None else write
    base = folder / LIKELIHOOD_MODEL_FILE
    if write and not base.is_file():
        atomic_torch_save(load_checkpoint(folder / MODEL_FILE), base)
    barrier()  # every rank reads the same starting weights (rank 0 settled model.pt before this step)
    flow = trainer.flow
    flow.load_state_dict(load_checkpoint(base)["network"])
    ema = ModelEMA(flow, decay=ema_decay) if ema_decay else None
    trainer.ema = ema
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    out = trainer.state.output or {}
    record = {
        "steps": int(trainer.state.iteration),
        "adversarial_weight": trainer.adversarial_weight,
        "consistency_weight": trainer.consistency_weight,
        "range_weight": trainer.range_weight,
        "temperature": trainer.temperature,
        "shift": trainer.shift,
        "likelihood_every": trainer.likelihood_every,
        "spectral_weight": trainer.spectral_weight,
        "ema_decay": float(ema_decay),
        "skipped_steps": int(trainer.state.skipped_steps),
        "seconds": round(seconds, 1),
        "last": {k: out[k] for k in _LAST_KEYS + ("spectral",) * (trainer.spectral_weight > 0) if k in out},
    }
    logger.info("flow stage: adversarial fine-tuning, %d steps in %.0f s (last: %s)", record["steps"], seconds,
                record["last"])  # fmt: skip
    if write:
        final = (ema.module if ema is not None else flow).state_dict()
        atomic_torch_save({"network": final}, folder / MODEL_FILE)
        info_file = folder / "flow.json"
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        selected = str(info.get("selected", "likelihood epochs")).split(" + adversarial")[0]
        info.update(adversarial=record, selected=f"{selected} + adversarial fine-tuning ({record['steps']} steps)")
        atomic_write_text(info_file, json.dumps(info, indent=2) + "\n")
    barrier()
    return record
