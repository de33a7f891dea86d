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
Safe, atomic checkpoints and file writes.

Why not MONAI's ``CheckpointSaver`` alone: in MONAI 1.6.1 it builds Ignite's ``DiskSaver`` with ``atomic=False``
(a process killed mid-save leaves a truncated file under the final name), and Ignite's ``Checkpoint`` deletes
the oldest file *before* it writes the new one (a kill in between leaves bookkeeping that names a deleted file).
Here checkpoints are written by Ignite's ``Checkpoint`` with :class:`AtomicDiskSaver` (temp file in the same
folder, then ``os.replace``; old files are deleted only after the new one is in place, a missing file is no error,
and a symlink under a checkpoint name is replaced, never followed), and every load goes through
:func:`load_checkpoint` (``torch.load(..., weights_only=True)``). MONAI's ``CheckpointLoader`` also loads with
``weights_only=True`` and can be used on these files.

A checkpoint is a plain dict of state dicts (tensors, numbers, strings); :class:`RandomStateTracker` turns the
global random generators' states into such tensors so that a resumed run continues the same random streams, and
:class:`LoaderRandomState` does the same for a data loader's own generators and its random transforms.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import

from monai_condflow.utils.io import STATE_PREFIX, TEMP_SUFFIX, atomic_torch_save, atomic_write_bytes

Checkpoint, _ = optional_import("ignite.handlers", name="Checkpoint")
DiskSaver, _ = optional_import("ignite.handlers", name="DiskSaver", as_type="base")

__all__ = [
    "CheckpointError",
    "EPOCH_FILENAME_PATTERN",
    "atomic_write_bytes",
    "atomic_torch_save",
    "load_checkpoint",
    "load_module_weights",
    "find_latest_checkpoint",
    "AtomicDiskSaver",
    "create_checkpoint_handler",
    "prune_missing_files",
    "remove_temp_files",
    "RandomStateTracker",
    "LoaderRandomState",
]

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"[_=](\d+)\.pt$")  # "..._12.pt" (Ignite) and "..._epoch=12.pt" (MONAI CheckpointSaver)

EPOCH_FILENAME_PATTERN = "{filename_prefix}_{name}_epoch={global_step}.{ext}"
"""Ignite ``Checkpoint`` ``filename_pattern`` of the epoch checkpoints: ``state_checkpoint_epoch=3.pt`` for
``filename_prefix="state"`` and several objects, the name MONAI's ``CheckpointSaver`` gives its interval files (the
classifier's), so every stage's resumable state is ``state_checkpoint_epoch=N.pt``."""


class CheckpointError(RuntimeError):
    """A checkpoint file that is unreadable, truncated, or not a plain (weights-only) state dict."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """
    Load a checkpoint with ``torch.load(..., weights_only=True)``; nothing else is unpickled.

    Args:
        path: the ``.pt`` file.
        map_location: where to put the tensors.

    Raises:
        CheckpointError: when the file is missing, truncated, not a dict, or holds anything but plain
            tensors / containers / numbers / strings (e.g. an object with ``__reduce__``).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, OSError ...
        raise CheckpointError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of state dicts.")
    return obj


def load_module_weights(
    module: torch.nn.Module,
    path: str | os.PathLike,
    key: str = "network",
    fresh_prefixes: Sequence[str] = (),
    what: str = "checkpoint",
) -> torch.nn.Module:
    """Load the weights in ``path`` into ``module`` (in place), safely and completely.

    Loads with :func:`load_checkpoint` (``weights_only=True``). Every parameter and buffer of ``module`` must be in
    the file with the module's shape and the file must hold nothing else, except that names starting with one of
    ``fresh_prefixes`` (e.g. ``("head.",)`` for a classifier head with another number of classes) keep the module's
    own initialisation when their shape differs (logged), and that a buffer empty on one side (a sampling prior not
    yet fitted, :class:`~monai_condflow.networks.blocks.latent_prior.FittedLatentPrior`) takes the file's shape.

    Args:
        module: the network to fill.
        path: a checkpoint holding ``{key: state_dict}`` (what the stages write as ``model.pt``) or a bare state dict.
        key: the entry holding the state dict.
        fresh_prefixes: names allowed to stay freshly initialised when their shape differs.
        what: how error messages and logs call the file (e.g. ``"pretrained checkpoint"``).

    Returns:
        ``module``.

    Raises:
        CheckpointError: the file is missing, cannot be loaded safely, or does not fit ``module`` (the message names
            the file and the first offending keys).
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    state = checkpoint[key] if isinstance(checkpoint.get(key), dict) else checkpoint
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        k for k in own if k in state and (not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(own[k].shape))
    ]
    # a buffer left empty until fitted (FittedLatentPrior) takes the file's shape; its module checks it on loading
    mismatched = [k for k in mismatched if not (torch.is_tensor(state[k]) and 0 in (state[k].numel(), own[k].numel()))]
    kept = [k for k in mismatched if k.startswith(tuple(fresh_prefixes)) and torch.is_tensor(state[k])]
    problems = {
        "missing": missing,
        "unexpected": unexpected,
        "shape mismatch": [k for k in mismatched if k not in kept],
    }
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        text = "; ".join(f"{name}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                         for name, keys in problems.items())  # fmt: skip
        raise CheckpointError(f"{what} {path} does not fit the {type(module).__name__}: {text}.")
    try:
        module.load_state_dict({k: (own[k] if k in kept else state[k]) for k in own})
    except (ValueError, RuntimeError) as err:  # a module's own check (e.g. a fitted prior of another size)
        raise CheckpointError(f"{what} {path} does not fit the {type(module).__name__}: {err}") from err
    if kept:
        logger.info("%s %s loaded; kept the fresh initialisation of %s", what, path, ", ".join(kept))
    else:
        logger.info("%s %s loaded (%d tensors)", what, path, len(own))
    return module


def find_latest_checkpoint(
    directory: str | os.PathLike,
    prefix: str | Sequence[str] = STATE_PREFIX,
    map_location: str | torch.device = "cpu",
) -> tuple[Path, dict] | None:
    """
    The newest *valid* checkpoint named ``{prefix}_*_{step}.pt`` or ``{prefix}_*={step}.pt`` in ``directory``.

    Files are tried from the highest step down (the newest file first on a tie); a file that fails
    :func:`load_checkpoint` (partial, corrupt or unsafe) is logged and skipped, and so is a symlink (the savers never
    write one). Temp files (``*.tmp``, Ignite's ``tmp*``) never match the pattern.

    Args:
        directory: the folder.
        prefix: the file-name prefix (default :data:`~monai_condflow.utils.io.STATE_PREFIX`: the stages'
            ``state_checkpoint_epoch=N.pt``), or several prefixes whose files compete on their step (e.g. the
            flow's ``("state", "latest")``: older runs wrote ``latest_checkpoint_N.pt``).
        map_location: where the tensors are loaded.

    Returns:
        ``(path, checkpoint)`` or ``None`` when there is no valid checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    candidates = []
    for p in {p for pre in prefixes for p in directory.glob(f"{pre}_*.pt")}:
        m = _STEP_RE.search(p.name)
        if m is not None and p.is_symlink():
            logger.warning("skipping %s: a symlink, not a checkpoint this run wrote.", p)
        elif m is not None and p.is_file():
            candidates.append((int(m.group(1)), p.stat().st_mtime, p.name, p))
    for *_, p in sorted(candidates, reverse=True):
        try:
            return p, load_checkpoint(p, map_location=map_location)
        except CheckpointError as e:
            logger.warning("skipping invalid checkpoint: %s", e)
    return None


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that survives a kill at any instant of a checkpoint rotation.

    - Writes with :func:`atomic_torch_save` (temp file + fsync + ``os.replace``): a reader never sees a partial file,
      and a symlink under the checkpoint's name is replaced by the file, its target is never written.
    - ``remove`` (called by Ignite's ``Checkpoint`` *before* it writes the new file) only notes the file; it is
      deleted after the next file is in place, so a kill in between leaves one file too many, never one too few.
    - A file that is already gone is no error (bookkeeping restored from a checkpoint may name a deleted file).
    - With ``filename``, every save goes to that one name (e.g. ``model.pt``) and ``remove`` is a no-op: the next
      save replaces the file atomically.

    Only rank ``save_on_rank`` writes or deletes (as Ignite's ``DiskSaver``).

    Args:
        dirname: the folder (created if missing).
        filename: a fixed file name for every save, or ``None`` for the names ``Checkpoint`` chooses.
        save_on_rank: the rank that writes.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0) -> None:
        super().__init__(str(dirname), atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self.filename = filename
        self._pending_removal: list[str] = []

    def _is_writer(self) -> bool:
        from ignite import distributed as idist

        return idist.get_rank() == self.save_on_rank

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if not self._is_writer():
            return
        name = self.filename or filename
        atomic_torch_save(checkpoint, self.dirname / name)
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            if old != name:  # Ignite "removes" a name it is about to write again
                self._unlink(old)

    def remove(self, filename: str) -> None:
        if self.filename is None and self._is_writer():
            self._pending_removal.append(filename)

    def _unlink(self, filename: str) -> None:
        path = self.dirname / filename
        try:
            path.unlink()  # a symlink is removed itself, its target is left alone
        except FileNotFoundError:
            logger.info("checkpoint %s was already gone.", path)


def prune_missing_files(handler: Checkpoint) -> list[str]:
    """Drop the entries of a restored Ignite ``Checkpoint``'s bookkeeping whose file is gone.

    A kill between two steps of a rotation, or a user deleting a file, may leave the bookkeeping saved in a
    checkpoint naming a file that no longer exists; without its entry, the handler saves a new file when it is due
    (a missing best checkpoint is replaced by the next evaluation's) instead of comparing against a ghost.

    Returns:
        the names dropped.
    """
    dirname = Path(getattr(handler.save_handler, "dirname", "."))
    fixed = getattr(handler.save_handler, "filename", None)  # AtomicDiskSaver with one fixed name (e.g. model.pt)
    missing = [item.filename for item in handler._saved if not (dirname / (fixed or item.filename)).is_file()]
    if missing:
        handler._saved = [item for item in handler._saved if item.filename not in missing]
        logger.warning("checkpoint(s) %s named by the resumed bookkeeping are missing in %s: forgotten.",
                       ", ".join(missing), dirname)  # fmt: skip
    return missing


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files that an interrupted atomic save left in ``directory`` (ours: ``.<name>.*.tmp``; Ignite
    ``DiskSaver``'s: ``tmp*`` without an extension). They are never read; this only frees the space.

    Returns:
        the files deleted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        ours = p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)
        ignite = p.name.startswith("tmp") and "." not in p.name
        if (ours or ignite) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.info("removed %d temp file(s) of an interrupted save in %s.", len(removed), directory)
    return removed


def create_checkpoint_handler(
    to_save: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    prefix: str,
    n_saved: int | None = 1,
    score_function: Callable | None = None,
    score_name: str | None = None,
    global_step_transform: Callable | None = None,
    filename: str | None = None,
    **kwargs: Any,
) -> Checkpoint:
    """
    An Ignite ``Checkpoint`` writing atomically (:class:`AtomicDiskSaver`) to ``output_dir``; attach it with
    ``engine.add_event_handler(Events.EPOCH_COMPLETED, handler)``.

    Only rank 0 writes (Ignite's ``DiskSaver``); DDP / DataParallel modules are saved unwrapped.
    File names: ``{prefix}_{name}_{step}.pt``, or ``{prefix}_{name}_{step}_{score_name}={score}.pt`` with a score
    (``name`` is ``checkpoint`` when ``to_save`` has several objects), or ``filename`` for every save (e.g.
    ``model.pt``: the bookkeeping keeps the names above to tell the saves apart). ``kwargs`` go to Ignite's
    ``Checkpoint`` (e.g. ``filename_pattern``, ``include_self``).
    """
    saver = AtomicDiskSaver(str(output_dir), filename)
    return Checkpoint(
        dict(to_save),
        saver,
        filename_prefix=prefix,
        n_saved=n_saved,
        score_function=score_function,
        score_name=score_name,
        global_step_transform=global_step_transform,
        **kwargs,
    )


class RandomStateTracker:
    """
    ``state_dict`` / ``load_state_dict`` for the global random generators (torch CPU and CUDA, numpy, random),
    encoded as tensors and numbers so that checkpoints stay loadable with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, mt_state, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss),
            "numpy_cached_gaussian": float(np_cached),
            "python_version": int(version),
            "python_state": torch.tensor(mt_state, dtype=torch.int64),
            "python_gauss": float("nan") if gauss is None else float(gauss),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        np.random.set_state(
            (
                "MT19937",
                state["numpy_keys"].numpy().astype(np.uint32),
                int(state["numpy_pos"]),
                int(state["numpy_has_gauss"]),
                float(state["numpy_cached_gaussian"]),
            )
        )
        gauss = float(state["python_gauss"])
        random.setstate(
            (
                int(state["python_version"]),
                tuple(int(v) for v in state["python_state"].tolist()),
                None if np.isnan(gauss) else gauss,
            )
        )
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = state
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_dict(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return ("MT19937", keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def _random_transforms(root: Any, max_depth: int = 6) -> list[Any]:
    """Every MONAI ``Randomizable`` reachable from ``root`` through ``transforms`` lists and attributes, in a fixed
    order (``Compose`` members, then the wrapped array transforms of dictionary transforms)."""
    from monai.transforms import Randomizable

    found: list[Any] = []
    seen: set[int] = set()

    def _visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj)
        if isinstance(obj, (list, tuple)):
            for item in obj:
                _visit(item, depth + 1)
            return
        if not hasattr(obj, "__dict__") or isinstance(obj, (type, torch.Tensor, np.ndarray, torch.nn.Module)):
            return
        for name, value in sorted(vars(obj).items()):
            if name != "R" and (hasattr(value, "__dict__") or isinstance(value, (list, tuple))):
                _visit(value, depth + 1)

    _visit(root, 0)
    return found


class LoaderRandomState:
    """``state_dict`` / ``load_state_dict`` for the random streams a data loader owns.

    The global generators (:class:`RandomStateTracker`) are not all a loader draws from: its own ``generator``
    (shuffling, worker seeds), its sampler's ``generator``, and the ``R`` of every MONAI random transform of its
    dataset (augmentation, the flow's dequantisation noise) advance with each epoch. Saved with the epoch's
    checkpoint and restored before the next epoch, they make a resumed run draw what the uninterrupted run draws.
    Tensors and numbers only (``weights_only=True`` loads it).

    Args:
        loader: a ``torch.utils.data.DataLoader`` (MONAI's included); its ``dataset.transform`` is searched for
            random transforms. With ``num_workers > 0`` the workers' transforms are seeded from the loader's
            generator, which is saved.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"loader": getattr(self.loader, "generator", None)}
        gens["sampler"] = getattr(getattr(self.loader, "sampler", None), "generator", None)
        gens["batch_sampler"] = getattr(getattr(getattr(self.loader, "batch_sampler", None), "sampler", None),
                                        "generator", None)  # fmt: skip
        return {k: g for k, g in gens.items() if isinstance(g, torch.Generator)}

    def _transforms(self) -> list[Any]:
        dataset = getattr(self.loader, "dataset", None)
        return _random_transforms(getattr(dataset, "transform", None))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"generator_{k}": g.get_state() for k, g in self._generators().items()}
        state["transforms"] = [_numpy_state_to_dict(t.R.get_state()) for t in self._transforms()]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, g in self._generators().items():
            if f"generator_{k}" in state:
                g.set_state(state[f"generator_{k}"].cpu())
        transforms = self._transforms()
        saved = list(state.get("transforms", []))
        if len(saved) != len(transforms):
            raise ValueError(
                f"the checkpoint holds the states of {len(saved)} random transforms but the loader has "
                f"{len(transforms)}: the data pipeline changed since the run was saved; start it fresh."
            )
        for t, s in zip(transforms, saved):
            t.R.set_state(_numpy_state_from_dict(s))
