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
"""Embeddings ``z = network.embed(x)`` of every image of a loader (the classifier's conditioning vectors)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from monai_condflow.utils.distributed import unwrap_model

__all__ = ["compute_embeddings"]


@torch.no_grad()
def compute_embeddings(
    network: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``z = network.embed(x)`` and labels of every batch of ``loader``, in eval mode without gradients.

    Use a loader that visits every item once in a fixed order (not a sharded distributed one). The network's
    training mode is restored afterwards.

    Args:
        network: a module with ``embed(x) -> z [B, D]`` (a DDP wrapper is unwrapped).
        loader: batches with ``image_key`` (and optionally ``label_key``).
        device: device of the forward pass.
        image_key: key of the images.
        label_key: key of the labels; batches without it give label ``-1``.

    Returns:
        ``(z, labels)``: ``float32`` ``[N, D]`` and ``int64`` ``[N]``, on CPU.
    """
    module = unwrap_model(network)
    if not callable(getattr(module, "embed", None)):
        raise TypeError(f"{type(module).__name__} has no `embed(x)` method.")
    device = torch.device(device)
    was_training = module.training
    module.eval()
    zs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            images = torch.as_tensor(batch[image_key]).to(device)
            z = module.embed(images).float().cpu()
            zs.append(z)
            if label_key in batch:
                labels.append(torch.as_tensor(batch[label_key]).reshape(-1).long().cpu())
            else:
                labels.append(torch.full((z.shape[0],), -1, dtype=torch.long))
    finally:
        module.train(was_training)
    if not zs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(zs), torch.cat(labels)
