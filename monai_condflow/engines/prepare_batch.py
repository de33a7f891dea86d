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
Prepare-batch for the conditional flow: the image plus its condition ``z`` (the frozen classifier's embedding).

``z`` comes either from the batch (key ``condition``: embeddings cached once with :func:`cache_embeddings` and put
into the records with :func:`attach_conditions`) or from a frozen classifier's ``embed(x)`` computed on the fly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.engines.utils import PrepareBatch
from torch.utils.data import DataLoader

from monai_condflow.utils.checks import check_flag

__all__ = [
    "ConditionPrepareBatch",
    "EmbeddingPrepareBatch",
    "compute_condition",
    "cache_embeddings",
    "attach_conditions",
]

logger = logging.getLogger(__name__)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.as_tensor() if hasattr(value, "as_tensor") else value
    return torch.as_tensor(np.asarray(value))


def compute_condition(
    classifier: torch.nn.Module, images: torch.Tensor, modules: Sequence[torch.nn.Module] | None = None
) -> torch.Tensor:
    """
    ``classifier.embed(images)`` in eval mode without gradients (the classifier stays frozen).

    A classifier with a module in training mode is put in eval mode and its mode restored afterwards; one already
    in eval mode everywhere (the frozen classifier of the flow stage) is left alone, since ``eval()`` and ``train()``
    walk every module (~3 ms of host time per batch for the ``paper`` PEPXNet on a 2-core machine).

    Args:
        classifier: a network with ``embed(x) -> [B, condition_dim]``.
        images: ``[B, C, H, W]`` on the classifier's device.
        modules: ``list(classifier.modules())``, when the caller keeps it (a walk costs ~0.5 ms per batch).
    """
    if not any(m.training for m in (classifier.modules() if modules is None else modules)):
        with torch.no_grad():
            return classifier.embed(images).detach()
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            z = classifier.embed(images)
    finally:
        classifier.train(was_training)
    return z.detach()


class ConditionPrepareBatch(PrepareBatch):
    """
    Returns ``(image, label, (condition,), {})`` so that the network is called as ``network(image, condition)``
    (the MONAI inferer passes the extra positional arguments on), as ``DiffusionPrepareBatch`` does for diffusion.

    Args:
        classifier: a frozen network with ``embed(x) -> [B, condition_dim]``; used when the batch has no
            ``condition_key`` (or always, when ``prefer_batch_condition=False``). It is moved to the batch device
            once, put in eval mode and its parameters get ``requires_grad=False``.
        image_key: key of the image ``[B, C, H, W]``.
        label_key: key of the class labels (returned as the target when present, else ``None``).
        condition_key: key of precomputed embeddings ``[B, condition_dim]``.
        prefer_batch_condition: use the batch's ``condition_key`` when present (default) rather than the classifier.
        cuda_graphs: on a GPU, replay the classifier's embedding as a CUDA graph
            (:class:`~monai_condflow.utils.cuda_graphs.GraphedCall`), recorded at the first batch computed by the
            classifier in eval mode, for that batch's shape (other shapes, such as a smaller last batch, and the CPU
            run eagerly; a failed recording logs a warning and runs eagerly). The bundle's ``cuda_graphs`` id sets it
            with the flow's graphed training step: the frozen classifier's hundreds of small kernels per batch are
            then one launch too.

    Raises:
        KeyError: at call time, when there is neither a ``condition_key`` in the batch nor a classifier.
        ValueError: ``cuda_graphs`` is not a bool.

    Example::

        trainer = FlowTrainer(..., prepare_batch=ConditionPrepareBatch(classifier=pepx_net))
    """

    def __init__(
        self,
        classifier: torch.nn.Module | None = None,
        image_key: str = "image",
        label_key: str = "label",
        condition_key: str = "condition",
        prefer_batch_condition: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        check_flag(cuda_graphs, "cuda_graphs")
        self.classifier = classifier
        self.image_key = image_key
        self.label_key = label_key
        self.condition_key = condition_key
        self.prefer_batch_condition = prefer_batch_condition
        self._walked: tuple | None = None  # (classifier, its modules), collected at the first batch
        self.cuda_graphs = cuda_graphs
        self._graphed: tuple | None = None  # (classifier, GraphedCall)
        self._graphed_weights: Any = None  # WeightsWatch of the classifier's weights the graph reads
        self._graph_failed = False
        if classifier is not None:
            classifier.eval()
            classifier.requires_grad_(False)

    def get_condition(
        self, batchdata: Mapping[str, Any], images: torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """The condition of ``images`` (already on ``device``): from the batch, or computed by the classifier."""
        has_key = self.condition_key in batchdata
        if has_key and (self.prefer_batch_condition or self.classifier is None):
            return _as_tensor(batchdata[self.condition_key]).to(device=images.device, dtype=images.dtype)
        if self.classifier is None:
            raise KeyError(
                f"batch has no '{self.condition_key}' key (keys: {sorted(batchdata)}) and no classifier was given "
                "to compute the condition."
            )
        param = next(self.classifier.parameters(), None)
        if param is not None and param.device != images.device:
            self.classifier.to(images.device)
            self._graphed = None  # recorded for the weights where they were
        walked = self._walked
        if walked is None or walked[0] is not self.classifier:
            walked = self._walked = (self.classifier, list(self.classifier.modules()))
        if self.cuda_graphs and images.is_cuda and not any(m.training for m in walked[1]):
            z = self._graphed_embedding(images)
            if z is not None:
                return z.to(dtype=images.dtype)
        return compute_condition(self.classifier, images, walked[1]).to(dtype=images.dtype)

    def _graphed_embedding(self, images: torch.Tensor) -> torch.Tensor | None:
        """The classifier's embedding of ``images`` by graph replay, or ``None`` (run it eagerly) for a shape other
        than the recorded one or after a failed recording."""
        from monai_condflow.utils.cuda_graphs import GraphedCall, WeightsWatch, signature

        # the graph reads the weights where they were at recording: another classifier, or a weight or buffer of
        # this one moved, replaced or written (``.to()``, ``.half()``, ``load_state_dict``), needs a new recording
        # (the same watch as the flow's decoder graphs; ~0.25 ms per batch for the ``paper`` PEPXNet on the CPU);
        # so do other numeric settings (autocast, TF32: the graph replays the kernels chosen at recording)
        device_type = images.device.type
        if self._graphed is not None and (
            self._graphed[0] is not self.classifier or self._graphed_weights.changed(self.classifier, device_type)
        ):
            self._graphed = None
        if self._graphed is None:
            if self._graph_failed:
                return None
            try:
                graphed = GraphedCall(self.classifier.embed, images, name="classifier embedding")
                self._graphed_weights = WeightsWatch()
                self._graphed_weights.changed(self.classifier, device_type)  # the reference: what the graph reads
                self._graphed = (self.classifier, graphed)
            except Exception as e:  # an operation that cannot be captured: stay eager, say so once
                self._graph_failed = True
                logger.warning("CUDA graphs: could not record the classifier's embedding (%s: %s); running it eagerly.",
                               type(e).__name__, e)  # fmt: skip
                return None
        graphed = self._graphed[1]
        return graphed(images) if signature(images) == graphed.sig else None

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor], dict]:
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"ConditionPrepareBatch expects a dict batch, got {type(batchdata).__name__}.")
        if self.image_key not in batchdata:
            raise KeyError(f"batch has no '{self.image_key}' key (keys: {sorted(batchdata)}).")
        images = _as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        labels = batchdata.get(self.label_key)
        if labels is not None:
            labels = _as_tensor(labels).to(device=device, non_blocking=non_blocking)
        condition = self.get_condition(batchdata, images, device)
        return images, labels, (condition,), {}


def cache_embeddings(
    classifier: torch.nn.Module,
    data: DataLoader | Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    image_key: str = "image",
) -> torch.Tensor:
    """
    Embed every item once with the frozen classifier (eval mode, no gradients), in data order.

    Args:
        classifier: network with ``embed(x) -> [B, condition_dim]``.
        data: a non-shuffling ``DataLoader`` of dict batches, or a sequence (e.g. a MONAI ``Dataset``) of dict items
            whose ``image_key`` is a ``[C, H, W]`` tensor / array (batched here with ``batch_size``).
        device: where to run the classifier.
        batch_size: batch size when ``data`` is a sequence.
        image_key: key of the image.

    Returns:
        ``[N, condition_dim]`` float32 embeddings on the CPU, row ``i`` for item ``i``.
    """
    if not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=list_data_collate)  # type: ignore
    classifier = classifier.to(device)
    chunks = []
    for batch in data:
        images = _as_tensor(batch[image_key]).to(device)
        chunks.append(compute_condition(classifier, images).float().cpu())
    if not chunks:
        raise ValueError("cache_embeddings got no data.")
    return torch.cat(chunks, dim=0)


def attach_conditions(
    records: Sequence[Mapping[str, Any]], embeddings: torch.Tensor | np.ndarray, key: str = "condition"
) -> list[dict]:
    """
    New records (shallow copies) with ``key`` set to the row of ``embeddings`` (a float32 numpy array).

    Raises:
        ValueError: when the number of records and embeddings differ.
    """
    emb = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if len(records) != emb.shape[0]:
        raise ValueError(f"{len(records)} records but {emb.shape[0]} embeddings.")
    return [{**dict(r), key: emb[i].astype(np.float32)} for i, r in enumerate(records)]


class EmbeddingPrepareBatch(PrepareBatch):
    """Returns ``(z, label, (), {})`` with ``z = classifier.embed(image)``: the network is called as ``network(z)``.

    ``inference.json`` uses it to feed a :class:`~monai_condflow.networks.nets.FlowSampler` the conditions of real
    images (the paper's "same z" generation). The images' metadata (source file names) stays behind.

    Args:
        classifier: the frozen classifier with ``embed(x) -> z``.
        image_key: key of the images in the batch.
        label_key: key of the class labels (returned as the target when present, else ``None``).
    """

    def __init__(self, classifier: torch.nn.Module, image_key: str = "image", label_key: str = "label") -> None:
        self.classifier = classifier
        self.image_key = image_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        """``(z [B, D], label [B] or None, (), {})`` on ``device``."""
        images = _as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking)
        z = compute_condition(self.classifier, images)
        label = batchdata.get(self.label_key)
        label = None if label is None else _as_tensor(label).to(device=device, non_blocking=non_blocking)
        return z, label, (), {}
