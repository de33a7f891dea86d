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
Regional ``torch.compile`` of a flow: the repeated flow step, compiled once per shape.

A Glow is dozens of identical flow steps (ActNorm, 1x1 convolution, affine coupling). Compiling the whole model
makes Dynamo and inductor trace every step (minutes for the ``paper`` preset's 64 steps on a CPU); compiling the
step's code instead traces one step per distinct input shape and dtype (the parameters are inputs of the compiled
code, so every step of a shape shares it): on the ``paper`` preset 9 compilations (64 px, batch 8, our CPU run)
instead of one pass through 64 steps. Inside a step inductor fuses the coupling's elementwise work (bounding,
``exp``, affine, log-determinant sum, activation)
into a few kernels, forward and backward; the convolutions stay library calls.

Two uses, each opt-in: the forward of training calls (module in ``train()`` mode, autograd on, a tensor condition or
none), and the inverse of calls without autograd (sampling, decoding; a guided condition stays eager). Validation,
the denoising / counterfactual gradients, per-position log-determinant maps (``log_prob_map``) and anything else run
the eager code (another autograd mode would mean another set of compilations). A forward compilation that fails (no
C++ compiler for inductor on the CPU, no Triton on a GPU) is reported once and the steps run eagerly from then on;
the backward, which AOT autograd compiles at the first ``backward()``, is not covered: its failure raises there.
Operations Dynamo cannot trace are graph breaks (eager pieces inside the compiled step), not failures.

A copy of the flow (``copy.deepcopy``, e.g. the EMA average) has no compiler: it runs eagerly until its own
``compile_steps``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from monai_condflow.networks.blocks.flow_sequential import deferred_logdets, logdet_maps_recording

__all__ = ["StepCompiler", "compile_flow_steps", "compiled_steps", "compiles_training", "run_step"]

logger = logging.getLogger(__name__)

# step -> its compiler; weak and outside the module, so a deepcopy of the flow (the EMA's copy) has none
_COMPILERS: weakref.WeakKeyDictionary[nn.Module, StepCompiler] = weakref.WeakKeyDictionary()


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failed compilation (Dynamo's backend failure, inductor's own)."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.BackendCompilerFailed]
    inductor_error = getattr(torch._inductor.exc, "InductorError", None)
    if inductor_error is not None:
        errors.append(inductor_error)
    return tuple(errors)


class StepCompiler:
    """The ``torch.compile`` of a flow step's forward (training) and / or inverse (decoding), shared by every step
    of a flow.

    Args:
        forward: the step's eager forward as a plain function ``forward(step, x, condition) -> (y, logdet)``.
        inverse: the step's eager inverse ``inverse(step, y, condition) -> (x, logdet)``.
        training: compile the forward for training calls (``train()`` mode, autograd on).
        sampling: compile the inverse for calls without autograd (sampling, decoding).
        compile_kwargs: passed to :func:`torch.compile` (``backend``, ``mode``, ``dynamic``, ...).

    Attributes:
        failed: a compilation failed; the steps run eagerly.
        calls: calls that ran compiled code (forward and inverse).
    """

    def __init__(
        self,
        forward: Callable[..., tuple[Tensor, Tensor]],
        inverse: Callable[..., tuple[Tensor, Tensor]],
        training: bool = True,
        sampling: bool = False,
        **compile_kwargs: Any,
    ) -> None:
        self.forward = forward
        self.inverse = inverse
        self.compiled_forward = torch.compile(forward, **compile_kwargs) if training else None
        self.compiled_inverse = torch.compile(inverse, **compile_kwargs) if sampling else None
        self.failed = False
        self.calls = 0

    def _usable(self, condition: Any) -> bool:
        return (
            not self.failed
            and (condition is None or isinstance(condition, Tensor))
            and not logdet_maps_recording()  # the compiled code records no per-position maps
        )

    def _run(self, compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> tuple[Tensor, Tensor]:
        deferred = deferred_logdets()
        mark = None if deferred is None else len(deferred)
        try:
            out = compiled(*args)
        except _compile_errors() as e:  # nothing ran: report once, stay eager from now on
            self.failed = True
            if mark is not None:  # constants an eagerly run part left to the pass: the eager step leaves them again
                del deferred[mark:]
            cause = getattr(e, "inner_exception", None) or e
            logger.warning("torch.compile of the flow steps failed (%s: %s: %s); running them eagerly.",
                           type(e).__name__, type(cause).__name__, str(cause).strip().split("\n")[0])  # fmt: skip
            return eager(*args)
        self.calls += 1
        return out

    def run_forward(self, step: nn.Module, x: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """``step``'s forward, compiled for a training call (``train()`` mode, autograd on, a tensor condition or
        none).

        Args:
            step: the flow step.
            x: ``[B, C, *spatial]``.
            condition: ``[B, condition_dim]`` or ``None``.

        Returns:
            ``(y [B, C, *spatial], logdet [B])``.
        """
        if self.compiled_forward is None or not (step.training and torch.is_grad_enabled() and self._usable(condition)):
            return self.forward(step, x, condition)
        return self._run(self.compiled_forward, self.forward, step, x, condition)

    def run_inverse(self, step: nn.Module, y: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """``step``'s inverse, compiled for a call without autograd (a tensor condition or none, not a guided one).

        Args:
            step: the flow step.
            y: ``[B, C, *spatial]``.
            condition: ``[B, condition_dim]`` or ``None``.

        Returns:
            ``(x [B, C, *spatial], logdet [B])``.
        """
        if self.compiled_inverse is None or torch.is_grad_enabled() or not self._usable(condition):
            return self.inverse(step, y, condition)
        return self._run(self.compiled_inverse, self.inverse, step, y, condition)


def compiled_steps(flow: nn.Module) -> StepCompiler | None:
    """The :class:`StepCompiler` of ``flow``'s steps (``None`` when they are not compiled)."""
    for m in flow.modules():
        compiler = _COMPILERS.get(m)
        if compiler is not None:
            return compiler
    return None


def compiles_training(step: nn.Module) -> bool:
    """Whether a training call of ``step`` would run compiled code (its forward is compiled and no compilation has
    failed); a dictionary lookup, no walk over the modules."""
    compiler = _COMPILERS.get(step)
    return compiler is not None and compiler.compiled_forward is not None and not compiler.failed


def compile_flow_steps(
    flow: nn.Module,
    step_type: type[nn.Module],
    forward: Callable[..., tuple[Tensor, Tensor]],
    inverse: Callable[..., tuple[Tensor, Tensor]],
    enable: bool = True,
    training: bool = True,
    sampling: bool = False,
    **compile_kwargs: Any,
) -> int:
    """Compile (or, with ``enable=False``, stop compiling) every ``step_type`` in ``flow``.

    Raises Dynamo's per-function recompilation limit (process-wide; logged, never lowered, not restored) to twice
    the number of steps if it is lower: each distinct step shape, dtype and autograd mode is one compilation, and a
    second batch size compiles each shape once more; past the limit Dynamo would run the rest eagerly.

    Args:
        flow: the flow.
        step_type: the class of its repeated step; its ``forward`` / ``inverse`` must go through
            :func:`run_step`.
        forward: the step's eager forward as a plain function (``step_type``'s parent's ``forward``).
        inverse: the step's eager inverse as a plain function.
        enable: ``False`` removes the compiled code (eager from the next call).
        training: compile the forward of training calls.
        sampling: compile the inverse of calls without autograd.
        compile_kwargs: passed to :func:`torch.compile`.

    Returns:
        the number of steps changed.

    Raises:
        ValueError: ``enable`` with neither ``training`` nor ``sampling``.
    """
    steps = [m for m in flow.modules() if isinstance(m, step_type)]
    if not enable:
        for m in steps:
            _COMPILERS.pop(m, None)
        return len(steps)
    if not (training or sampling):
        raise ValueError("compile_steps: nothing to compile (training and sampling both False).")
    compiler = StepCompiler(forward, inverse, training=training, sampling=sampling, **compile_kwargs)
    limit = 2 * len(steps)
    config = torch._dynamo.config
    if config.recompile_limit < limit:
        logger.info("torch._dynamo.config.recompile_limit %d -> %d (one compilation per flow-step shape).",
                    config.recompile_limit, limit)  # fmt: skip
        config.recompile_limit = limit
    for m in steps:
        _COMPILERS[m] = compiler
    return len(steps)


def run_step(
    step: nn.Module,
    eager: Callable[..., tuple[Tensor, Tensor]],
    x: Tensor,
    condition: Tensor | None,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """A step's forward (or, with ``inverse``, its inverse), through its :class:`StepCompiler` if it has one, else
    ``eager(step, x, condition)``.

    Args:
        step: the flow step.
        eager: its plain forward (or inverse) as a function of ``(step, x, condition)``.
        x: ``[B, C, *spatial]``.
        condition: ``[B, condition_dim]`` or ``None``.
        inverse: ``x`` is the step's output and the call its inverse.

    Returns:
        ``(out [B, C, *spatial], logdet [B])``.
    """
    compiler = None if torch.compiler.is_compiling() else _COMPILERS.get(step)  # no lookup traced by a larger compile
    if compiler is None:
        return eager(step, x, condition)
    return (compiler.run_inverse if inverse else compiler.run_forward)(step, x, condition)
