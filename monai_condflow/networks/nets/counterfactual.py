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
"""Target conditions for counterfactuals of :meth:`ConditionalGlow.counterfactual`: the class centroid in z-space
or the z of the nearest real image of the target class.

``z`` is an l2-normalised embedding (``PEPXNet.embed``), so a centroid is the normalised mean of a class's
embeddings and "nearest" is by cosine similarity.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TARGET_MODES", "class_centroids", "nearest_of_class", "target_conditions", "restrict_change"]

TARGET_MODES: tuple[str, ...] = ("centroid", "nearest")
"""How :func:`target_conditions` picks the target ``z``."""


def class_centroids(z: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """l2-normalised mean embedding of every class.

    Args:
        z: ``[N, D]`` embeddings.
        labels: ``[N]`` class ids in ``[0, num_classes)``.
        num_classes: number of classes ``K``.

    Returns:
        ``[K, D]``, unit rows.

    Raises:
        ValueError: a class without any embedding, or mismatched shapes.
    """
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"class_centroids expects z [N, D] and labels [N], got {list(z.shape)} and "
                         f"{list(labels.shape)}.")  # fmt: skip
    labels = labels.to(z.device).long()
    rows = []
    for c in range(num_classes):
        sel = labels == c
        if not bool(sel.any()):
            raise ValueError(f"class_centroids: class {c} has no embedding.")
        rows.append(z[sel].mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def nearest_of_class(query: Tensor, bank: Tensor, bank_labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """For every query, the most similar (cosine) bank embedding whose label is the query's target class.

    Args:
        query: ``[B, D]``.
        bank: ``[N, D]`` embeddings of real images.
        bank_labels: ``[N]``.
        target: ``[B]`` target class of each query.

    Returns:
        ``(z [B, D], index [B])``: the chosen bank rows and their indices in ``bank``.

    Raises:
        ValueError: a target class absent from the bank.
    """
    bank_labels = bank_labels.to(bank.device).long()
    target = target.to(bank.device).long()
    missing = set(target.tolist()) - set(bank_labels.tolist())
    if missing:
        raise ValueError(f"nearest_of_class: no bank embedding of class(es) {sorted(missing)}.")
    q = torch.nn.functional.normalize(query.to(bank.device, bank.dtype), dim=1)
    b = torch.nn.functional.normalize(bank, dim=1)
    sim = q @ b.T  # [B, N]
    sim = sim.masked_fill(bank_labels[None, :] != target[:, None], float("-inf"))
    index = sim.argmax(1)
    return bank[index], index


def target_conditions(
    z: Tensor, target: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, mode: str = "centroid"
) -> Tensor:
    """Target conditions ``[B, D]`` for counterfactuals of images with embeddings ``z`` ``[B, D]`` towards classes
    ``target`` ``[B]``: the class centroid of ``bank`` (``mode="centroid"``) or the nearest bank embedding of the
    target class (``mode="nearest"``).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode == "centroid":
        return class_centroids(bank, bank_labels, num_classes)[target.to(bank.device).long()].to(z.dtype)
    if mode == "nearest":
        return nearest_of_class(z, bank, bank_labels, target)[0].to(z.dtype)
    raise ValueError(f"unknown counterfactual target mode {mode!r}; available: {list(TARGET_MODES)}.")


def restrict_change(source: Tensor, counterfactual: Tensor, mask: Tensor) -> Tensor:
    """Keep a counterfactual's change only where ``mask`` allows it: ``source + mask * (counterfactual - source)``.

    Args:
        source: ``[B, C, *spatial]``.
        counterfactual: same shape.
        mask: weights in ``[0, 1]``, broadcastable to ``source``'s shape (e.g. ``[B, 1, *spatial]`` lung masks); moved
            to the source's device and dtype.

    Returns:
        Tensor of the source's shape: the source where ``mask`` is 0, the counterfactual where it is 1.

    Raises:
        ValueError: mismatched shapes (a mask that would enlarge the output included), or mask values outside
            ``[0, 1]`` or NaN.
    """
    if counterfactual.shape != source.shape:
        raise ValueError(f"restrict_change: source {list(source.shape)} and counterfactual "
                         f"{list(counterfactual.shape)} differ in shape.")  # fmt: skip
    try:
        fits = torch.broadcast_shapes(mask.shape, source.shape) == source.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"restrict_change: mask {list(mask.shape)} does not broadcast to {list(source.shape)}.")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("restrict_change: mask values must lie in [0, 1] (no NaN).")
    mask = mask.to(source)
    return source + mask * (counterfactual - source)
