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
"""Redraw ``docs/figures/label_sweep_ucsd.png`` (and ``.pdf``) from the table of ``docs/results.md``.

The numbers come from the "UCSD label-scarcity sweep" table (TRTR / TSTR accuracy in %, mean +- std over the test
bootstraps and synthetic sets), so the figure always shows what the page says::

    python benchmarks/plot_label_sweep_ucsd.py [--results docs/results.md] [--out docs/figures/label_sweep_ucsd.png]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_condflow.evaluation.plots import label_sweep_chart

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## UCSD label-scarcity sweep"
_MEAN_STD = re.compile(r"^\s*([0-9.]+)\s*\+-\s*([0-9.]+)\s*$")


def _mean_std(cell: str) -> tuple[float, float]:
    m = _MEAN_STD.match(cell)
    if not m:
        raise ValueError(f"expected 'MEAN +- STD', got {cell!r}")
    return float(m.group(1)) / 100.0, float(m.group(2)) / 100.0


def read_sweep_table(results_md: Path) -> list[dict[str, Any]]:
    """Sweep rows (as :func:`~monai_condflow.evaluation.sweep.summarize_sweep` writes them, accuracies as fractions)
    from the UCSD sweep table of ``results_md``.

    Raises:
        ValueError: the section or its table is missing, or a cell cannot be read.
    """
    text = results_md.read_text(encoding="utf-8")
    if SECTION not in text:
        raise ValueError(f"{results_md} has no section {SECTION!r}")
    lines = text.split(SECTION, 1)[1].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| labels |")), None)
    if start is None:
        raise ValueError(f"no sweep table under {SECTION!r} in {results_md}")
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        trtr, trtr_std = _mean_std(cells["TRTR accuracy"])
        tstr, tstr_std = _mean_std(cells["TSTR accuracy"])
        rows.append(
            {
                "level": cells["labels"],
                "num_labels": int(cells["labelled images"]),
                "tstr_accuracy": tstr,
                "tstr_accuracy_std": tstr_std,
                "trtr_accuracy": trtr,
                "trtr_accuracy_std": trtr_std,
            }
        )
    if not rows:
        raise ValueError(f"the sweep table under {SECTION!r} in {results_md} has no rows")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md", help="the results page")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "figures" / "label_sweep_ucsd.png", help="PNG (a PDF goes beside)"
    )
    args = parser.parse_args(argv)
    rows = read_sweep_table(args.results)
    png = label_sweep_chart(args.out, rows, title="UCSD COVID-CT: accuracy against the number of labels")
    print(f"wrote {png} and {png.with_suffix('.pdf')} ({len(rows)} levels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
