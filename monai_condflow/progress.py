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
"""Progress lines with counts and ETA for the long loops outside the Ignite trainers.

The trainers log every epoch already (MONAI's ``StatsHandler``); the loops between them (image generation, the
evaluation's classifier trainings, the augmentation study, the label sweep, phantom rendering) report through
:class:`ProgressLog`: one ``INFO`` line such as ``generation: 96/400 images (24 %), 31 s elapsed, ETA 98 s`` at most
every ``interval`` seconds and one when the loop ends. Plain log lines, not a redrawn bar, so that they read well in
files and CI logs.

Off switches: the ``progress`` id of ``generate.json`` / ``evaluate.json`` (``--progress False`` on the bundle
command line), ``--no-progress`` of the pipeline and sweep command lines, or the environment variable
``CONDFLOW_PROGRESS=0`` (``scripts/run_tests.sh`` sets it, so CI logs carry no progress lines).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

__all__ = ["ENV_VAR", "ProgressLog", "progress_enabled"]

ENV_VAR = "CONDFLOW_PROGRESS"
"""Environment variable: ``0`` / ``false`` / ``no`` / ``off`` turns every progress line off."""

_logger = logging.getLogger("monai_condflow.progress")


def progress_enabled(requested: bool = True) -> bool:
    """``requested`` unless the environment variable :data:`ENV_VAR` turns progress off."""
    return bool(requested) and os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _seconds(s: float) -> str:
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class ProgressLog:
    """Counts work done out of ``total`` and logs ``desc: done/total unit (pct), elapsed, ETA`` lines.

    Args:
        total: amount of work (images, trainings, levels...); ``0`` logs nothing.
        desc: what the loop does, at the start of every line.
        unit: name of the counted things.
        enabled: ``False`` logs nothing (see :func:`progress_enabled` for the environment switch).
        interval: least number of seconds between two lines (the last line is always logged).
        log: where the lines go (default: the ``monai_condflow.progress`` logger at ``INFO``).
        clock: time source (seconds), for tests.

    Example::

        with ProgressLog(len(batches), "generation", unit="batches") as progress:
            for batch in batches:
                ...
                progress.update()
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "",
        enabled: bool = True,
        interval: float = 10.0,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = f" {unit}" if unit else ""
        self.enabled = progress_enabled(enabled) and self.total > 0
        self.interval = float(interval)
        self._log = log if log is not None else _logger.info
        self._clock = clock
        self.done = 0
        self._start = clock()
        self._last = self._start
        self.lines: list[str] = []

    def line(self) -> str:
        """The current progress line."""
        elapsed = self._clock() - self._start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total}{self.unit} ({pct:.0f} %), {_seconds(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {_seconds(elapsed * (self.total - self.done) / self.done)}"
        return text

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; log a line when ``interval`` has passed or the work is complete."""
        self.done = min(self.done + int(n), self.total)
        if not self.enabled:
            return
        now = self._clock()
        if self.done >= self.total or now - self._last >= self.interval:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        text = self.line()
        if self.lines and self.lines[-1] == text:
            return
        self.lines.append(text)
        self._log(text)

    def close(self) -> None:
        """Log the final line if the loop stopped early (an exception or a ``break``)."""
        if self.enabled and self.done < self.total:
            self._emit()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
