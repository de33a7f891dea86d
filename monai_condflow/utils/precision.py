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
Numerical precision of flow training (bundle id ``precision``).

- ``"fp32"``: every operation in float32, TF32 off (the exact reference; on the CPU ``"fp32"`` and ``"tf32"`` are
  the same).
- ``"tf32"`` (default): float32 tensors, with TF32 tensor-core convolutions and matrix products on GPUs that have
  them (PyTorch's own default for convolutions). Measured on an H200 (``docs/performance.md``, ``paper`` preset): round
  trip <= 4.7e-3, bits/dim within 3.5e-3 of fp32.
- ``"bf16"``: the coupling networks (the flow's convolutional bulk) run under bfloat16 autocast; their outputs are
  cast back before the affine transform, so the log-determinants, ActNorm, the 1x1 convolutions (and their
  inverse), the priors and the loss stay in strict float32. The round trip is no longer exact to float32 (the
  inverse feeds the coupling network inputs that differ from the forward's by float32 rounding, and bfloat16's
  rounding can amplify that to its own resolution, ~4e-3 relative): ~2e-3 on [0, 1] images for the ``small``
  preset with random weights (``tests/utils/test_precision.py``), <= 1.8e-3 for the ``paper`` preset on an H200,
  bits/dim within 5.2e-3 of fp32 there, at 60 % of the training memory (``docs/performance.md``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from monai_condflow.utils.checks import ConfigValueError

__all__ = ["PRECISIONS", "check_precision", "coupling_dtype", "precision_context", "tf32_state"]

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def check_precision(value: object, name: str = "precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ConfigValueError: naming the config id ``name``.
    """
    if value not in PRECISIONS:
        raise ConfigValueError(f"config id '{name}' must be one of {PRECISIONS}, got {value!r}.")
    return str(value)


def coupling_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of the coupling networks under ``precision`` (``None``: no autocast)."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else None


@contextlib.contextmanager
def precision_context(precision: str) -> Iterator[None]:
    """Set PyTorch's TF32 switches for ``precision`` inside the block and restore them after it.

    ``"tf32"`` allows TF32 in cuDNN convolutions and cuBLAS matrix products; ``"fp32"`` and ``"bf16"`` forbid it
    (``bf16`` keeps everything outside the coupling networks in strict float32). The coupling autocast of ``"bf16"``
    is a property of the model
    (:func:`~monai_condflow.networks.blocks.coupling.set_coupling_dtype`), not of this block. No effect on the CPU,
    except that ``"fp32"`` and ``"bf16"`` raise PyTorch's float32 matmul precision to ``"highest"`` inside the block
    where a user had lowered it (``torch.set_float32_matmul_precision``). Inside the block both forms of PyTorch's
    settings (the legacy ``allow_tf32`` flags and the per-backend ``fp32_precision`` values) read what the mode set
    (torch.compile reads the legacy ones); after it every per-backend value is as before.
    """
    allow = check_precision(precision) == "tf32"
    before = tf32_state()
    _set_tf32(allow)
    try:
        yield
    finally:
        _restore_tf32(before)


# the per-backend settings (torch >= 2.9) that the switches below change (the legacy cuDNN switch: convolutions and
# RNNs; the legacy cuBLAS switch and ``set_float32_matmul_precision``: the two matmul ones), read and restored exactly
_TOUCHED = ("cudnn.conv", "cudnn.rnn", "cuda.matmul", "mkldnn.matmul")


@functools.cache
def _settings() -> tuple[tuple[str, object], ...]:
    """``(path, torch.backends.<path>)`` of :data:`_TOUCHED` that this torch has (found once: the block is entered at
    every training step)."""
    found = []
    for path in _TOUCHED:
        obj: object | None = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if hasattr(obj, "fp32_precision"):
            found.append((path, obj))
    return tuple(found)


def _legacy_reads() -> tuple:
    """PyTorch's legacy TF32 flags, or ``None`` for one that cannot be read (torch refuses to read a flag whose
    per-backend settings were changed apart from it)."""
    values = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision):
        try:
            values.append(read())
        except RuntimeError:
            values.append(None)
    return tuple(values)


def tf32_state() -> tuple:
    """PyTorch's TF32 settings as they are now (the legacy flags and, on torch >= 2.9, the per-backend values)."""
    if _settings():  # torch >= 2.9: the per-backend API
        return ("new", _legacy_reads(), {path: obj.fp32_precision for path, obj in _settings()})
    return ("legacy", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


def _set_tf32(allow: bool) -> None:
    # the legacy switches on every torch: on torch >= 2.9 they set the per-backend values of cuDNN (convolutions and
    # RNNs) and cuBLAS consistently with the legacy flags, so code reading either form inside the block (torch.compile
    # reads the legacy ones) can; setting only some per-backend values made torch refuse to read the legacy flags
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    if not _settings():  # pragma: no cover - older torch: the legacy switches are all there is
        return
    want = "tf32" if allow else "ieee"
    for path, obj in _settings():
        if not path.startswith("cudnn."):
            continue
        # switched off, the legacy switch leaves "none" (inherit): a user's parent setting of "tf32" would show
        # through, so the value is then set itself (the legacy cuDNN flag may then be unreadable)
        if (obj.fp32_precision == "tf32") != allow:
            obj.fp32_precision = want
    if not allow:
        try:
            torch.get_float32_matmul_precision()
        except RuntimeError:  # e.g. a user's set_float32_matmul_precision("high"): strict everywhere, readable
            torch.set_float32_matmul_precision("highest")


def _restore_tf32(state: tuple) -> None:
    if state[0] == "new":
        (cudnn_allow, matmul_precision), settings = state[1], state[2]
        # the legacy flags first (where they could be read), then every per-backend value exactly as it was
        if cudnn_allow is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_allow
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        for path, obj in _settings():
            if obj.fp32_precision != settings[path]:
                obj.fp32_precision = settings[path]
    else:  # pragma: no cover - older torch
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = state[1], state[2]
