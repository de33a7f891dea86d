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
"""Issue 16: matplotlib charts: full legend names, error bars, the label sweep on a log axis of label counts, a PDF
beside every PNG, and the docs figure redrawn from the numbers of docs/results.md."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.container import ErrorbarContainer
from PIL import Image

from monai_condflow.evaluation.plots import (
    bar_chart,
    bar_figure,
    image_grid,
    label_sweep_figure,
    line_chart,
    line_figure,
)

ROOT = Path(__file__).resolve().parents[2]
LONG = "flow synthetic (TSTR), temperature 0.9, 2 sets"


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_line_figure_keeps_long_names_and_draws_error_bars():
    fig = line_figure(
        {LONG: ([0, 25, 50], [0.5, 0.6, 0.7]), "real": ([0, 25, 50], [0.6, 0.6, 0.6])},
        "t",
        "x",
        "y",
        errors={LONG: [0.01, 0.02, None]},
    )
    assert _legend(fig) == [LONG, "real"]
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and fig.axes[0].get_xscale() == "linear"


def test_bar_figure_names_and_error_bars():
    series = {"real (TRTR)": [0.7, 0.6], "ACGAN synthetic (TSTR)": [0.5, float("nan")]}
    fig = bar_figure(["accuracy", "f1"], series, {"real (TRTR)": [0.02, 0.03]}, "TRTR vs TSTR", "score")
    ax = fig.axes[0]
    assert _legend(fig) == list(series)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["accuracy", "f1"]
    assert any(c.errorbar is not None for c in ax.containers if hasattr(c, "errorbar"))


def test_label_sweep_is_against_the_label_count_on_a_log_axis():
    rows = [  # in the sweep's order, not sorted; "all" without a count takes n_all
        {"level": "all", "num_labels": None, "tstr_accuracy": 0.57, "tstr_accuracy_std": 0.04, "trtr_accuracy": 0.65},
        {"level": "50", "num_labels": 50, "tstr_accuracy": 0.59, "tstr_accuracy_std": 0.03, "trtr_accuracy": 0.56},
        {"level": "1pct", "num_labels": 4, "tstr_accuracy": 0.54, "tstr_accuracy_std": 0.03, "trtr_accuracy": 0.49},
    ]
    fig = label_sweep_figure(rows, n_all=425)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "labelled training images" in ax.get_xlabel()
    assert _legend(fig) == ["flow synthetic (TSTR)", "real (TRTR)"]
    xs = [line.get_xdata() for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert [pytest.approx(list(x), rel=0.05) for x in xs[:1]] == [[4, 50, 425]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "50", "425\n(all)"]
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2
    assert len(label_sweep_figure(rows).axes[0].get_lines()[0].get_xdata()) == 2  # no n_all: "all" left out


def test_charts_write_a_png_and_a_pdf_beside_it(tmp_path: Path):
    old = os.umask(0o022)
    try:
        png = line_chart(tmp_path / "f" / "curve.png", {LONG: ([1, 2, 3], [3.0, 2.0, 1.5])}, "t", "step", "loss")
        bars = bar_chart(tmp_path / "f" / "bars.png", ["a"], {"x": [1.0]}, {"x": [0.1]}, "t", "y")
    finally:
        os.umask(old)
    for path in (png, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert (path.stat().st_mode & 0o777) == 0o644 and (path.with_suffix(".pdf").stat().st_mode & 0o777) == 0o644
        with Image.open(path) as im:
            assert im.width >= 600 and im.height >= 400
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["bars.pdf", "bars.png", "curve.pdf", "curve.png"]


def _script():
    spec = importlib.util.spec_from_file_location(
        "plot_label_sweep_ucsd", ROOT / "benchmarks" / "plot_label_sweep_ucsd.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_label_sweep_figure_is_drawn_from_the_results_table(tmp_path: Path):
    script = _script()
    rows = script.read_sweep_table(ROOT / "docs" / "results.md")
    assert [r["num_labels"] for r in rows] == [425, 50, 20, 21, 4, 2]
    assert rows[0]["level"] == "all" and rows[0]["tstr_accuracy"] == pytest.approx(0.5722)
    assert rows[0]["trtr_accuracy_std"] == pytest.approx(0.0325)
    assert script.main(["--out", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "sweep.pdf").is_file()
    assert (ROOT / "docs" / "figures" / "label_sweep_ucsd.pdf").is_file()


def test_image_grid_is_make_grid_in_rgb_with_non_finite_pixels_red(tmp_path: Path):
    """the tiling is transforms.grid.make_grid's (2-pixel white gaps); NaN / inf pixels are red; ``scale`` enlarges."""
    images = torch.tensor([[[[0.0, 1.0]]], [[[float("nan"), 0.5]]], [[[float("inf"), 0.2]]]])  # [3, 1, 1, 2]
    path = image_grid(tmp_path / "g.png", images, nrow=2, scale=1)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    w, r = (255, 255, 255), (255, 0, 0)
    g = lambda v: (v, v, v)  # noqa: E731
    row_pad = [w] * 10
    expected = np.array(
        [
            row_pad,
            row_pad,
            [w, w, g(0), g(255), w, w, r, g(128), w, w],
            row_pad,
            row_pad,
            [w, w, r, g(51), w, w, w, w, w, w],
            row_pad,
            row_pad,
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(rgb, expected)
    with Image.open(image_grid(tmp_path / "g2.png", images, nrow=2, scale=2)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), expected.repeat(2, axis=0).repeat(2, axis=1))
    with pytest.raises(ValueError, match="image_grid needs"):
        image_grid(tmp_path / "bad.png", np.zeros((0, 1, 2, 2)))
