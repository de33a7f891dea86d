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
Small helpers for data-parallel training launched by ``torchrun``.

Every helper also works in a plain single process (no process group), where it degrades to the
obvious single-rank behaviour, so engines can call them unconditionally.

Data order is deterministic: :func:`create_loader` always uses a seeded ``DistributedSampler``
(``num_replicas=1`` in a single process), whose permutation depends only on ``seed`` and the epoch.
MONAI workflows call ``sampler.set_epoch(epoch)`` for it at every epoch start. With ``world_size`` ranks and
a global batch ``B``, rank ``r`` receives the items at positions ``r, r + world_size, ...`` of each global
batch, so the union over ranks of an iteration's batches is exactly the single-process batch.

The collectives (all-reduce, all-gather of unequal lengths, broadcast, barrier) are Ignite's
(``ignite.distributed``), which MONAI's handlers and metrics use too. :func:`init_distributed` synchronises Ignite
with the new process group on every rank at once: Ignite's first look at a native group builds a helper group (a
collective), so a rank query must not be the first Ignite call from code that only rank 0 runs. The rank and world
size are therefore read from ``torch.distributed`` itself, which is safe anywhere.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ignite import distributed as idist
from monai.data import list_data_collate
from monai.data.utils import set_rnd, worker_init_fn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "init_distributed",
    "process_group_timeout",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "wrap_ddp",
    "unwrap_model",
    "create_loader",
    "any_across_ranks",
    "broadcast_module",
    "broadcast_tensor",
    "refresh_sampler",
    "all_gather_tensors",
    "barrier",
    "cleanup_distributed",
]

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

TIMEOUT_ENV = "MONAI_CONDFLOW_PG_TIMEOUT"
"""Environment variable: seconds a rank waits in a collective for the others before failing (default 600)."""
DEFAULT_TIMEOUT_S = 600.0


def process_group_timeout(timeout_s: float | None = None) -> timedelta:
    """The process-group timeout: ``timeout_s``, else ``$MONAI_CONDFLOW_PG_TIMEOUT``, else 600 s (not PyTorch's
    30 minutes), so that the other ranks fail soon after one rank stops (e.g. ``kill -STOP``) instead of waiting.

    Raises:
        ValueError: a value that is not a number > 0 (the message names its source).
    """
    source = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return timedelta(seconds=DEFAULT_TIMEOUT_S)
        source = f"environment variable {TIMEOUT_ENV}"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds > 0, got {raw!r}.") from None
    if not timeout_s > 0 or timeout_s == float("inf"):
        raise ValueError(f"{source} must be a number of seconds > 0, got {timeout_s!r}.")
    return timedelta(seconds=float(timeout_s))


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """
    Initialise the default process group from ``torchrun``'s environment variables.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks ``nccl`` when CUDA is available, else ``gloo``.
        timeout_s: how long a rank waits in a collective for the others (see :func:`process_group_timeout`;
            default ``$MONAI_CONDFLOW_PG_TIMEOUT`` or 600 s). A rank that stops without dying then makes the others
            fail after this time instead of PyTorch's 30 minutes.

    Returns:
        ``True`` when a process group is (now) initialised, ``False`` when the process was not launched
        distributed (no ``torchrun`` variables, or ``WORLD_SIZE`` is 1).
    """
    if is_distributed():
        return True
    if not dist.is_available() or any(v not in os.environ for v in _TORCHRUN_VARS):
        return False
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1:
        return False
    timeout = process_group_timeout(timeout_s)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # torchrun: keep every key of this attempt under its own prefix. The store outlives a worker restart, and
        # groups created again with the same names (e.g. Ignite's helper group) would otherwise read the dead
        # workers' addresses from the previous attempt and fail to connect.
        rank = int(os.environ["RANK"])
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        store = dist.TCPStore(
            host_name=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            world_size=world_size,
            is_master=not agent_store and rank == 0,
            timeout=timeout,
        )
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        prefixed = dist.PrefixStore(f"monai_condflow/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    idist.sync()  # every rank, now: Ignite's helper group is created collectively
    logger.info("initialised %s process group: rank %d of %d (timeout %.0f s)", backend, get_rank(), get_world_size(),
                timeout.total_seconds())  # fmt: skip
    return True


def is_distributed() -> bool:
    """``True`` when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """The global rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def wrap_ddp(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """
    Move ``model`` to ``device`` and wrap it in ``DistributedDataParallel`` when distributed.

    The DDP constructor broadcasts parameters and buffers from rank 0, so all ranks start equal. Run any
    data-dependent initialisation (ActNorm) before calling this.

    Args:
        model: the module to train.
        device: its device; CUDA devices are passed to DDP as ``device_ids``.

    Returns:
        the DDP wrapper, or ``model`` itself (on ``device``) in a single process.
    """
    device = torch.device(device)
    model = model.to(device)
    if not is_distributed():
        return model
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index], output_device=index)
    return DistributedDataParallel(model)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``model`` otherwise)."""
    while isinstance(model, (DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def create_loader(
    dataset: Dataset | Sequence,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
    config_key: str = "batch_size",
) -> DataLoader:
    """
    A deterministic ``DataLoader`` whose ``batch_size`` is the *global* batch.

    When distributed, each rank loads ``batch_size // world_size`` items through a seeded
    ``DistributedSampler``; in a single process the same sampler is used with one replica, so the data order of
    an epoch depends only on ``seed`` and the epoch number (MONAI workflows call ``set_epoch``). The dataset's MONAI
    random transforms (augmentation, dequantisation noise) are seeded from ``seed`` too, as MONAI's ``DataLoader``
    does; their states are saved for resume by :class:`~monai_condflow.handlers.checkpoint.LoaderRandomState`.

    Args:
        dataset: a map-style dataset (or a sequence of items).
        batch_size: global batch size; must be divisible by the world size.
        shuffle: shuffle every epoch (seeded).
        seed: seed of the permutation.
        num_workers: loader worker processes.
        drop_last: drop the incomplete last batch (and, when distributed, the tail that does not split evenly).
        collate_fn: batch collation, MONAI's ``list_data_collate`` by default.
        config_key: the config id that set ``batch_size``, named in the errors.

    Raises:
        ValueError: when ``batch_size`` is not positive or not divisible by the world size, or, with ``drop_last``,
            larger than the dataset (no complete batch: an epoch would be empty); the message names ``batch_size``
            and the dataset size.
    """
    world_size = get_world_size()
    if batch_size <= 0:
        raise ValueError(f"{config_key} must be positive, got {batch_size}.")
    if batch_size % world_size != 0:
        raise ValueError(f"the global {config_key} {batch_size} must be divisible by the world size {world_size}.")
    sampler = DistributedSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=world_size,
        rank=get_rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers == 0:
        # MONAI random transforms otherwise share one class-level RandomState seeded from OS entropy; in workers,
        # MONAI's worker_init_fn seeds them from the loader's generator (saved by LoaderRandomState for resume)
        set_rnd(dataset, seed)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=list_data_collate if collate_fn is None else collate_fn,
        generator=generator,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        persistent_workers=False,
    )
    if drop_last and len(loader) == 0:
        raise ValueError(
            f"{config_key} {batch_size} is larger than the training set ({len(dataset)} items"  # type: ignore[arg-type]
            f"{f' over {world_size} ranks' if world_size > 1 else ''}): with drop_last there is no complete batch. "
            f"Set the config id '{config_key}' to at most {len(dataset)}."  # type: ignore[arg-type]
        )
    return loader


def any_across_ranks(
    flag: bool | torch.Tensor | Sequence[bool], device: torch.device | str | None = None
) -> bool | list[bool]:
    """
    ``True`` on every rank when ``flag`` is true on at least one rank (an all-reduce with ``MAX``).

    A sequence of flags is reduced in the same single all-reduce and gives a list (one collective per training step
    however many decisions it needs). All ranks must call it the same number of times (it is a collective).

    Args:
        flag: this rank's flag, or a sequence of flags.
        device: device of the reduction tensor; defaults to the current CUDA device for ``nccl``, else CPU.
    """
    many = isinstance(flag, (list, tuple))
    values = [bool(f) for f in flag] if many else [bool(flag.item()) if isinstance(flag, torch.Tensor) else bool(flag)]
    if is_distributed():
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1 if v else 0 for v in values], dtype=torch.int32, device=device)
        t = idist.all_reduce(t, op="MAX")
        values = [bool(v) for v in t.tolist()]
    return values if many else values[0]


def refresh_sampler(loader: DataLoader) -> None:
    """After the loader's dataset changed length (``set_data`` of a ``CacheDataset``, as the semi-supervised rounds
    do), size its ``DistributedSampler`` for the new length as its constructor does (``num_samples`` per rank,
    ``total_size``); the sampler otherwise keeps the length it was built with and fails its own check (``Number of
    indices (48) does not match total_size (8)``). A loader with another sampler is left as it is.

    Args:
        loader: a loader from :func:`create_loader` (or any loader whose sampler is a ``DistributedSampler``).
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return
    n, replicas = len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
    if sampler.drop_last and n % replicas != 0:
        sampler.num_samples = math.ceil((n - replicas) / replicas)
    else:
        sampler.num_samples = math.ceil(n / replicas)
    sampler.total_size = sampler.num_samples * replicas


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (the tensor itself in a single process); every rank must
    pass a tensor of the same shape and dtype."""
    if not is_distributed():
        return tensor
    return idist.broadcast(tensor.contiguous(), src=src)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Broadcast every parameter and buffer of ``module`` from rank ``src`` (no-op in a single process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data.copy_(idist.broadcast(tensor.data, src=src))


def all_gather_tensors(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate (along dim 0, in rank order) ``tensor`` from every rank; the first dimension may differ by rank.

    Returns ``tensor`` itself in a single process.
    """
    if not is_distributed():
        return tensor
    sizes = idist.all_gather(torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device))
    shapes = [[int(n), *tensor.shape[1:]] for n in sizes.tolist()]
    return torch.cat(idist.all_gather_tensors_with_shapes(tensor.contiguous(), shapes), dim=0)


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if is_distributed():
        idist.barrier()


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialised, and return Ignite to its serial mode (so that a
    later process group in the same process is seen afresh)."""
    if not is_distributed():
        return
    if idist.model_name() == "native-dist":
        idist.finalize()  # destroys the group and resets Ignite's view of it
    else:
        dist.destroy_process_group()
