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
"""An exponential moving average of a model's weights, as an Ignite handler with a checkpointable state."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from monai.utils import optional_import

from monai_condflow.engines.outputs import output_value

Events, _ = optional_import("ignite.engine", name="Events")

__all__ = ["ModelEMA"]


def _slots(
    average: torch.nn.Module, model: torch.nn.Module, kind: str, named: Iterable[tuple[str, torch.Tensor]]
) -> list[tuple[dict, dict, str]]:
    """``(average owner's tensors, model owner's tensors, name)`` for every named tensor of ``average`` (a copy of
    ``model``, so the same names exist in both)."""
    slots = []
    for full_name, _ in named:
        owner, _, name = full_name.rpartition(".")
        slots.append((getattr(average.get_submodule(owner), kind), getattr(model.get_submodule(owner), kind), name))
    return slots


def _lookup(slots: list[tuple[dict, dict, str]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The averaged tensors and the model's current ones, in slot order (``None`` entries skipped)."""
    pairs = [(a[n], m[n]) for a, m, n in slots if a[n] is not None and m[n] is not None]
    return [a for a, _ in pairs], [m for _, m in pairs]


class ModelEMA:
    """Keep ``ema = d * ema + (1 - d) * weights`` after every optimiser step (buffers are copied, not averaged).

    The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` so that a short run is not dominated by the
    initial weights. The average lives in :attr:`module`, a frozen copy of the model made at construction (build it
    after the model's data-dependent initialisation). Steps the trainer skipped (``engine.state.output["skipped"]``)
    are not averaged in.

    Args:
        model: the trained module (not a DDP wrapper).
        decay: the asymptotic decay ``d`` in ``[0, 1)`` (0: the average is the current weights).

    Example::

        ema = ModelEMA(flow, decay=0.995)
        ema.attach(trainer)         # updates after every iteration
        ema.module.sample(z)        # sample from the averaged weights
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.995) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.model = model
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # where each parameter and buffer lives, found once: walking a 64-step flow's ~850 modules twice per update
        # cost milliseconds of host time per training iteration (docs/performance.md, "Host time of the flow
        # trainer"). Looked up by slot at each update, so a tensor the model replaces is still the one averaged.
        self._param_slots = _slots(self.module, model, "_parameters", self.module.named_parameters())
        self._buffer_slots = _slots(self.module, model, "_buffers", self.module.named_buffers())

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step."""
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        ema_params, params = _lookup(self._param_slots)
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        ema_buffers, buffers = _lookup(self._buffer_slots)
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Reset the average to the model's current weights."""
        self.module.load_state_dict(self.model.state_dict())

    def _on_iteration(self, engine: Any) -> None:
        if output_value(engine.state.output, "skipped", False):
            return
        self.update()

    def attach(self, engine: Any) -> None:
        """Update after every iteration of ``engine``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
