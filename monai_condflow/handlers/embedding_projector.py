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
"""A handler that writes the classifier embeddings ``z`` to the TensorBoard projector.

Every ``every_n_epochs`` epochs (and when the run completes) the handler embeds a fixed loader with
``network.embed`` and calls ``SummaryWriter.add_embedding`` with the true labels and, optionally, the presumptive
labels of the semi-supervised step as metadata columns, so the class structure of ``z`` can be inspected in
TensorBoard's *Projector* tab.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_condflow.networks.embeddings import compute_embeddings
from monai_condflow.utils.distributed import get_rank

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch.utils.tensorboard import SummaryWriter
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )
    SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = ["EmbeddingProjectorHandler"]

logger = logging.getLogger(__name__)

UNLABELLED_NAME = "unlabelled"


class EmbeddingProjectorHandler:
    """Write ``network.embed(x)`` of a loader to the TensorBoard projector.

    Args:
        network: a module with ``embed(x) -> z [B, D]`` (DDP wrappers are unwrapped).
        loader: batches ``{"image", "label"}`` visited once, in a fixed order (labels ``< 0`` mean unlabelled).
        summary_writer: the writer to use; if ``None`` one is created in ``log_dir`` (and closed on completion).
        log_dir: directory of the created writer.
        tag: projector tag.
        every_n_epochs: write every this many epochs; the run's last epoch is always written.
        label_names: names of the class ids (a sequence or a dict); ids are written as numbers when ``None``.
        presumptive_labels: presumptive labels ``[N]`` in the loader's order, or a zero-argument callable returning
            them (e.g. the current labels of the label propagation); adds a ``presumptive`` metadata column.
        device: device of the forward pass; defaults to the first parameter's device.
        with_images: also send the images as projector thumbnails (``label_img``).
        image_key: key of the images in the batches.
        label_key: key of the labels in the batches.

    Example::

        projector = EmbeddingProjectorHandler(net, val_loader, log_dir="runs/clf", label_names=["non-COVID", "COVID"])
        projector.attach(trainer)
    """

    def __init__(
        self,
        network: torch.nn.Module,
        loader: Iterable,
        summary_writer: SummaryWriter | None = None,
        log_dir: str | None = None,
        tag: str = "embedding",
        every_n_epochs: int = 1,
        label_names: Sequence[str] | Mapping[int, str] | None = None,
        presumptive_labels: Sequence[int] | torch.Tensor | Callable[[], Any] | None = None,
        device: str | torch.device | None = None,
        with_images: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if summary_writer is None and log_dir is None:
            raise ValueError("EmbeddingProjectorHandler needs a summary_writer or a log_dir.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}.")
        self.network = network
        self.loader = loader
        self._writer = summary_writer
        self._internal_writer = summary_writer is None
        self.log_dir = log_dir
        self.tag = tag
        self.every_n_epochs = every_n_epochs
        self.label_names = label_names
        self.presumptive_labels = presumptive_labels
        self.device = device
        self.with_images = with_images
        self.image_key = image_key
        self.label_key = label_key
        self._last_written: tuple[int, int] | None = None  # (engine id, epoch)
        self._attached: set[int] = set()

    @property
    def summary_writer(self) -> SummaryWriter:
        """The writer (created lazily in ``log_dir`` when none was given)."""
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_COMPLETED(every=every_n_epochs)`` and ``COMPLETED`` (idempotent).

        Args:
            engine: a MONAI / Ignite engine (normally the classifier trainer).
        """
        if id(engine) in self._attached:
            return
        self._attached.add(id(engine))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_n_epochs), self)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _completed(self, engine: Engine) -> None:
        self(engine)
        if self._internal_writer and self._writer is not None:
            self._writer.close()

    def _name(self, label: int) -> str:
        if label < 0:
            return UNLABELLED_NAME
        if isinstance(self.label_names, Mapping):
            return str(self.label_names.get(label, label))
        if self.label_names is not None and label < len(self.label_names):
            return str(self.label_names[label])
        return str(label)

    def __call__(self, engine: Engine) -> None:
        """Embed the loader and write the projector entry at the engine's current epoch (rank 0 only)."""
        epoch = int(engine.state.epoch)
        if self._last_written == (id(engine), epoch) or get_rank() != 0:
            return
        self._last_written = (id(engine), epoch)
        self.write(global_step=epoch)

    def write(self, global_step: int | None = None) -> torch.Tensor:
        """Embed the loader and write one projector entry.

        Args:
            global_step: step of the entry (the epoch when called by the engine).

        Returns:
            The embeddings ``[N, D]`` that were written.

        Raises:
            ValueError: when the presumptive labels do not match the number of embedded samples.
        """
        device = self.device
        if device is None:
            first = next(iter(self.network.parameters()), None)
            device = first.device if first is not None else "cpu"
        z, labels = compute_embeddings(self.network, self.loader, device, self.image_key, self.label_key)
        metadata: list[Any] = [self._name(int(v)) for v in labels.tolist()]
        header = None
        presumptive = self.presumptive_labels() if callable(self.presumptive_labels) else self.presumptive_labels
        if presumptive is not None:
            presumptive_list = [int(v) for v in torch.as_tensor(presumptive).reshape(-1).tolist()]
            if len(presumptive_list) != z.shape[0]:
                raise ValueError(f"{len(presumptive_list)} presumptive labels for {z.shape[0]} embedded samples.")
            metadata = [[t, self._name(p)] for t, p in zip(metadata, presumptive_list)]
            header = ["label", "presumptive"]
        label_img = None
        if self.with_images:
            images = [torch.as_tensor(batch[self.image_key]).detach().float().cpu() for batch in self.loader]
            label_img = torch.cat(images).clamp(0, 1) if images else None
        self.summary_writer.add_embedding(
            z, metadata=metadata, label_img=label_img, global_step=global_step, tag=self.tag, metadata_header=header
        )
        self.summary_writer.flush()
        logger.info("wrote %d embeddings to the projector (tag %r, step %s)", z.shape[0], self.tag, global_step)
        return z
