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
"""Errors raised on bad input data, and the report filled in by readers in skip mode.

Every reader takes ``on_error="raise" | "skip"``. In ``"raise"`` mode the first problem raises a
:class:`DataError` whose message starts with the source (``file:line``, ``file#index`` or a path). In ``"skip"``
mode the bad entry is left out, a warning with the count and reasons is logged once per call, and the problems
are recorded in an optional :class:`ReadReport`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DataError", "ReadReport", "ON_ERROR_MODES", "check_on_error"]

ON_ERROR_MODES = ("raise", "skip")


class DataError(ValueError):
    """Bad input data: malformed annotation line, unknown class id, bad box, unreadable or invalid image.

    The message starts with ``source`` (``file:line``, ``file#index`` or a path) so the bad entry can be found.

    Args:
        message: what is wrong.
        source: where it is wrong; prefixed to the message when given.
        reason: a short category used to count problems in skip mode (e.g. ``"missing file"``).
    """

    def __init__(self, message: str, source: str | None = None, reason: str = "invalid entry") -> None:
        self.source = source
        self.reason = reason
        self.detail = message
        super().__init__(f"{source}: {message}" if source else message)


@dataclass
class ReadReport:
    """What a reader read and what it skipped.

    Attributes:
        n_read: number of records returned.
        skipped: ``(source, message)`` for every entry left out, in reading order.
        reasons: the reason category of every skipped entry, parallel to ``skipped``.
    """

    n_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        """Number of entries left out."""
        return len(self.skipped)

    @property
    def counts(self) -> dict[str, int]:
        """Number of skipped entries per reason category."""
        return dict(Counter(self.reasons))

    def add(self, error: DataError) -> None:
        """Record a skipped entry.

        Args:
            error: the problem found; its ``source``, ``detail`` and ``reason`` are stored.
        """
        self.skipped.append((error.source or "", error.detail))
        self.reasons.append(error.reason)

    def merge(self, other: ReadReport) -> None:
        """Add the counts and skipped entries of ``other`` to this report."""
        self.n_read += other.n_read
        self.skipped.extend(other.skipped)
        self.reasons.extend(other.reasons)

    def log_summary(self, logger: logging.Logger, what: str) -> None:
        """Log one warning with the number of skipped entries per reason (nothing when none were skipped).

        Args:
            logger: where to log.
            what: the input read (a file or folder name), used in the message.
        """
        if not self.skipped:
            return
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        first = self.skipped[0]
        logger.warning(
            "%s: skipped %d bad entr%s (%s); read %d. First: %s: %s",
            what,
            self.n_skipped,
            "y" if self.n_skipped == 1 else "ies",
            detail,
            self.n_read,
            first[0],
            first[1],
        )


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` argument.

    Args:
        on_error: ``"raise"`` or ``"skip"``.

    Returns:
        ``on_error`` unchanged.

    Raises:
        ValueError: for any other value.
    """
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}.")
    return on_error
