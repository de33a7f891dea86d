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
"""A stable description of a transform chain's settings, for cache keys and run settings."""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any

import numpy as np
import torch

__all__ = ["describe_transform", "transform_fingerprint"]

_MAX_DEPTH = 8
_MAX_ELEMENTS = 64  # arrays larger than this are described by shape, dtype and a digest of their bytes


def _name(obj: object) -> str:
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def describe_transform(obj: Any, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> Any:
    """A JSON-serialisable description of ``obj``'s settings: plain values as they are, sequences and mappings
    element by element, any other object as its class and its attributes (recursively, so a ``Compose`` is
    described by the settings of every transform it holds, a ``CTIntensityd`` by its mode and window).

    What cannot change a chain's output between runs is left out or reduced to its class: random generators
    (a preprocessing chain is deterministic), functions (their qualified names), private attributes (names starting
    with ``"_"``: caches and what the machine has, such as an optional decoder). Equal settings give equal
    descriptions in any process (no addresses, no ids).

    Args:
        obj: a transform (or any object).

    Returns:
        nested dicts / lists of str, int, float, bool and None.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return describe_transform(obj.value, _depth + 1, _seen)
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if arr.size <= _MAX_ELEMENTS:
            return {"array": str(arr.dtype), "values": arr.tolist()}
        digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]
        return {"array": str(arr.dtype), "shape": list(arr.shape), "sha256": digest}
    if isinstance(obj, (np.random.RandomState, np.random.Generator, torch.Generator)):
        return _name(obj)
    if isinstance(obj, type) or callable(obj) and not hasattr(obj, "__dict__"):
        return _name(obj)
    if _depth >= _MAX_DEPTH or id(obj) in _seen:
        return _name(obj)
    seen = _seen | {id(obj)}
    if isinstance(obj, (list, tuple)):
        return [describe_transform(o, _depth + 1, seen) for o in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((describe_transform(o, _depth + 1, seen) for o in obj), key=repr)
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: str(kv[0]))
        return {str(k): describe_transform(v, _depth + 1, seen) for k, v in items}
    if not hasattr(obj, "__dict__"):
        return _name(obj)
    if hasattr(obj, "__code__"):  # a function or lambda: its name (its closure is not part of a chain's settings)
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    attrs = {k: describe_transform(v, _depth + 1, seen) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
    return {"class": _name(obj), **attrs}


def transform_fingerprint(transform: Any) -> str:
    """The first 16 hex digits of the SHA-256 of :func:`describe_transform`: equal for chains built with equal
    settings, different when a setting that is stored on a transform differs (an image size, an HU window, a crop
    mode, a transform added or removed)."""
    text = json.dumps(describe_transform(transform), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
