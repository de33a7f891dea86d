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
"""Seeding a run and choosing how cuDNN picks its convolution algorithms (the bundle id ``deterministic``)."""

from __future__ import annotations

import logging

import torch
from monai.utils import set_determinism

from monai_condflow.utils.checks import check_flag

__all__ = ["cudnn_flags", "set_run_determinism"]

logger = logging.getLogger(__name__)


def cudnn_flags() -> dict[str, bool]:
    """The process's cuDNN algorithm flags: ``{"deterministic": ..., "benchmark": ...}``."""
    cudnn = torch.backends.cudnn
    return {"deterministic": bool(cudnn.deterministic), "benchmark": bool(cudnn.benchmark)}


def set_run_determinism(seed: int | None, deterministic: bool = True) -> None:
    """Seed every generator and choose cuDNN's convolution algorithms for the process.

    ``monai.utils.set_determinism(seed)`` seeds ``random``, NumPy and torch; with a seed it also makes cuDNN
    deterministic (``cudnn.deterministic`` on, ``cudnn.benchmark`` off), which every stage of the bundle did before
    this switch existed and still does by default. ``deterministic=False`` keeps the seeding and lets cuDNN time its
    algorithms for each new convolution shape and keep the fastest (``cudnn.deterministic`` off, ``cudnn.benchmark``
    on): a training run's shapes are fixed, so the timing is paid in the first steps only, and the rest may run
    faster on a GPU, but the run no longer repeats itself bit for bit. The CPU does not use these flags: a CPU run
    computes the same either way.

    Args:
        seed: the run's seed (``None``: MONAI's behaviour for no seed, which also leaves cuDNN's flags as they were
            before any seeding).
        deterministic: ``True`` (default): reproducible convolution algorithms; ``False``: autotuned ones.

    Raises:
        ConfigValueError: ``deterministic`` is not ``True`` or ``False`` (the error names the config id).
    """
    check_flag(deterministic, "deterministic")
    set_determinism(seed=seed)
    if not deterministic:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    logger.debug("seed %s, cuDNN %s", seed, cudnn_flags())
