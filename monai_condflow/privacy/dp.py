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
"""DP-SGD with Opacus for the classifier and the conditional flow.

:func:`make_private` wraps a module, its optimiser and its data loader with
:meth:`opacus.PrivacyEngine.make_private_with_epsilon`: the noise multiplier follows from
``(target_epsilon, target_delta, epochs)``, the loader samples Poisson batches, and every step clips each example's
gradient to ``max_grad_norm`` and adds Gaussian noise. ``privacy_engine.get_epsilon(delta)`` (or :func:`dp_summary`)
reports the epsilon spent so far.

Per-sample gradients:

* **Ordinary networks** (e.g. ``PEPXNet(norm="group")``): Opacus' ``grad_sample_mode="functorch"`` (per-layer
  hooks; ``torch.func`` for layers without a hand-written sampler). BatchNorm mixes examples and is refused: build the
  classifier with ``norm="group"`` or call :func:`prepare_module` (``ModuleValidator.fix``) *before* creating the
  optimiser.
* **Flows** (:class:`~monai_condflow.networks.nets.ConditionalGlow`): Opacus' per-layer modes cannot be used. Its
  functorch mode rejects layers with buffers (ActNorm's ``initialized`` flag, the 1x1 convolution's permutation and
  sign) and, per layer, back-propagates only the gradient of the *first* output, while every flow layer returns
  ``(y, logdet)``: the log-determinant term of ActNorm and of the LU 1x1 convolution would be silently dropped.
  :func:`make_private` therefore wraps flows in ``grad_sample_mode="no_op"`` and :func:`per_sample_gradients`
  computes exact per-sample gradients of the whole model, each example as a batch of one, for every trainable
  parameter (ActNorm, LU 1x1 conv, couplings, priors): with ``torch.func`` (``vmap(grad(functional_call))``) when
  every operation of the model supports ``vmap``, else with a per-example loop of ``torch.autograd.grad``.
  :func:`dp_flow_step` is one private step.

ActNorm's data-dependent initialisation would read private data outside the DP mechanism, so it is replaced by the
identity initialisation: :func:`make_private` calls ``flow.mark_initialized()`` on an uninitialised flow and refuses
one that is already initialised unless ``public_init=True`` says its current parameters come from public data only.

What the guarantee covers: every trainable parameter of the wrapped module (:func:`dp_summary` lists them). It does
*not* cover the frozen classifier that computes the condition ``z``: that classifier must itself be trained with
DP-SGD (on the same private data, and the two epsilons add up under basic composition) or on public data. Nor does
it cover anything released outside the trained weights, e.g. synthetic images generated from the ``z`` of real
training images (see ``docs/privacy.md``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from monai_condflow.networks.blocks.flow_sequential import FlowLayer
from monai_condflow.networks.blocks.squeeze import contiguous_layout

__all__ = [
    "FLOW_GRAD_SAMPLE_MODE",
    "NOISE_SOURCES",
    "check_dp_settings",
    "os_entropy_generator",
    "drop_nonfinite_examples",
    "projected_epsilon",
    "check_resume_budget",
    "log_unused_unlabelled",
    "is_flow",
    "prepare_module",
    "make_private",
    "per_sample_gradients",
    "flow_nll",
    "dp_flow_step",
    "covered_parameters",
    "coverage_note",
    "dp_summary",
    "DPPlan",
]

logger = logging.getLogger(__name__)

FLOW_GRAD_SAMPLE_MODE = "no_op"  # Opacus wrapper mode for flows: per-sample gradients come from per_sample_gradients


NOISE_SOURCES = {
    "os_entropy": "torch.Generator seeded from the operating system's entropy (secrets), drawn anew at every start "
    "and never saved: the noise does not depend on the public seed",
    "secure_mode": "Opacus secure_mode (torchcsprng, /dev/urandom)",
    "caller_generator": "a torch.Generator given by the caller: whoever knows its seed can replay the noise",
}
"""Where the DP-SGD noise (and the Poisson sampling) comes from, as :func:`dp_summary` records it."""

_DP_KEYS = ("target_epsilon", "target_delta", "max_grad_norm", "accountant")


def check_dp_settings(dp: Any) -> dict[str, Any]:
    """Validate the ``dp`` settings of a trainer (bundle ids ``target_epsilon``, ``target_delta``, ...).

    Returns:
        ``{"target_epsilon", "target_delta", "max_grad_norm" (default 1.0), "accountant" (default "prv")}``.

    Raises:
        ValueError: a missing or unknown key, or a value out of range; the message names the key.
    """
    if not hasattr(dp, "items"):
        raise ValueError(f"dp settings must be a mapping with target_epsilon and target_delta, got {dp!r}.")
    unknown = sorted(set(dp) - set(_DP_KEYS))
    if unknown:
        raise ValueError(f"unknown DP setting(s) {unknown}; expected keys: {', '.join(_DP_KEYS)}.")
    out = {"max_grad_norm": 1.0, "accountant": "prv", **dict(dp)}
    for key in ("target_epsilon", "target_delta", "max_grad_norm"):
        value = out.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"DP setting '{key}' must be a finite number > 0, got {value!r}.")
        out[key] = float(value)
    if out["target_delta"] >= 1:
        raise ValueError(f"DP setting 'target_delta' must be < 1, got {out['target_delta']}.")
    if out["accountant"] not in ("prv", "rdp", "gdp"):
        raise ValueError(f"DP setting 'accountant' must be 'prv', 'rdp' or 'gdp', got {out['accountant']!r}.")
    return out


def log_unused_unlabelled(unlabelled: Any, num_labels: Any = None) -> int:
    """Log how many unlabelled training images a DP-SGD classifier run leaves out; returns that number.

    DP-SGD trains the classifier on the labelled images only: presumptive labels from label propagation are
    computed from the class centroids of the labelled private images outside the DP mechanism, so a
    semi-supervised run would have no finite guarantee (``run_semisupervised`` refuses an Opacus-wrapped network).
    """
    n = len(unlabelled) if unlabelled is not None else 0
    if n:
        logger.info("DP-SGD classifier: %d unlabelled images are not used (num_labels=%s)", n, num_labels)
    return n


def os_entropy_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 64 bits from the operating system (:mod:`secrets`).

    Its seed is not derived from the run's seed, not logged and not saved in checkpoints, so neither the noise it
    draws nor the Poisson batches can be replayed from anything the run writes.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


def _unwrap(module: nn.Module) -> nn.Module:
    return module._module if isinstance(module, AbstractGradSampleModule) else module


def is_flow(module: nn.Module) -> bool:
    """Whether ``module`` (or the module an Opacus wrapper holds) contains flow layers (``(y, logdet)`` outputs)."""
    return any(isinstance(m, FlowLayer) for m in _unwrap(module).modules())


def prepare_module(module: nn.Module) -> nn.Module:
    """Make a module DP-SGD compatible before its optimiser is created.

    BatchNorm layers are replaced by GroupNorm with Opacus' ``ModuleValidator.fix`` (a new module is returned when
    anything changed; the old parameters are not reused by the fix, so build the optimiser afterwards).

    Args:
        module: the network to train privately.

    Returns:
        the module to train (the same object when nothing needed fixing).
    """
    if is_flow(module):
        return module
    if ModuleValidator.validate(module, strict=False):
        logger.info("DP-SGD: replacing layers Opacus cannot train privately (BatchNorm -> GroupNorm)")
        module = ModuleValidator.fix(module)
    return module


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    target_epsilon: float,
    target_delta: float,
    epochs: int,
    max_grad_norm: float,
    grad_sample_mode: str = "auto",
    accountant: str = "prv",
    poisson_sampling: bool = True,
    public_init: bool = False,
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Wrap a module, optimiser and loader for DP-SGD at a target ``(epsilon, delta)`` over ``epochs`` epochs.

    Args:
        module: the network; parameters with ``requires_grad`` are trained and covered. For a flow an uninitialised
            model gets the identity ActNorm initialisation (``mark_initialized``, no data touched).
        optimizer: optimiser over ``module``'s parameters (created after :func:`prepare_module`).
        data_loader: loader of the private training set (its batch size sets the expected Poisson batch size).
        target_epsilon: epsilon to reach after ``epochs`` epochs (> 0).
        target_delta: delta (in ``(0, 1)``, e.g. below ``1 / len(dataset)``).
        epochs: planned number of epochs (the noise multiplier is computed for that many).
        max_grad_norm: per-example gradient clipping norm (flat clipping over all parameters).
        grad_sample_mode: ``"auto"`` (``"no_op"`` + :func:`per_sample_gradients` for flows, ``"functorch"`` otherwise)
            or an Opacus mode for non-flow modules.
        accountant: Opacus accountant, ``"prv"`` (default), ``"rdp"`` or ``"gdp"``.
        poisson_sampling: Poisson batches (required by the accounting; keep ``True``).
        public_init: for a flow that is already initialised: its current parameters (a data-dependent ActNorm
            initialisation or a checkpoint) come from public data only.
        noise_generator: generator for the noise. ``None`` (default): a generator seeded from the operating
            system's entropy (:func:`os_entropy_generator`), which also draws the Poisson batches, so the noise does
            not follow the public ``seed`` of the run. A generator given here (e.g. for a reproducible test) makes the
            noise replayable by whoever knows its seed.
        secure_mode: Opacus' cryptographically secure noise and sampling (needs ``torchcsprng``).

    Returns:
        ``(module, optimizer, data_loader, privacy_engine)``: the Opacus-wrapped module (train it through this
        object), the ``DPOptimizer``, the Poisson ``DPDataLoader`` and the engine (``get_epsilon(delta)``); the
        engine's ``noise_source`` (a key of :data:`NOISE_SOURCES`) says where the noise comes from.

    Raises:
        ValueError: invalid targets, a module with BatchNorm (call :func:`prepare_module` first), Opacus' layer-wise
            modes on a flow, or an already initialised flow without ``public_init``.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}.")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}.")
    if epochs < 1 or not max_grad_norm > 0:
        raise ValueError(f"epochs must be >= 1 and max_grad_norm > 0, got {epochs} and {max_grad_norm}.")
    n_data = len(data_loader.dataset)  # type: ignore[arg-type]
    if target_delta >= 1.0 / max(n_data, 1):
        logger.warning("DP-SGD: delta %.3g is not below 1 / N = %.3g (N = %d)", target_delta, 1 / n_data, n_data)
    flow = is_flow(module)
    if flow:
        if grad_sample_mode not in ("auto", FLOW_GRAD_SAMPLE_MODE):
            raise ValueError(
                f"grad_sample_mode={grad_sample_mode!r} cannot compute per-sample gradients of a flow: Opacus' "
                "layer-wise modes reject layers with buffers and drop the log-determinant output's gradient. Use "
                "'auto' (whole-model torch.func gradients via per_sample_gradients)."
            )
        grad_sample_mode = FLOW_GRAD_SAMPLE_MODE
        if getattr(module, "is_initialized", True) and not public_init:
            raise ValueError(
                "make_private: the flow is already initialised (data-dependent ActNorm init or a checkpoint), which "
                "the DP accounting does not cover. Pass a freshly built flow (it gets the identity initialisation) or "
                "public_init=True if its parameters come from public data only."
            )
        if hasattr(module, "mark_initialized") and not getattr(module, "is_initialized", True):
            module.mark_initialized()
            logger.info("DP-SGD: ActNorm layers keep the identity initialisation (no data-dependent init)")
    else:
        grad_sample_mode = "functorch" if grad_sample_mode == "auto" else grad_sample_mode
        for m in module.modules():  # Opacus' backward hooks forbid in-place ops on hooked outputs
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise ValueError(
                f"make_private: the module cannot be trained with DP-SGD as is ({errors[0]}); call "
                "prepare_module(module) (or build PEPXNet with norm='group') before creating the optimizer."
            )
    if secure_mode:
        noise_source = "secure_mode"
    elif noise_generator is not None:
        noise_source = "caller_generator"
    else:
        noise_source = "os_entropy"
        param = next(module.parameters(), None)
        noise_generator = os_entropy_generator(param.device if param is not None else "cpu")
    engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    module, optimizer, data_loader = engine.make_private_with_epsilon(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=epochs,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
    )
    _zero_nonfinite_grad_samples(optimizer)
    sampler = getattr(data_loader, "batch_sampler", None)
    if noise_source == "os_entropy" and hasattr(sampler, "generator"):
        sampler.generator = os_entropy_generator("cpu")  # Poisson batches: not from the loader's seeded generator
    engine.noise_source = noise_source
    logger.info(
        "DP-SGD (%s): noise multiplier %.4g, clip %.4g, sample rate %.4g, target (%.4g, %.3g) over %d epochs",
        grad_sample_mode, optimizer.noise_multiplier, max_grad_norm, 1 / len(data_loader), target_epsilon,
        target_delta, epochs,
    )  # fmt: skip
    logger.info("DP-SGD noise: %s", NOISE_SOURCES[noise_source])
    return module, optimizer, data_loader, engine


def _zero_nonfinite_grad_samples(optimizer: Any) -> None:
    """Make the ``DPOptimizer`` zero the per-sample gradients of examples that are not finite before it clips.

    Without it one NaN example turns the clipped sum, hence every parameter, into NaN. With it the example
    contributes nothing, and the step is still noised and accounted (see :func:`drop_nonfinite_examples`); the
    optimiser's ``nonfinite_examples`` counts them.
    """
    original = optimizer.clip_and_accumulate

    def clip_and_accumulate() -> None:
        try:
            samples = [optimizer._get_flat_grad_sample(p) for p in optimizer.params]
        except ValueError:  # a parameter without per-sample gradients: Opacus reports it itself
            samples = []
        if samples and samples[0].shape[0]:
            bad = torch.zeros(samples[0].shape[0], dtype=torch.bool, device=samples[0].device)
            for g in samples:
                bad |= ~torch.isfinite(g.flatten(1)).all(dim=1).to(bad.device)
            if bad.any():
                for p, g in zip(optimizer.params, samples):
                    g = g.detach().clone()
                    g[bad.to(g.device)] = 0.0
                    p.grad_sample = g
                optimizer.nonfinite_examples += int(bad.sum())
                logger.warning("DP-SGD: %d example(s) with a non-finite gradient contribute zero; the step is still "
                               "noised and accounted", int(bad.sum()))  # fmt: skip
        original()

    optimizer.nonfinite_examples = 0
    optimizer.clip_and_accumulate = clip_and_accumulate


def per_sample_gradients(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    *batch: Tensor,
    method: str = "auto",
    set_grad_sample: bool = True,
) -> tuple[dict[str, Tensor], Tensor]:
    """Exact per-example gradients of the whole module, each example run as a batch of one.

    Layers whose outputs couple parameters and examples in any way (log-determinants, conditions, buffers) are
    handled exactly, since the gradient of each example's own loss is taken through the complete model.

    Args:
        module: the module (or its Opacus wrapper).
        loss_fn: ``loss_fn(module, *example_batch) -> scalar`` for one example given as a batch of one
            (e.g. :func:`flow_nll`); it may call the module and, for flows, its ``log_prob``.
        batch: tensors whose first dimension is the batch ``B`` (may be 0, e.g. an empty Poisson batch).
        method: ``"vmap"`` (``torch.func``: ``vmap(grad(functional_call))``, one vectorised pass), ``"loop"`` (one
            forward / backward per example with ``torch.autograd.grad``) or ``"auto"`` (``vmap``, falling back to
            ``loop`` when an operation of the model is not supported under ``vmap``).
        set_grad_sample: store each gradient as ``p.grad_sample`` ``[B, *p.shape]`` (what Opacus' optimiser reads).

    Returns:
        ``({name: [B, *p.shape]}, per-example losses [B])`` for every parameter with ``requires_grad``.
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}.")
    inner = _unwrap(module)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    size = batch[0].shape[0] if batch else 0
    if size == 0:
        grads = {n: p.new_zeros((0, *p.shape)) for n, p in named}
        losses = batch[0].new_zeros(0) if batch else torch.zeros(0)
    elif method == "loop":
        grads, losses = _loop_gradients(inner, named, loss_fn, batch)
    else:
        try:
            grads, losses = _vmap_gradients(inner, named, loss_fn, batch)
        except RuntimeError as err:
            if method == "vmap":
                raise
            global _VMAP_FALLBACK_LOGGED
            if not _VMAP_FALLBACK_LOGGED:
                logger.warning("per-sample gradients: vmap not supported by this model (%s); using a loop", err)
                _VMAP_FALLBACK_LOGGED = True
            grads, losses = _loop_gradients(inner, named, loss_fn, batch)
    if set_grad_sample:
        for n, p in named:
            p.grad_sample = grads[n]
    return grads, losses


_VMAP_FALLBACK_LOGGED = False


def _loop_gradients(
    inner: nn.Module, named: list[tuple[str, nn.Parameter]], loss_fn: Callable[..., Tensor], batch: tuple[Tensor, ...]
) -> tuple[dict[str, Tensor], Tensor]:
    params = [p for _, p in named]
    per_example: list[tuple[Tensor, ...]] = []
    losses = []
    with torch.enable_grad():
        for i in range(batch[0].shape[0]):
            loss = loss_fn(inner, *(t[i : i + 1] for t in batch))
            per_example.append(torch.autograd.grad(loss, params, allow_unused=True))
            losses.append(loss.detach())
    grads = {
        n: torch.stack([g[k] if g[k] is not None else torch.zeros_like(p) for g in per_example])
        for k, (n, p) in enumerate(named)
    }
    return grads, torch.stack(losses)


def _vmap_gradients(
    inner: nn.Module, named: list[tuple[str, nn.Parameter]], loss_fn: Callable[..., Tensor], batch: tuple[Tensor, ...]
) -> tuple[dict[str, Tensor], Tensor]:
    params = {n: p.detach() for n, p in named}
    buffers = dict(inner.named_buffers())

    def _loss(p: dict[str, Tensor], *example: Tensor) -> tuple[Tensor, Tensor]:
        def call(*args: Tensor) -> Any:
            return functional_call(inner, (p, buffers), args)

        loss = loss_fn(_Functional(inner, call), *(t.unsqueeze(0) for t in example))
        return loss, loss.detach()

    with contiguous_layout():  # vmap cannot copy batched tensors to channels-last
        return vmap(grad(_loss, has_aux=True), in_dims=(None, *([0] * len(batch))))(params, *batch)


class _Functional:
    """Stand-in for a module inside ``functional_call``: calling it runs the functional forward, and the flow's
    likelihood methods are reimplemented on top of that call."""

    def __init__(self, module: nn.Module, call: Callable[..., Any]) -> None:
        self.module = module
        self._call = call

    def __call__(self, *args: Tensor) -> Any:
        return self._call(*args)

    def log_prob(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        nu, logdet = self(x, condition)
        return -0.5 * (nu.pow(2).sum(1) + nu.shape[1] * math.log(2 * math.pi)) + logdet


def flow_nll(flow: Any, x: Tensor, condition: Tensor | None = None) -> Tensor:
    """Flow loss for DP-SGD: mean negative log-likelihood in bits per dimension (without the constant ``n_bits``).

    Args:
        flow: the flow (or the functional stand-in :func:`per_sample_gradients` passes).
        x: ``[B, C, *S]`` dequantised images.
        condition: ``[B, condition_dim]``.

    Returns:
        scalar ``mean(-log p(x | z)) / (D ln 2)``.
    """
    dims = x[0].numel()
    return -flow.log_prob(x, condition).mean() / (dims * math.log(2.0))


def dp_flow_step(
    flow: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    condition: Tensor | None = None,
    loss_fn: Callable[..., Tensor] = flow_nll,
    method: str = "auto",
) -> Tensor:
    """One DP-SGD step of a flow wrapped by :func:`make_private`: per-sample gradients, clip, noise, update.

    Args:
        flow: the wrapped flow returned by :func:`make_private`.
        optimizer: the ``DPOptimizer`` returned by :func:`make_private`.
        x: ``[B, C, *S]`` batch from the private loader (``B`` may be 0 with Poisson sampling; the step still
            counts in the accounting and adds noise only).
        condition: ``[B, condition_dim]`` (``classifier.embed(x)`` of a frozen, DP or public-data classifier).
        loss_fn: per-example loss (default :func:`flow_nll`).
        method: see :func:`per_sample_gradients`.

    Returns:
        per-example losses ``[B]`` (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    batch = (x,) if condition is None else (x, condition)
    grads, losses = per_sample_gradients(flow, loss_fn, *batch, method=method)
    drop_nonfinite_examples(grads, losses)
    optimizer.step()
    return losses


def drop_nonfinite_examples(grads: dict[str, Tensor], losses: Tensor) -> Tensor:
    """Zero, in place, the per-example gradients of the examples whose loss or gradient is not finite.

    The DP-SGD step then still happens: the optimiser clips, adds noise and the accountant counts the step, whatever
    the data. Skipping the step instead would make *whether* a step happens depend on one private example, outside
    the mechanism. A zero gradient is within the clipping bound, so the guarantee is unchanged; the example simply
    contributes nothing to this step.

    Args:
        grads: ``{name: [B, *p.shape]}`` from :func:`per_sample_gradients` (the tensors Opacus reads as
            ``p.grad_sample``, modified in place).
        losses: per-example losses ``[B]``.

    Returns:
        boolean mask ``[B]`` of the examples that were zeroed.
    """
    bad = ~torch.isfinite(losses.detach()).reshape(-1)
    for g in grads.values():
        bad |= ~torch.isfinite(g.detach().flatten(1)).all(dim=1).to(bad.device)
    if bad.any():
        for g in grads.values():
            g.detach()[bad.to(g.device)] = 0.0
    return bad


def covered_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters DP-SGD trains (and the guarantee covers): every parameter with ``requires_grad``."""
    return [n for n, p in _unwrap(module).named_parameters() if p.requires_grad]


def coverage_note(module: nn.Module, conditioning: str = "a frozen classifier") -> str:
    """One-line statement of what the (epsilon, delta) covers, for reports.

    Args:
        module: the privately trained module (or its wrapper).
        conditioning: how the condition ``z`` was obtained, for flows.
    """
    inner = _unwrap(module)
    names = covered_parameters(inner)
    frozen = [n for n, p in inner.named_parameters() if not p.requires_grad]
    note = (
        f"all {len(names)} trainable parameter tensors of {type(inner).__name__} "
        f"({sum(p.numel() for p in inner.parameters() if p.requires_grad)} values)"
    )
    if frozen:
        note += f"; {len(frozen)} frozen tensors are NOT covered (they must come from public data or their own DP run)"
    if is_flow(inner):
        note += (
            f". ActNorm starts from the identity initialisation or from public weights (no data-dependent init). "
            f"The condition z comes from "
            f"{conditioning}, which this guarantee does not cover: it must be DP-trained (epsilons add up) or trained "
            "on public data, and synthetic images generated from the z of real patients release those z."
        )
    return note


def dp_summary(
    privacy_engine: PrivacyEngine,
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    delta: float,
) -> dict[str, Any]:
    """Privacy spent so far, JSON-ready.

    Args:
        privacy_engine: the engine from :func:`make_private`.
        optimizer: the ``DPOptimizer``.
        module: the wrapped module.
        delta: the delta to report epsilon at.

    Returns:
        ``{"epsilon", "delta", "noise_multiplier", "max_grad_norm", "expected_batch_size", "steps", "accountant",
        "noise", "noise_source", "covered_parameters", "covers"}``; ``epsilon`` is 0.0 before the first step;
        ``noise`` is the key of :data:`NOISE_SOURCES` (``"os_entropy"`` by default) and ``noise_source`` its
        description.
    """
    accountant = privacy_engine.accountant
    steps = sum(int(h[2]) for h in getattr(accountant, "history", []))
    epsilon = float(privacy_engine.get_epsilon(delta)) if steps else 0.0
    return {
        "epsilon": epsilon,
        "delta": float(delta),
        "noise_multiplier": float(optimizer.noise_multiplier),
        "max_grad_norm": float(optimizer.max_grad_norm),
        "expected_batch_size": getattr(optimizer, "expected_batch_size", None),
        "steps": steps,
        "accountant": accountant.mechanism(),
        "noise": getattr(privacy_engine, "noise_source", "unknown"),
        "noise_source": NOISE_SOURCES.get(getattr(privacy_engine, "noise_source", ""), "unknown"),
        "covered_parameters": covered_parameters(module),
        "covers": coverage_note(module),
    }


def projected_epsilon(
    accountant: Any, noise_multiplier: float, sample_rate: float, remaining_steps: int, delta: float
) -> float:
    """Epsilon a run will have spent at its end: the steps in ``accountant.history`` plus ``remaining_steps`` more at
    ``(noise_multiplier, sample_rate)``.

    Consecutive history entries with the same noise and sample rate are merged, so a resumed run with its original
    plan projects exactly what the uninterrupted run spends. The ``gdp`` accountant cannot compose different noise
    levels (it keeps only the last one): a mixed history gives ``inf``.
    """
    merged: list[tuple[float, float, int]] = []
    entries = [tuple(h) for h in getattr(accountant, "history", [])]
    if remaining_steps > 0:
        entries.append((float(noise_multiplier), float(sample_rate), int(remaining_steps)))
    for sigma, rate, steps in entries:
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    if not merged:
        return 0.0
    if accountant.mechanism() == "gdp" and len(merged) > 1:
        return math.inf
    projection = type(accountant)()
    projection.history = merged
    return float(projection.get_epsilon(delta))


def check_resume_budget(
    accountant: Any,
    noise_multiplier: float,
    sample_rate: float,
    steps_done: int,
    total_steps: int,
    target_epsilon: float,
    delta: float,
) -> float:
    """Refuse to continue a resumed DP-SGD run that would end above ``target_epsilon``.

    Opacus calibrates the noise from the target and the planned epochs alone: resuming a run with a larger
    ``max_epochs`` (or another target) lowers the noise while the restored accountant keeps the steps already taken,
    and the total would overspend the target (e.g. 2 epochs at target 2, then ``max_epochs`` 6: epsilon 2.48).

    Args:
        accountant: the restored Opacus accountant (its ``history`` holds the steps taken so far).
        noise_multiplier: the noise multiplier of the steps still to come (``DPOptimizer.noise_multiplier``).
        sample_rate: their Poisson sample rate (``1 / len(dp_loader)``).
        steps_done: steps the run has taken (the trainer's restored iteration).
        total_steps: steps at the end of the run (``max_epochs * epoch_length``).
        target_epsilon: the target the run must not exceed.
        delta: the delta of the target.

    Returns:
        the projected epsilon at the end of the run.

    Raises:
        ValueError: when the projection exceeds the target (the message names ``max_epochs`` / ``target_epsilon``
            and how to continue).
    """
    projected = projected_epsilon(accountant, noise_multiplier, sample_rate, total_steps - steps_done, delta)
    if projected > target_epsilon * (1 + 1e-6):
        raise ValueError(
            f"cannot resume this DP-SGD run: with the current max_epochs / target_epsilon the noise was calibrated "
            f"anew (noise multiplier {noise_multiplier:.4g}) while {steps_done} steps were already taken with the "
            f"original plan, so the run would end at epsilon {projected:.4g} > target_epsilon {target_epsilon:.4g}. "
            "Resume with the original max_epochs and target_epsilon, or train in a new output folder."
        )
    return projected


class DPPlan:
    """What the DP noise was calibrated for, saved in a checkpoint as ``dp_plan``.

    A resumed DP run must keep the plan: Opacus derives the noise multiplier from the target and the planned epochs
    alone, so resuming with a larger ``max_epochs`` (or another target) would spend more than the target.
    :meth:`load_state_dict` refuses a changed plan, naming the setting.
    """

    def __init__(self, **plan: Any) -> None:
        self.plan = dict(plan)

    def state_dict(self) -> dict[str, Any]:
        """The plan, as saved."""
        return dict(self.plan)

    def load_state_dict(self, state: Any) -> None:
        """Compare a saved plan with this one.

        Raises:
            ValueError: naming every setting whose saved value differs.
        """
        changed = {k: (state.get(k), v) for k, v in self.plan.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"'{k}' was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume this DP-SGD run with different settings ({detail}): the noise was calibrated for the "
                "original plan, so the target would not hold. Resume with the original values or train in a new "
                "output folder."
            )
