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
"""One writer per output folder, and no leftovers from a run with other settings.

- :class:`OutputFolderLock`: a lock file (``.lock``, ``fcntl.flock``; ``O_EXCL`` where there is no ``fcntl``)
  holding the writer's pid. A second process is refused with the pid of the first; the lock of a dead process is
  taken over (the kernel drops a ``flock`` with its process; with ``O_EXCL`` the pid is checked).
- :func:`check_run_settings`: the settings a folder was written with (``run_settings.json``: dataset, seed, lr,
  labels, hold-out ...) compared with this run's; a difference is refused with the setting named and the way to
  start fresh, so a checkpoint, a label list or a hold-out list from another run is never reused.
- :func:`open_run_folder`: both, plus ``fresh=True`` to delete the folder's run files first; what the bundle's
  ``initialize`` calls before any stage output is written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_condflow.handlers.checkpoint import remove_temp_files
from monai_condflow.utils.checks import check_flag
from monai_condflow.utils.distributed import get_rank
from monai_condflow.utils.io import atomic_write_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "SETTINGS_NAME",
    "OutputFolderLockedError",
    "RunSettingsError",
    "OutputFolderLock",
    "pid_alive",
    "lock_output_dir",
    "release_output_dir",
    "read_run_settings",
    "recorded_difference",
    "check_run_settings",
    "clear_run_files",
    "open_run_folder",
    "close_run_folder",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""Lock file of an output folder."""
SETTINGS_NAME = "run_settings.json"
"""Settings a folder's files were written with."""

_HELD: dict[str, OutputFolderLock] = {}


class OutputFolderLockedError(RuntimeError):
    """Another live process writes into this output folder."""


class RunSettingsError(ValueError):
    """The output folder holds files of a run with other settings."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputFolderLock:
    """An exclusive lock on an output folder, held by this process until :meth:`release` (or its exit).

    Re-entrant within one process (a stage that locks its folder and the trainer it builds share the lock); a
    second *process* is refused. Use :func:`lock_output_dir` to get it.

    Args:
        directory: the output folder (created if missing).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def _refuse(self, pid: str) -> None:
        raise OutputFolderLockedError(
            f"output folder {self.directory} is in use by another run (process {pid or '?'}, lock file {self.path}). "
            "Wait for it to finish, or write into another folder. If no such process runs, delete the lock file."
        )

    def acquire(self) -> OutputFolderLock:
        if self._depth > 0:
            self._depth += 1
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    self._refuse(pid)
                raise
            stale = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if stale:
                logger.info("took over the lock of %s left by process %s (no longer running).", self.directory, stale)
        else:  # pragma: no cover - no fcntl: O_EXCL and a pid check
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    break
                except FileExistsError:
                    pid = self.path.read_text(encoding="ascii", errors="replace").strip()
                    if pid.isdigit() and pid_alive(int(pid)):
                        self._refuse(pid)
                    logger.info("taking over the stale lock of %s (process %s is gone).", self.directory, pid)
                    self.path.unlink(missing_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        self._depth = 1
        return self

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
                if fcntl is None:  # pragma: no cover
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)  # drops the flock
        _HELD.pop(_key(self.directory), None)

    def __enter__(self) -> OutputFolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _key(directory: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(directory))


def lock_output_dir(directory: str | os.PathLike, rank: int | None = None) -> OutputFolderLock | None:
    """Lock ``directory`` for this process (re-entrant; see :class:`OutputFolderLock`). Only rank 0 locks under
    ``torchrun`` (the ranks of one run share its folder); other ranks get ``None``.

    Raises:
        OutputFolderLockedError: another live process holds the lock (the message names its pid).
    """
    if rank is None:
        rank = get_rank()
    if rank != 0:
        return None
    key = _key(directory)
    lock = _HELD.get(key) or OutputFolderLock(directory)
    lock.acquire()
    _HELD[key] = lock
    return lock


def release_output_dir(directory: str | os.PathLike) -> None:
    """Release one :func:`lock_output_dir` of this process on ``directory`` (no-op when it holds none)."""
    lock = _HELD.get(_key(directory))
    if lock is not None:
        lock.release()


def _normalise(value: Any) -> Any:
    """JSON-comparable form of a setting (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _holds_run_files(directory: Path) -> bool:
    """Whether ``directory`` holds a file other than the recorded settings and the lock (at any depth)."""
    return any(p.is_file() and p.name not in (SETTINGS_NAME, LOCK_NAME) for p in directory.rglob("*"))


def read_run_settings(directory: str | os.PathLike, section: str | None = None) -> dict[str, Any]:
    """The settings recorded in ``directory/run_settings.json`` (one ``section`` of them, or all sections); empty
    when the folder has none.

    Raises:
        RunSettingsError: the file cannot be read or parsed (the message names it and how to start fresh).
    """
    path = Path(directory) / SETTINGS_NAME
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunSettingsError(f"cannot read {path} ({e}); delete the folder {directory} to start fresh.") from e
    if not isinstance(recorded, dict):
        raise RunSettingsError(f"{path} holds no settings; delete the folder {directory} to start fresh.")
    if section is None:
        return recorded
    part = recorded.get(section)
    return dict(part) if isinstance(part, Mapping) else {}


def check_run_settings(
    directory: str | os.PathLike, settings: Mapping[str, Any], section: str = "run", fresh_hint: str | None = None
) -> dict[str, Any]:
    """Compare ``settings`` with those recorded in ``directory/run_settings.json`` and record them.

    Settings are grouped in sections (e.g. ``"trainer"`` for the trainer's own hyper-parameters, ``"stage"`` for
    what the bundle stage knows: dataset, labels, hold-out); only the given section is compared and replaced.
    ``max_epochs`` does not belong here (a resumed run may train longer).

    A folder that holds nothing but the recorded settings (and the lock), i.e. of a run that stopped before it
    wrote anything, has nothing to reuse: its settings are replaced (logged), not compared.

    Args:
        directory: the output folder.
        settings: name -> value (JSON-serialisable, or turned into strings).
        section: the group of settings.
        fresh_hint: how to start fresh, for the error message (default: delete the folder).

    Returns:
        the normalised settings.

    Raises:
        RunSettingsError: a recorded setting differs while the folder holds files of that run; the message names
            the setting, both values, and how to start fresh.
    """
    directory = Path(directory)
    path = directory / SETTINGS_NAME
    current = {str(k): _normalise(v) for k, v in settings.items()}
    recorded = read_run_settings(directory)
    before = recorded.get(section)
    if isinstance(before, Mapping):
        changed = {k: (before[k], v) for k, v in current.items() if k in before and before[k] != v}
        if changed and not _holds_run_files(directory):
            # a run that stopped before writing anything (e.g. refused by a later check): nothing of it would be
            # reused, so its settings do not bind this one
            logger.info("%s: the settings of an earlier run that left no files are replaced (%s).", path,
                        ", ".join(sorted(changed)))  # fmt: skip
            recorded = {}
        elif changed:
            detail = "; ".join(f"'{k}' was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            hint = fresh_hint or f"delete the folder {directory}"
            raise RunSettingsError(
                f"{directory} holds the files of a run with other settings ({detail}). Its checkpoints, label and "
                f"hold-out lists would be reused for this run. Rerun with the original settings to resume, write "
                f"into another output folder, or start fresh: {hint}."
            )
    if before != current:
        recorded[section] = current
        atomic_write_bytes(path, json.dumps(recorded, indent=2, sort_keys=True).encode("utf-8"))
    return current


def clear_run_files(directory: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """Delete the files (and folders) of ``directory`` matching the glob ``patterns``, and ``run_settings.json``.

    Returns:
        what was deleted.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for pattern in (*patterns, SETTINGS_NAME):
        for p in sorted(directory.glob(pattern)):
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.info("fresh start: removed %d file(s) of an earlier run from %s.", len(removed), directory)
    return removed


def open_run_folder(
    directory: str | os.PathLike,
    settings: Mapping[str, Any],
    *,
    fresh: bool = False,
    clear: Iterable[str] = ("*",),
    section: str = "stage",
    fresh_hint: str | None = None,
    fresh_folders: Iterable[str | os.PathLike] = (),
) -> OutputFolderLock | None:
    """Lock a stage's output folder, then start fresh (``fresh=True``) or check that it holds files of a run with
    the same ``settings`` (:func:`check_run_settings`); temp files of an interrupted save are deleted. Rank 0 does
    the work; other ranks return ``None``.

    Args:
        directory: the stage's folder (e.g. ``output_dir/flow``).
        settings: the stage's settings that its files depend on.
        fresh: delete the files matching ``clear`` (and the recorded settings) first.
        clear: glob patterns of the stage's files for ``fresh``.
        section: the settings group (see :func:`check_run_settings`).
        fresh_hint: how to start fresh, for the settings error (default: "delete the folder DIR or pass
            fresh=true", the bundle's config id).
        fresh_folders: other folders of the stage emptied too by ``fresh`` (its TensorBoard folder: the earlier
            run's event files would otherwise be drawn under the new run's curves).

    Returns:
        the lock (release it with :func:`close_run_folder`), or ``None`` on ranks other than 0.

    Raises:
        OutputFolderLockedError: another process writes into the folder.
        RunSettingsError: the folder holds files written with other settings.
    """
    check_flag(fresh, "fresh")
    lock = lock_output_dir(directory)
    if lock is None:
        return None
    try:
        if fresh:
            clear_run_files(directory, clear)
            for folder in fresh_folders:
                clear_run_files(folder, ("*",))
        remove_temp_files(directory)  # of a save that a kill interrupted
        hint = fresh_hint or (f"delete the folder {directory} or pass fresh=true (`--fresh True` on the "
                              "`python -m monai.bundle run` command line)")
        check_run_settings(directory, settings, section, fresh_hint=hint)
    except BaseException:
        lock.release()
        raise
    return lock


def close_run_folder(directory: str | os.PathLike) -> None:
    """Release the lock of :func:`open_run_folder` (bundle ``finalize``)."""
    release_output_dir(directory)


def _same_setting(a: Any, b: Any) -> bool:
    """Equal settings, numbers compared as numbers (``[40, 400]`` == ``[40.0, 400.0]``)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def recorded_difference(
    output_dir: str | os.PathLike,
    stages: Sequence[str],
    ids: dict[str, Any],
    same: Callable[[str, Any, Any], bool] | None = None,
) -> tuple[str, Path, str, Any, dict[str, Any]] | None:
    """The first of ``ids`` that differs from what a trained stage of the run recorded (``<stage>/run_settings.json``,
    section ``stage``); a stage that has not run, or did not record the id, is not compared.

    Args:
        output_dir: the run's folder.
        stages: the stage folders to compare with, in order.
        ids: the config's values, by id.
        same: ``(id, value, recorded) -> bool`` (default: :func:`_same_setting` of the two values).

    Returns:
        ``(stage, stage folder, id, value, recorded settings)``, or ``None`` when nothing differs.

    Raises:
        RunSettingsError: a stage's settings file cannot be read.
    """
    equal = same or (lambda _key, value, was: _same_setting(value, was))
    for stage in stages:
        folder = Path(output_dir) / stage
        recorded = read_run_settings(folder, "stage")
        for key, value in ids.items():
            if key in recorded and not equal(key, value, recorded[key]):
                return stage, folder, key, value, recorded
    return None
