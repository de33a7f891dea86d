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
CUDA graphs for the flow: one launch per training step's forward and backward, one per decoded batch.

The ``paper`` preset is 64 flow steps of small convolutions: at the paper's batch a training step is thousands of
short kernels, and the GPU waits on the CPU that launches them (``docs/performance.md``). A CUDA graph records the
kernels once and replays them with one launch. Both helpers here record for one input signature (shapes, dtypes,
device) and run the plain function for any other (e.g. the smaller last batch of an epoch), and both fall back to
the plain function, with one warning, where recording is impossible (no CUDA, or an operation that cannot be
captured).

- :class:`GraphedTraining`: ``torch.cuda.make_graphed_callables`` on a module whose forward is the per-sample
  loss: forward and backward replay as graphs, the parameter gradients reach autograd as usual (so DDP's gradient
  hooks, clipping and the optimizer step run eagerly after it). Random draws inside (noise, condition dropout) use
  CUDA's graph-safe generator: a replay draws fresh values.
- :class:`GraphedCall`: ``torch.cuda.graph`` around an inference function (the decoder of ``sample``).
- :class:`WeightsWatch`: whether a module's weights (and the numeric settings, :func:`numerics`) are still the ones
  a recorded graph reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GraphedCall", "GraphedTraining", "WeightsWatch", "numerics", "signature"]

logger = logging.getLogger(__name__)


def signature(*args: Tensor) -> tuple:
    """What a recorded graph depends on: each tensor's shape, dtype, device and ``requires_grad``."""
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


def numerics(device_type: str = "cuda") -> tuple:
    """The global switches a recorded graph bakes in besides its inputs and weights, compared with ``==``: whether
    autocast is on for ``device_type`` and to which dtype, and PyTorch's TF32 settings (both forms; see
    :mod:`monai_condflow.utils.precision`). A graph recorded under other values replays the kernels chosen then."""
    from monai_condflow.utils.precision import tf32_state

    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type), tf32_state())


class WeightsWatch:
    """Says when the weights a recorded graph reads are no longer a module's current ones.

    A graph reads each tensor at the address it had at recording, and values derived from the weights and cached
    (the 1x1 convolutions' inverses, cached without autograd) as they were then. So the graph is stale when any
    parameter or buffer moved (``.to()``, ``.half()``, ``load_state_dict(assign=True)``, a ``.data`` assignment) or
    was written (an optimiser step, ``load_state_dict``, an in-place edit: a new version), or was replaced by
    another tensor object (caches derived from the weights are keyed by the tensors' identities too). The watch keys
    every parameter and buffer by its identity, address and version counter, and holds the tensors of the last key,
    so that neither the identity nor the address of a replaced one can be given to a new tensor while the key refers
    to it (until the next change; drop the watch to release them). A deep copy of a watch is an empty one (a copied
    module's weights are other tensors).

    Args:
        versions: also count writes (version counters), for graphs that cache values derived from the weights (the
            decoder's 1x1 inverses). ``False`` for a training graph, which reads the weights themselves where they
            are, so that an optimiser step is not a change; it counts ``requires_grad`` instead (the recorded
            backward gives gradients to the parameters that required them then).
    """

    def __init__(self, versions: bool = True) -> None:
        self.versions = versions
        self._key: tuple | None = None
        self._held: list[Tensor] = []
        self._dicts: tuple[nn.Module, list[dict]] | None = None

    def _tensors(self, module: nn.Module) -> list[Tensor]:
        # the dictionaries that hold the parameters and buffers of the module's tree, collected at the first call
        # for a module (walking the tree is most of the cost: ~850 modules for the ``paper`` flow, whose tree is
        # fixed at construction; a submodule added later is not seen); tensors replaced or added in a module are
        # read from its dictionaries at every call
        if self._dicts is None or self._dicts[0] is not module:
            self._dicts = (module, [d for m in module.modules() for d in (m._parameters, m._buffers)])
        return [t for d in self._dicts[1] for t in d.values() if t is not None]

    def changed(self, module: nn.Module, device_type: str | None = None, settings: Any = None) -> bool:
        """Whether ``module``'s parameters and buffers, the numerics of ``device_type`` or ``settings`` differ from
        those at the previous call (``True`` at the first call); the current ones become the reference.

        Args:
            module: the module whose weights the graph reads.
            device_type: the device whose :func:`numerics` (autocast, TF32) the graph bakes in; ``None``: not
                compared.
            settings: anything else the graph bakes in, compared with ``==`` (e.g. the module's own precision
                switches).
        """
        tensors = self._tensors(module)
        numeric = None if device_type is None else numerics(device_type)
        if self.versions:  # an inference tensor has no version counter (its address still counts)
            weights = tuple((id(t), t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
        else:
            weights = tuple((id(t), t.data_ptr(), t.requires_grad) for t in tensors)
        key = (numeric, settings, weights)
        if key == self._key:
            return False
        self._key, self._held = key, tensors
        return True

    def __deepcopy__(self, memo: dict) -> WeightsWatch:
        return WeightsWatch(self.versions)


class GraphedTraining:
    """Forward and backward of ``module(*args)`` recorded as CUDA graphs at the first eligible call.

    The graphs read the parameters and buffers where they were at recording (the old ones stay alive with the
    graphs), hand the gradients to those parameter objects, and replay the kernels and constants of then. So a
    parameter or buffer moved or replaced (``.to()``, ``load_state_dict(assign=True)``, a new ``Parameter``), a
    parameter frozen or unfrozen, other numerics (autocast, TF32; :func:`numerics`) or other module switches
    (``settings``) drop the graphs (:class:`WeightsWatch` without version counters: an optimiser step writes the
    weights in place, which the graphs read; ~0.4-0.6 ms per step for the ``paper`` flow on this CPU, overlapped with
    the previous step's optimiser kernels on a GPU). They are recorded again at the next call with the inputs'
    signature of before (a smaller last batch in between runs eagerly); calls under autocast with its weight cache
    (``torch.autocast``'s default), which ``make_graphed_callables`` refuses, run eagerly and record nothing.

    Args:
        module: a module whose forward takes tensors and returns a tensor (e.g. per-sample bits/dim); it must have
            no hooks. Recording runs it 3 times on a side stream first (the warm-up that
            ``make_graphed_callables`` does); those runs do not touch ``.grad``.
        name: for the log lines.
        settings: returns the module's own switches that a recording bakes in, compared with ``==`` (e.g.
            ``ConditionalGlow.graph_settings``: the couplings' precision, the training noise, the condition
            dropout), or ``None``.
    """

    def __init__(
        self, module: torch.nn.Module, name: str = "training step", settings: Callable[[], Any] | None = None
    ) -> None:
        self.module = module
        self.name = name
        self.settings = settings
        self._sig: tuple | None = None
        self._resig: tuple | None = None  # after a change: the signature to record again for
        self._graphed: Callable[..., Tensor] | None = None
        self._watch = WeightsWatch(versions=False)
        self.failed = False
        self.replays = 0

    @property
    def recorded(self) -> bool:
        return self._graphed is not None

    def _record(self, args: tuple[Tensor, ...]) -> None:
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        module = self.module
        try:
            torch.cuda.make_graphed_callables(module, samples, num_warmup_iters=3, allow_unused_input=True)
            self._graphed = module.forward  # the graph-replaying forward installed on the instance
        except Exception as e:  # an operation that cannot be captured: stay eager, say so once
            self.failed = True
            logger.warning("CUDA graphs: could not record the %s (%s: %s); running it eagerly.", self.name,
                           type(e).__name__, e)  # fmt: skip
        finally:
            module.__dict__.pop("forward", None)  # the class's forward again for eager calls
        if self._graphed is not None:
            self._sig = signature(*args)
            logger.info("CUDA graphs: recorded the %s for inputs %s.", self.name, [list(a.shape) for a in args])

    def _eligible(self, args: tuple) -> bool:
        """Whether this call may record or replay: autograd on, CUDA inputs, no capture under way, no failure."""
        return (
            not self.failed
            and torch.is_grad_enabled()
            and all(isinstance(a, Tensor) and a.is_cuda for a in args)
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, *args: Tensor) -> Tensor:
        """``module(*args)``, by graph replay when the inputs match the recorded signature (the output is a fresh
        tensor, not the graph's static buffer)."""
        if not self._eligible(args):
            return self.module(*args)
        device_type = args[0].device.type
        settings = None if self.settings is None else self.settings()
        if self._sig is not None and self._watch.changed(self.module, device_type, settings):
            logger.info("CUDA graphs: the %s's weights moved or its settings changed; recording it again.", self.name)
            self._resig, self._graphed, self._sig = self._sig, None, None
        if self._sig is None:
            if self._resig is not None and signature(*args) != self._resig:
                return self.module(*args)  # record again for the batch shape of before, not a smaller last batch
            if torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled():
                return self.module(*args)  # make_graphed_callables refuses autocast's weight cache
            self._record(args)
            self._watch.changed(self.module, device_type, settings)  # the reference: what the graphs read
            if self._graphed is not None:
                self._resig = None
        if self._graphed is not None and signature(*args) == self._sig:
            self.replays += 1
            return self._graphed(*args).clone()
        return self.module(*args)


class GraphedCall:
    """``fn(*args)`` under ``torch.no_grad``, recorded once as a CUDA graph for the signature of ``args``.

    Args:
        fn: a function of tensors returning a tensor or a tuple of tensors; it must not synchronise with the CPU
            after its first two calls (those run before recording, e.g. to fill caches).
        args: example inputs (CUDA tensors) that fix the signature.
        name: for the log lines.

    Raises:
        RuntimeError: recording failed (the caller falls back to ``fn``).
    """

    def __init__(self, fn: Callable[..., Any], *args: Tensor, name: str = "decoder") -> None:
        self.fn = fn
        self.sig = signature(*args)
        self.replays = 0
        self._static_in = tuple(a.detach().clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._static_out = fn(*self._static_in)
        logger.info("CUDA graphs: recorded the %s for inputs %s.", name, [list(a.shape) for a in args])

    def __call__(self, *args: Tensor) -> Any:
        for static, a in zip(self._static_in, args):
            static.copy_(a)
        self.graph.replay()
        self.replays += 1
        out = self._static_out
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
