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
"""Where the MONAI bundle that ships with the package lives, and how to read its configs from Python.

The bundle's configs are the one wiring of every stage: the pipeline runs them with ``monai.bundle run``, and the
Python builders (e.g. :func:`monai_condflow.engines.flow_trainer.create_flow_trainer`) parse the same files with
:func:`read_bundle_config` and override ids with Python objects.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = [
    "install_cause_hook",
    "root_cause",
    "BUNDLE_ROOT",
    "COMMON_CONFIG",
    "read_bundle_config",
    "check_command_line_ids",
    "config_file_ids",
    "closest_ids",
    "top_level_id",
]


def _find_bundle_root() -> Path:
    """The bundle shipped with the package: ``monai_condflow/bundle`` in an installed wheel (package data, see
    ``setup.py``), else the checkout's top-level ``bundle/`` (a source tree or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "bundle"
    if (packaged / "configs" / "metadata.json").is_file():
        return packaged
    return package.parent / "bundle"


BUNDLE_ROOT = _find_bundle_root()
"""The bundle (``configs/``, ``docs/``, ``LICENSE``) that ships with the package."""
COMMON_CONFIG = "common.json"
"""The config every stage stacks first: the shared ids (data, device, seed) and the ``records`` block."""


def read_bundle_config(files: Sequence[str], bundle_root: str | Path | None = None) -> ConfigParser:
    """A ``ConfigParser`` holding the bundle's ``configs/<file>`` for each of ``files``, stacked in order (later
    files override earlier ids, as ``monai.bundle run --config_file "[a, b]"`` does).

    Raises:
        FileNotFoundError: a config file is missing (the message names it).
    """
    folder = Path(BUNDLE_ROOT if bundle_root is None else bundle_root) / "configs"
    paths = [folder / name for name in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"bundle config not found: {path}")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    return parser


# names `python -m monai.bundle run` takes itself (monai.bundle.scripts.run and ConfigWorkflow), not config ids
_RUN_ARGUMENTS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
     "workflow_type", "properties_path", "bundle_root"}  # fmt: skip
)


def _command_line_names(argv: Sequence[str]) -> tuple[list[str], object, object]:
    """The ``--name`` options of a ``monai.bundle run`` command line and the values of ``--config_file`` and
    ``--tracking``."""
    names, values = [], {}
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        names.append(name)
        if name in ("config_file", "tracking"):
            values[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return names, values.get("config_file"), values.get("tracking")


def _tracking_ids(tracking: object) -> set[str] | None:
    """The ids that ``--tracking`` adds to the config (``mlflow``: MONAI's default MLflow settings; a settings file:
    its ``configs``), or ``None`` when they cannot be read."""
    if tracking is None:
        return set()
    if tracking == "mlflow":
        from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

        return set(DEFAULT_MLFLOW_SETTINGS["configs"])
    try:
        from monai.bundle import ConfigParser

        return set(ConfigParser.load_config_file(str(tracking)).get("configs", {}))
    except Exception:  # noqa: BLE001 - monai.bundle reports an unreadable settings file itself
        return None


def config_file_ids(files: Sequence[str | Path]) -> set[str] | None:
    """The top-level ids of bundle config files (JSON or YAML), or ``None`` when one cannot be read (``monai.bundle``
    reports that itself)."""
    from monai.bundle import ConfigParser

    ids: set[str] = set()
    for file in files:
        try:
            ids.update(str(k) for k in ConfigParser.load_config_file(str(file)))
        except Exception:  # noqa: BLE001 - a missing or unparsable file: not this check's to report
            return None
    return ids


def closest_ids(name: str, known: set[str]) -> str:
    """The end of an unknown-id message: ``"; did you mean 'a' or 'b'?"`` (the closest known ids), or ``"."``."""
    close = difflib.get_close_matches(name, sorted(known), n=3)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."


def top_level_id(name: str) -> str:
    """The first part of a nested id (``records#train`` or ``records::train`` -> ``records``)."""
    return name.split("::")[0].split("#")[0]


def root_cause(error: BaseException) -> BaseException:
    """The first error of a chain of ``raise ... from``: what MONAI's ``RuntimeError: Failed to evaluate
    ConfigExpression`` (and Ignite's re-raises) wrap."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _cause_last_hook(previous: Callable[..., Any]) -> Callable[..., None]:
    """A ``sys.excepthook`` that runs ``previous`` (the traceback), then names the root cause when it differs."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(exc_type, exc, tb)
        cause = root_cause(exc) if isinstance(exc, BaseException) else exc
        if cause is not exc and cause is not None:
            text = " ".join(str(cause).split())
            sys.stderr.write(
                f"\n[monai_condflow] the error behind the traceback above: {type(cause).__name__}: {text}\n"
            )
            sys.stderr.flush()

    hook.monai_condflow_cause_hook = True
    return hook


def install_cause_hook() -> None:
    """Make an uncaught error that wraps another (MONAI's config parser wraps every error of a config expression in
    ``RuntimeError: Failed to evaluate ConfigExpression`` and dumps the expression last) end with one line naming the
    error behind it, so the last line of a failed ``python -m monai.bundle run`` says what went wrong. Installed
    once per process (the traceback itself is printed as before)."""
    if not getattr(sys.excepthook, "monai_condflow_cause_hook", False):
        sys.excepthook = _cause_last_hook(sys.excepthook)


def check_command_line_ids(argv: Sequence[str] | None = None) -> bool:
    """Refuse an id on the ``python -m monai.bundle run`` command line that no config of the run defines (a typo
    such as ``--max_epoch 1`` was added as a new id and ignored: the stage trained its default 30 epochs). Returns
    True (also outside that command, or with ``--args_file``, whose ids are not on the command line) so configs can
    use it in ``check_config``. Under that command it first installs :func:`install_cause_hook` (every config calls
    this check first), so that a failed run ends with the error behind MONAI's wrapper.

    Args:
        argv: the command line (default ``sys.argv``); checked only when it is ``monai.bundle``'s ``run``.

    Raises:
        ConfigValueError: naming the unknown id, the config files and the closest known ids.
    """
    from monai_condflow.utils.checks import ConfigValueError

    argv = list(sys.argv if argv is None else argv)
    main = os.path.normpath(argv[0]) if argv else ""
    if not main.endswith(os.path.join("monai", "bundle", "__main__.py")) or argv[1:2] != ["run"]:
        return True
    install_cause_hook()
    names, config_file, tracking = _command_line_names(argv[2:])
    if config_file is None or "args_file" in names:
        return True
    files = config_file
    if isinstance(files, str):
        try:
            files = ast.literal_eval(files)
        except (ValueError, SyntaxError):
            files = [f for f in files.split(",") if f]
    files = [files] if isinstance(files, str) else list(files)
    known, in_files = _tracking_ids(tracking), config_file_ids(files)
    if known is None or in_files is None:
        return True
    known |= in_files
    for name in names:
        if name in _RUN_ARGUMENTS or top_level_id(name) in known or name.startswith("_meta_"):
            continue
        shown = ", ".join(Path(str(f)).name for f in files)
        raise ConfigValueError(
            f"config id '{name}' (--{name} on the command line) is in none of the configs of this run ({shown}), so "
            f"it would be ignored{closest_ids(name, known)}"
        )
    return True
