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
"""Embedded default dataset: synthetic 2-D chest-CT phantom slices in the COVIDx CT layout.

The generator draws synthetic patients (body habitus, thoracic cavity, mediastinum, spine, ribs, a 3-D pulmonary
vessel tree, ...) once and renders several axial slices per patient at different heights, so slices of one patient
share anatomy and a patient-disjoint split is meaningful. Three classes follow the COVIDx CT ids: 0 normal,
1 pneumonia (lobar / segmental consolidation with air bronchograms, usually unilateral), 2 COVID-19 (bilateral,
peripheral, patchy ground-glass opacities, sometimes crazy paving). Slices are written as 512x512 16-bit PNG with
value = HU + 1024 under ``DIR/images/``, with ``train.txt`` / ``val.txt`` / ``test.txt`` annotation files whose
lines are ``<file> <class> <xmin> <ymin> <xmax> <ymax>`` (the lung box), plus ``README.md`` and ``dataset.json``.

Command line::

    python -m monai_condflow.data.phantom --out DIR --num-images 600 --seed 0

The output is byte-identical for a given seed and set of arguments. See ``docs/phantom.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from monai_condflow.progress import ProgressLog
from monai_condflow.utils.io import atomic_write_png, atomic_write_text

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_CLASS_FRACTIONS",
    "GENERATOR_VERSION",
    "PhantomPatient",
    "sample_patient",
    "render_slice",
    "hu_to_png",
    "generate_phantom_dataset",
    "main",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0.0"
CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
DEFAULT_CLASS_FRACTIONS = (0.4, 0.35, 0.25)
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
HU_OFFSET = 1024
_N_AXIAL = 120  # synthetic slice numbers run 0 .. 119 from apex to base
_BOX_MARGIN_PX = 3  # margin of the lung box at 512 px
_MIN_PATIENTS_PER_CLASS = 3
_OUTPUT_NAMES = ("train.txt", "val.txt", "test.txt", "README.md", "dataset.json")


def _smoothstep(x: float | np.ndarray, lo: float, hi: float) -> float | np.ndarray:
    t = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    out = t * t * (3.0 - 2.0 * t)
    return float(out) if out.ndim == 0 else out


def _harmonics(rng: np.random.Generator, k_max: int, scale: float) -> np.ndarray:
    """Random Fourier coefficients ``[(k, amplitude, phase), ...]`` for an irregular closed outline."""
    ks = np.arange(2, k_max + 1, dtype=np.float32)
    amps = rng.normal(0.0, scale, size=ks.size).astype(np.float32) / ks**0.8
    phases = rng.uniform(0.0, 2.0 * np.pi, size=ks.size).astype(np.float32)
    return np.stack([ks, amps, phases], axis=1)


def _radius_table(harm: np.ndarray, n: int = 2048) -> np.ndarray:
    """Radial factor ``1 + sum a_k cos(k t + p_k)`` tabulated on ``n`` angles in [-pi, pi]."""
    t = np.linspace(-np.pi, np.pi, n, dtype=np.float32)
    r = np.ones_like(t)
    for k, a, p in harm:
        r += a * np.cos(k * t + p)
    return r


def _lookup(table: np.ndarray, theta: np.ndarray) -> np.ndarray:
    n = table.size
    idx = ((theta + np.pi) * ((n - 1) / (2.0 * np.pi))).astype(np.int32)
    return table[np.clip(idx, 0, n - 1)]


def _vessel_tree(rng: np.random.Generator, side: float, hilum: tuple[float, float, float]) -> np.ndarray:
    """A 3-D branching tree of points ``(u, v, Z, generation)`` growing from the hilum of one lung.

    Units: ``u`` (image right) and ``v`` (posterior) in body half-widths, ``Z`` the cranio-caudal position (0 apex
    .. 2 base). Roots point up, out, forward, back and down so that the tree fills the lung; every generation is
    built at once (vectorised).
    """
    step = 0.0055
    roots = np.array(
        [
            (side * 0.45, -0.25, -1.0),  # upper lobe, apical
            (side * 0.60, -0.60, -0.35),  # upper lobe, anterior
            (side * 0.75, -0.35, 0.25),  # middle lobe / lingula
            (side * 0.55, 0.60, 0.05),  # lower lobe, superior segment
            (side * 0.45, 0.25, 1.0),  # lower lobe, basal
        ]
    )
    d = roots + rng.normal(0.0, 0.12, roots.shape)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.repeat(np.asarray(hilum, dtype=np.float64)[None, :], len(d), axis=0)
    length = 0.27 * rng.uniform(0.85, 1.15, len(d))
    out = []
    for gen in range(9):
        n = max(2, int(length.mean() / step))
        t = np.linspace(0.0, 1.0, n)[None, :, None]
        seg = p[:, None, :] + t * (d * length[:, None])[:, None, :]
        out.append(np.concatenate([seg.reshape(-1, 3), np.full((seg.shape[0] * n, 1), gen)], axis=1))
        if gen == 8:
            break
        end = p + d * length[:, None]
        dd = np.repeat(d, 2, axis=0)
        axis = np.cross(dd, rng.normal(0.0, 1.0, dd.shape))
        axis /= np.linalg.norm(axis, axis=1, keepdims=True) + 1e-9
        ang = rng.uniform(0.4, 0.75, len(dd)) * np.tile([-1.0, 1.0], len(d))
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        nd = dd * c + np.cross(axis, dd) * s + axis * np.sum(axis * dd, axis=1, keepdims=True) * (1.0 - c)
        d = nd / np.linalg.norm(nd, axis=1, keepdims=True)
        p = np.repeat(end, 2, axis=0)
        length = np.repeat(length, 2) * rng.uniform(0.68, 0.82, len(d))
    return np.concatenate(out, axis=0).astype(np.float32)


@dataclass
class PhantomPatient:
    """Anatomy and findings of one synthetic patient, shared by all of its slices.

    Lengths are in body half-widths (the body's half width is ``body_w`` times the image size).

    Attributes:
        cls: class id (0 normal, 1 pneumonia, 2 COVID-19).
        params: scalar anatomy parameters (body, cavity, heart, spine, ribs, densities, noise, ...).
        body_harm: harmonics of the irregular body outline.
        cavity_harm: harmonics of the thoracic cavity outline.
        vessels: ``(P, 4)`` points ``(u, v, Z, generation)`` of the pulmonary vessel tree.
        findings: class-specific parameters (side, anchor direction, severity, ...); empty for normals.
    """

    cls: int
    params: dict[str, float]
    body_harm: np.ndarray
    cavity_harm: np.ndarray
    vessels: np.ndarray
    findings: dict[str, float] = field(default_factory=dict)
    noise_seed: int = 0
    cache: dict = field(default_factory=dict, repr=False, compare=False)


def sample_patient(rng: np.random.Generator, cls: int) -> PhantomPatient:
    """Draw the anatomy (and the class-specific findings parameters) of one synthetic patient.

    Args:
        rng: random generator (consumed).
        cls: class id, 0 normal, 1 pneumonia, 2 COVID-19.

    Returns:
        The patient; render its slices with :func:`render_slice`.

    Raises:
        ValueError: if ``cls`` is not 0, 1 or 2.
    """
    if cls not in (0, 1, 2):
        raise ValueError(f"cls must be 0, 1 or 2, got {cls!r}.")
    u = rng.uniform
    p: dict[str, float] = {
        "body_w": u(0.385, 0.44),  # half width of the body / image size
        "body_b": u(0.60, 0.76),  # antero-posterior / lateral half axis
        "body_dx": u(-0.012, 0.012),
        "body_dy": u(-0.01, 0.03),
        "body_square": u(0.25, 0.6),  # posterior flattening (patient lies on the table)
        "fat": u(0.03, 0.13),  # subcutaneous fat thickness
        "cav_x": u(0.87, 0.92),
        "cav_y": u(0.80, 0.87),  # relative to body_b
        "cav_dy": u(-0.01, 0.04),
        "lung_hu": u(-880.0, -820.0),
        "dependent_hu": u(15.0, 80.0),
        "atelectasis": float(rng.random() < 0.3),
        "atel_thick": u(0.015, 0.04),
        "heart_u": u(0.08, 0.16),
        "heart_v": u(-0.12, -0.02),
        "heart_ru": u(0.34, 0.42),
        "heart_rv": u(0.27, 0.33),
        "heart_ang": u(-0.6, -0.25),
        "med_w": u(0.11, 0.15),
        "med_u": u(-0.03, 0.03),
        "carina_z": u(0.30, 0.38),
        "spine_r": u(0.085, 0.10),
        "aorta_r": u(0.06, 0.08),
        "rib_phase": u(0.0, 1.0),
        "rib_n": float(rng.integers(5, 8)),
        "rib_w": u(0.05, 0.09),
        "liver_z": u(0.74, 0.84),
        "stomach_air": float(rng.random() < 0.5),
        "fissure": float(rng.random() < 0.6),
        "fissure_a": u(-0.5, 0.5),
        "table": float(rng.random() < 0.85),
        "table_gap": u(0.012, 0.04),
        "noise": u(15.0, 25.0),
        "blur": u(0.55, 0.8),
        "fov": u(0.485, 0.5),
    }
    hilum_z = 0.9  # Z units (0..2 apex..base)
    vessels = np.concatenate(
        [
            _vessel_tree(rng, -1.0, (-0.26, 0.02, hilum_z)),
            _vessel_tree(rng, 1.0, (0.28, 0.04, hilum_z + 0.05)),
        ],
        axis=0,
    )
    findings: dict[str, float] = {}
    if cls == 1:
        findings = {
            "side": -1.0 if rng.random() < 0.6 else 1.0,
            "angle": u(-0.2 * np.pi, 1.1 * np.pi),  # direction from the lung centre (0 lateral, pi/2 posterior)
            "severity": float(rng.beta(2.0, 2.0)) * 0.8 + 0.2,
            "z_center": u(0.3, 0.9),
            "fissure_ang": u(0.0, np.pi),
            "hu": u(-80.0, 30.0),
            "bilateral": float(rng.random() < 0.15),
        }
    elif cls == 2:
        findings = {
            "severity": float(rng.beta(1.6, 2.2)) * 0.85 + 0.15,
            "hu": u(-620.0, -420.0),
            "crazy": float(rng.random() < 0.35),
            "consolidation": float(rng.random() < 0.3),
            "posterior_bias": u(0.5, 2.5),
        }
    return PhantomPatient(
        cls=cls,
        params=p,
        body_harm=_harmonics(rng, 9, 0.035),
        cavity_harm=_harmonics(rng, 7, 0.03),
        vessels=vessels,
        findings=findings,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Unit-variance smooth random field with features of about ``scale_px`` pixels (coarse noise, upsampled)."""
    f = max(1, int(round(scale_px)))
    coarse = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, f, axis=0), f, axis=1)[: shape[0], : shape[1]]
    if f > 1:
        fine = ndimage.uniform_filter(fine, f, mode="nearest")
        fine = ndimage.uniform_filter(fine, f, mode="nearest")
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _splat(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, weights: np.ndarray | float) -> np.ndarray:
    """Add point weights into an image (nearest pixel); points outside are dropped."""
    r = np.round(rows).astype(np.int64)
    c = np.round(cols).astype(np.int64)
    ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), r.shape)[ok]
    flat = np.bincount(r[ok] * shape[1] + c[ok], weights=w, minlength=shape[0] * shape[1])
    return flat.reshape(shape).astype(np.float32)


def _branching_2d(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float, gens: int, step: float
) -> np.ndarray:
    """Points (row, col) of a 2-D branching tree (used for air bronchograms)."""
    out: list[np.ndarray] = []
    stack = [(np.asarray(start, dtype=np.float64), np.asarray(direction, dtype=np.float64), length, 0)]
    while stack:
        p0, d, ln, g = stack.pop()
        n = max(2, int(ln / step))
        t = np.linspace(0.0, ln, n)[:, None]
        wobble = np.cumsum(rng.normal(0.0, 0.02, (n, 1)), axis=0) * np.array([[-d[1], d[0]]])
        seg = p0[None, :] + t * d[None, :] + wobble * ln
        out.append(seg)
        if g + 1 < gens:
            for sgn in (-1.0, 1.0):
                a = sgn * rng.uniform(0.3, 0.65)
                nd = np.array([d[0] * math.cos(a) - d[1] * math.sin(a), d[0] * math.sin(a) + d[1] * math.cos(a)])
                stack.append((seg[-1], nd, ln * rng.uniform(0.6, 0.8), g + 1))
    return np.concatenate(out, axis=0)


def render_slice(
    rng: np.random.Generator,
    cls: int,
    image_size: int = 512,
    patient: PhantomPatient | None = None,
    z: float | None = None,
    return_mask: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int, int]] | tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """Render one axial chest-CT phantom slice in Hounsfield units.

    Args:
        rng: random generator for the slice (noise, findings); consumed.
        cls: class id, 0 normal, 1 pneumonia, 2 COVID-19.
        image_size: side of the square image in pixels (512 for COVIDx-CT-like files; >= 64).
        patient: the synthetic patient (anatomy shared by its slices); drawn from ``rng`` when ``None``.
        z: axial position in [0, 1] (0 lung apex, 1 lung base); drawn from ``rng`` when ``None``.
        return_mask: also return the boolean lung mask.

    Returns:
        ``(hu, box)`` or ``(hu, box, lung_mask)``: ``hu`` float32 ``[image_size, image_size]`` in HU (air -1000,
        outside the scanner's field of view -1024); ``box`` the lung box ``(xmin, ymin, xmax, ymax)`` in pixels
        (x = column, y = row, inclusive), tight around both lungs with a margin of a few pixels.

    Raises:
        ValueError: on a bad class, image size, axial position or a patient of another class.
    """
    if cls not in (0, 1, 2):
        raise ValueError(f"cls must be 0, 1 or 2, got {cls!r}.")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}.")
    if patient is None:
        patient = sample_patient(rng, cls)
    elif patient.cls != cls:
        raise ValueError(f"patient has class {patient.cls}, render_slice was asked for class {cls}.")
    if z is None:
        z = float(rng.uniform(0.08, 0.95))
    if not 0.0 <= z <= 1.0:
        raise ValueError(f"z must be in [0, 1], got {z}.")
    hu, mask = _render(rng, patient, float(z), int(image_size))
    box = _lung_box(mask, image_size)
    if return_mask:
        return hu, box, mask
    return hu, box


def _lung_box(mask: np.ndarray, size: int) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise RuntimeError("phantom slice has an empty lung mask")
    m = max(1, int(round(_BOX_MARGIN_PX * size / 512)))
    return (
        int(max(cols[0] - m, 0)),
        int(max(rows[0] - m, 0)),
        int(min(cols[-1] + m, size - 1)),
        int(min(rows[-1] + m, size - 1)),
    )


def _soft(sd_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside weight from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sd_px, 0.0, 1.0)


class _Grid:
    """Pixel grid of one slice in body units, with helpers that work on the bounding window of a shape only."""

    def __init__(self, u: np.ndarray, v: np.ndarray, px: float) -> None:
        self.px = px  # pixels per unit
        self.u = u  # column coordinates (units), increasing
        self.v = v  # row coordinates (units), increasing

    def window(self, cu: float, cv: float, r: float) -> tuple[slice, slice] | None:
        r = r + 2.0 / self.px
        c0, c1 = np.searchsorted(self.u, [cu - r, cu + r])
        r0, r1 = np.searchsorted(self.v, [cv - r, cv + r])
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def ellipse(
        self, cu: float, cv: float, ru: float, rv: float, ang: float = 0.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Soft mask of a rotated ellipse on its bounding window: ``(window, mask)`` or ``None`` when outside."""
        win = self.window(cu, cv, max(ru, rv))
        if win is None:
            return None
        du = self.u[win[1]][None, :] - cu
        dv = self.v[win[0]][:, None] - cv
        c, s = math.cos(ang), math.sin(ang)
        a = (du * c + dv * s) / ru
        b = (-du * s + dv * c) / rv
        rho = np.sqrt(a * a + b * b)
        return win, _soft((rho - 1.0) * (min(ru, rv) * self.px))


def _paint(img: np.ndarray, shape_: tuple | None, value: float, weight: float | np.ndarray = 1.0) -> None:
    """Blend ``value`` into ``img`` inside a soft shape (in place)."""
    if shape_ is None:
        return
    win, m = shape_
    w = m * weight if np.isscalar(weight) else m * weight[win]
    img[win] += w * (value - img[win])


def _union(mask: np.ndarray, shape_: tuple | None) -> None:
    if shape_ is not None:
        win, m = shape_
        np.maximum(mask[win], m, out=mask[win])


def _patient_cache(pt: PhantomPatient, size: int) -> dict[str, np.ndarray | float]:
    """Slice-independent images of a patient (body, angles, noise texture), computed once per image size."""
    if pt.cache.get("size") == size:
        return pt.cache
    p = pt.params
    w_px = p["body_w"] * size  # pixels per unit (body half width)
    cx = size / 2.0 + p["body_dx"] * size
    cy = size / 2.0 + p["body_dy"] * size
    u = (np.arange(size, dtype=np.float32) - cx) / w_px
    v = (np.arange(size, dtype=np.float32) - cy) / w_px
    b = p["body_b"]
    theta = np.arctan2(np.broadcast_to(v[:, None], (size, size)), np.broadcast_to(u[None, :], (size, size)))
    x2 = (u * u)[None, :]
    y2 = ((v / b) ** 2)[:, None]
    rho_b = np.sqrt(x2 + y2 - p["body_square"] * x2 * y2 * (v > 0)[:, None])
    depth = _lookup(_radius_table(pt.body_harm), theta) - rho_b  # ~ depth below the skin, units
    body = _soft(-depth * w_px)
    fat_w = _soft((depth - p["fat"]) * w_px)  # 1 in the subcutaneous fat, 0 deeper
    skin = _soft((depth - 1.6 / w_px) * w_px)
    base = (-1000.0 + body * (1040.0 - 140.0 * fat_w + 80.0 * skin)).astype(np.float32)
    nrng = np.random.default_rng(pt.noise_seed)
    noise = ndimage.gaussian_filter(nrng.standard_normal((size, size), dtype=np.float32), 0.7 * size / 512 + 0.15)
    noise /= noise.std() + 1e-6
    yy = np.arange(size, dtype=np.float32)[:, None] - size / 2 + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] - size / 2 + 0.5
    pt.cache = {
        "size": size,
        "w_px": w_px,
        "cx": cx,
        "cy": cy,
        "u": u,
        "v": v,
        "theta": theta,
        "r_cav": _lookup(_radius_table(pt.cavity_harm), theta),
        "body": body,
        "base": base,
        "noise": noise,
        "noise_amp": (p["noise"] * (0.45 + 0.55 * body)).astype(np.float32),
        "outside_fov": (yy * yy + xx * xx) > (p["fov"] * size) ** 2,
    }
    return pt.cache


def _render(rng: np.random.Generator, pt: PhantomPatient, z: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    p = pt.params
    scale = size / 512.0
    c = _patient_cache(pt, size)
    w_px, cx, cy = float(c["w_px"]), float(c["cx"]), float(c["cy"])
    g = _Grid(c["u"], c["v"], w_px)
    u, v = g.u[None, :], g.v[:, None]
    body = c["body"]
    b = p["body_b"]
    hu = c["base"].copy()
    breath = float(rng.normal(0.0, 0.012))  # breathing / scan-to-scan variation of this slice

    # ---- thoracic cavity (inside the ribs)
    wz = 0.72 + 0.28 * _smoothstep(z, 0.0, 0.55)
    hz = 0.80 + 0.20 * _smoothstep(z, 0.0, 0.45)
    rx = p["cav_x"] * wz * (1.0 + breath)
    ry = p["cav_y"] * b * hz * (1.0 + breath)
    cav_v0 = p["cav_dy"]
    # everything below happens on the thorax window (cavity, ribs, scapulae) to save time
    wc0, wc1 = np.searchsorted(g.u, [-1.55 * rx, 1.55 * rx])
    wr0, wr1 = np.searchsorted(g.v, [cav_v0 - 1.6 * ry, cav_v0 + 1.6 * ry])
    win_t = (slice(int(wr0), int(wr1)), slice(int(wc0), int(wc1)))
    full_hu, full_g = hu, g
    hu = full_hu[win_t]
    g = _Grid(full_g.u[win_t[1]], full_g.v[win_t[0]], w_px)
    u, v = g.u[None, :], g.v[:, None]
    wshape = hu.shape
    theta = c["theta"][win_t]
    body_t = body[win_t]
    cx_t, cy_t = cx - float(wc0), cy - float(wr0)
    cu_, cv_ = u / rx, (v - cav_v0) / ry
    rho_c = np.sqrt(cu_ * cu_ + cv_ * cv_ - 0.3 * (cu_ * cu_) * (cv_ * cv_) * (v > cav_v0))
    r_cav = c["r_cav"][win_t]
    cavity = _soft((rho_c - r_cav) * rx * w_px)
    v_post = cav_v0 + ry
    v_ant = cav_v0 - ry

    # ---- mediastinum, heart, great vessels, hila, aorta, spine: removed from the cavity to leave the lungs
    med = np.zeros(wshape, dtype=np.float32)
    spine_r = p["spine_r"]
    spine_v = v_post - 2.0 * spine_r
    med_u = p["med_u"]
    band_w = p["med_w"] * (0.75 + 0.25 * wz)
    band = g.window(med_u, 0.0, band_w + 0.1)
    if band is not None:
        cols = band[1]
        taper = 0.3 + 0.7 * _smoothstep(v, v_ant + 0.05, v_ant + 0.45)
        med[:, cols] = _soft((np.abs(g.u[cols] - med_u)[None, :] - band_w * taper) * w_px)
    heart_s = float(_smoothstep(z, 0.40, 0.72)) * (1.0 - 0.2 * float(_smoothstep(z, 0.9, 1.0)))
    if heart_s > 0.02:
        _union(
            med,
            g.ellipse(
                p["heart_u"],
                p["heart_v"] + 0.06 * (1 - heart_s),
                p["heart_ru"] * (0.45 + 0.55 * heart_s),
                p["heart_rv"] * (0.45 + 0.55 * heart_s),
                p["heart_ang"],
            ),
        )
    gv_s = float(_smoothstep(z, 0.1, 0.3)) * (1.0 - float(_smoothstep(z, 0.45, 0.6)))
    if gv_s > 0.02:  # great vessels / aortic arch
        _union(med, g.ellipse(med_u + 0.03, v_ant + 0.3, 0.12 + 0.12 * gv_s, 0.2, 0.3))
    hil_s = float(_smoothstep(z, 0.28, 0.38)) * (1.0 - float(_smoothstep(z, 0.5, 0.62)))
    if hil_s > 0.02:
        for hu_c, hv_c in ((-0.27, 0.02), (0.29, 0.04)):
            _union(med, g.ellipse(hu_c, hv_c, 0.1 * hil_s, 0.08 * hil_s, 0.4))
    aorta_r = p["aorta_r"]
    aorta_v = spine_v - spine_r * 0.5
    aorta_u = med_u + spine_r + aorta_r * 0.9
    if z > 0.22:
        _union(med, g.ellipse(aorta_u, aorta_v, aorta_r + 0.015, aorta_r + 0.015))
    _union(med, g.ellipse(0.0, spine_v, spine_r * 1.4, spine_r * 1.3))
    _union(med, g.ellipse(0.0, spine_v + 0.35, spine_r * 1.25, 0.35))
    domes = np.zeros(wshape, dtype=np.float32)
    liver_s = float(_smoothstep(z, p["liver_z"], 1.03))
    if liver_s > 0.0:  # diaphragm domes: liver under the right lung (image left), spleen / stomach under the left
        _union(domes, g.ellipse(-0.3, -0.15, 0.8 * liver_s, 0.6 * liver_s, 0.2))
    spleen_s = float(_smoothstep(z, p["liver_z"] + 0.06, 1.06))
    if spleen_s > 0.0:
        _union(domes, g.ellipse(0.38, -0.05, 0.6 * spleen_s, 0.5 * spleen_s, -0.3))
    lung_w = cavity * (1.0 - med) * (1.0 - domes)
    # cavity contents: mediastinal soft tissue (fat around the vessels), liver and spleen below the domes
    hu += cavity * (35.0 - hu)
    if band is not None:
        cols = band[1]
        mfat = _smoothstep(np.abs(g.u[cols] - med_u), band_w * 0.45, band_w * 0.9)[None, :]
        hu[:, cols] -= cavity[:, cols] * med[:, cols] * mfat * (130.0 * (1.0 - 0.6 * heart_s))
    hu += domes * cavity * 20.0

    # ---- lungs (on their bounding window): density, dependent gradient, fissures, findings, vessels
    lung = lung_w > 0.5
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    pad = int(6 * scale) + 2
    r0, r1 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + pad + 1, wshape[0])
    c0, c1 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + pad + 1, wshape[1])
    sl = (slice(r0, r1), slice(c0, c1))
    lw = lung_w[sl]
    lmask = lung[sl]
    shape = lw.shape
    uu = np.broadcast_to(u[:, c0:c1], shape)
    vv = np.broadcast_to(v[r0:r1, :], shape)
    vt = np.clip((vv - (v_ant + 0.4 * ry)) / (1.6 * ry), 0.0, 1.0)  # 0 anterior .. 1 posterior (dependent)
    lung_hu = (p["lung_hu"] - breath * 800.0) + p["dependent_hu"] * vt * vt
    lung_hu = lung_hu + 10.0 * _smooth_noise(rng, shape, 10 * scale)
    if p["fissure"] > 0.5 and 0.3 < z < 0.95:  # oblique fissures: faint thin lines
        for side in (-1.0, 1.0):
            f_off = p["fissure_a"] * 0.1 + (z - 0.6) * 0.6
            dist_f = (np.abs(uu) * 0.5 + vv * 0.87 - f_off) * w_px
            fis = np.exp(-(dist_f**2) / (0.8 * scale + 0.3) ** 2) * ((side * uu) > 0.3)
            lung_hu = lung_hu + fis * 110.0
    f = max(1, int(round(4 * scale)))  # distance to the lung edge (units), on a coarse grid for speed
    dist_c = ndimage.distance_transform_edt(np.pad(lmask[::f, ::f], 1))[1:-1, 1:-1]
    dist = np.repeat(np.repeat(dist_c, f, axis=0), f, axis=1)[: shape[0], : shape[1]] * np.float32(f / w_px)
    if p["atelectasis"] > 0.5:  # dependent subpleural density, in every class
        atel = _smoothstep(p["atel_thick"] - dist, -0.008, 0.008) * _smoothstep(vt, 0.7, 0.9)
        atel = atel * np.clip(_smooth_noise(rng, shape, 8 * scale) + 0.8, 0.0, 1.0)
        lung_hu = lung_hu + atel * (-300.0 - lung_hu)
    lung_hu = lung_hu.astype(np.float32)
    cons, regions = np.zeros(shape, dtype=np.float32), []
    if pt.cls == 2:
        lung_hu = _covid_findings(rng, pt, z, lung_hu, lmask, dist, uu, vt, w_px, scale)
    elif pt.cls == 1:
        lung_hu, cons, regions = _cap_findings(rng, pt, z, lung_hu, lmask, uu, w_px, scale)
    # vessels: points of the 3-D tree in a slab around this axial position, blurred to dots and tubes
    pts = pt.vessels
    sel = pts[np.abs(pts[:, 2] - z * 2.0) < 0.02]
    vessel = np.zeros(shape, dtype=np.float32)
    for lo, hi, sigma, gain in ((0, 1, 2.2, 1.3), (2, 8, 1.1, 1.1)):
        m = (sel[:, 3] >= lo) & (sel[:, 3] <= hi)
        if not m.any():
            continue
        s_px = max(sigma * scale, 0.5)
        imp = _splat(
            shape, sel[m, 1] * w_px + cy_t - r0, sel[m, 0] * w_px + cx_t - c0, 2.0 * np.pi * s_px * s_px * gain
        )
        np.maximum(vessel, ndimage.gaussian_filter(imp, s_px, truncate=2.5), out=vessel)
    # small vessels seen in cross-section: dots everywhere in the lungs, larger and denser towards the hila
    ii, jj = np.nonzero(lmask)
    if ii.size:
        n_dots = int(ii.size * rng.uniform(0.0035, 0.005) / (scale * scale) * scale)
        wts = 0.25 + np.minimum(dist[ii, jj], 0.25)
        pick = rng.choice(ii.size, size=n_dots, p=wts / wts.sum())
        for s_px, frac in ((0.65, 0.7), (1.1, 0.3)):
            k = pick[: int(len(pick) * frac)] if frac < 0.5 else pick[int(len(pick) * (1 - frac)) :]
            s_px = max(s_px * scale, 0.45)
            imp = _splat(shape, ii[k] + rng.normal(0, 0.3, k.size), jj[k], 2.0 * np.pi * s_px * s_px * 1.1)
            np.maximum(vessel, ndimage.gaussian_filter(imp, s_px, truncate=2.5), out=vessel)
    vessel = (1.0 - np.exp(-1.4 * vessel)) * _smoothstep(dist, 0.0, 0.025)
    lung_hu = lung_hu + vessel * (40.0 - lung_hu) * 0.95
    if regions:
        lung_hu = _bronchograms(rng, lung_hu, cons, regions, scale)
    region = hu[sl]
    hu[sl] = region + lw * (lung_hu - region)
    mask = np.zeros((size, size), dtype=bool)
    mask[win_t][sl] = lmask
    # back to the full image for the small structures
    thorax_hu, thorax_theta, thorax_rho, thorax_rcav = hu, theta, rho_c, r_cav
    hu, g = full_hu, full_g

    # ---- airways: trachea above the carina, main bronchi just below
    car = p["carina_z"]
    tr_v = v_ant + 0.5 * (spine_v - v_ant)
    if z < car + 0.01:
        tr_r = 0.07 * (0.9 + 0.1 * float(_smoothstep(z, 0.0, 0.2)))
        _paint(hu, g.ellipse(med_u, tr_v, tr_r + 0.016, tr_r * 0.92 + 0.016), 60.0)
        _paint(hu, g.ellipse(med_u, tr_v, tr_r, tr_r * 0.92), -1000.0)
    elif z < car + 0.1:
        t = (z - car) / 0.1
        for sgn in (-1.0, 1.0):
            bu = med_u + sgn * (0.07 + 0.14 * t)
            br = 0.045 * (1.0 - 0.3 * t)
            _paint(hu, g.ellipse(bu, tr_v + 0.02, br + 0.014, br * 0.85 + 0.014), 50.0)
            _paint(hu, g.ellipse(bu, tr_v + 0.02, br, br * 0.85), -1000.0)
    if z > 0.22:
        _paint(hu, g.ellipse(aorta_u, aorta_v, aorta_r, aorta_r), 45.0)
    if p["stomach_air"] > 0.5 and spleen_s > 0.5:
        _paint(hu, g.ellipse(0.45, -0.08, 0.16 * spleen_s, 0.09 * spleen_s, -0.2), -1000.0)

    # ---- bones: vertebra (cortex, cancellous core, canal, arch), ribs, sternum, scapulae
    _paint(hu, g.ellipse(0.0, spine_v, spine_r, spine_r * 0.92), 750.0)
    _paint(hu, g.ellipse(0.0, spine_v, spine_r * 0.8, spine_r * 0.72), 230.0)
    canal_v = spine_v + spine_r * 1.55
    _paint(hu, g.ellipse(0.0, canal_v, spine_r * 0.85, spine_r * 0.7), 600.0)
    _paint(hu, g.ellipse(0.0, canal_v + spine_r * 1.0, spine_r * 0.2, spine_r * 0.6), 600.0)
    for sgn in (-1.0, 1.0):  # transverse processes
        _paint(hu, g.ellipse(sgn * spine_r * 1.4, canal_v - 0.01, spine_r * 0.75, spine_r * 0.22, sgn * 0.4), 500.0)
    _paint(hu, g.ellipse(0.0, canal_v, spine_r * 0.5, spine_r * 0.45), 20.0)
    n_ribs = int(p["rib_n"])  # ribs: short arcs just outside the cavity, shifting with the axial position
    ang_tab = np.linspace(-np.pi, np.pi, 2048, dtype=np.float32)
    win = np.zeros_like(ang_tab)
    for k in range(2 * n_ribs):
        centre = -np.pi + (k + 0.5 + p["rib_phase"] + 3.0 * z) * (np.pi / n_ribs)
        dang = np.angle(np.exp(1j * (ang_tab - centre))).astype(np.float32)
        np.maximum(win, np.clip((p["rib_w"] - np.abs(dang)) / 0.03, 0.0, 1.0), out=win)
    win *= np.clip((np.abs(np.abs(ang_tab) - np.pi / 2) - 0.22) / 0.1, 0.0, 1.0)  # none on the midlines
    hu, theta, rho_c, r_cav = thorax_hu, thorax_theta, thorax_rho, thorax_rcav
    ring_d = np.abs(rho_c - r_cav - 0.06) * (rx * w_px)
    rib_t = 0.026 * w_px
    near = ring_d < rib_t + 1.0
    rib_ang = _lookup(win, theta[near]) * body_t[near]
    hu[near] += _soft(ring_d[near] - rib_t) * rib_ang * (650.0 - hu[near])
    hu[near] += _soft(ring_d[near] - rib_t * 0.4) * rib_ang * (220.0 - hu[near])
    sc_s = 1.0 - float(_smoothstep(z, 0.3, 0.55))
    if sc_s > 0.05:
        sc_tab = np.clip((0.3 - np.abs(np.abs(ang_tab) - 2.3)) / 0.05, 0.0, 1.0) * (ang_tab > 0)
        sc_d = np.abs(rho_c - r_cav - 0.22) * (rx * w_px)
        near = sc_d < 0.02 * w_px + 1.0
        hu[near] += _soft(sc_d[near] - 0.016 * w_px * sc_s) * _lookup(sc_tab, theta[near]) * (550.0 - hu[near])
    hu = full_hu
    if z > 0.1:
        _paint(hu, g.ellipse(med_u * 0.5, v_ant - 0.07, 0.1, 0.04), 600.0)
        _paint(hu, g.ellipse(med_u * 0.5, v_ant - 0.07, 0.075, 0.022), 200.0)

    # ---- table, field of view, blur, noise
    if p["table"] > 0.5:
        top = int(min(cy + b * w_px * 0.8, size - 1))
        yy = np.arange(top, size, dtype=np.float32)[:, None]
        xx = (np.arange(size, dtype=np.float32)[None, :] - size / 2) / size
        curve = cy + (b + p["table_gap"]) * w_px - 0.35 * size * xx * xx
        tab = hu[top:]
        outside = 1.0 - body[top:]
        for off, val, thick in ((0.0, 120.0, 1.0), (0.02, 250.0, 1.5), (0.055, 100.0, 1.0)):
            tab += _soft(np.abs(yy - curve - off * size) - thick * scale) * outside * (val - tab)
    hu = ndimage.gaussian_filter(hu, p["blur"] * scale + 0.2, truncate=2.5)
    shift = rng.integers(0, size, 2)  # a fresh view of the patient's noise texture
    noise = np.roll(c["noise"], (int(shift[0]), int(shift[1])), axis=(0, 1))
    if rng.random() < 0.5:
        noise = noise[::-1]
    hu += noise * c["noise_amp"]
    hu[c["outside_fov"]] = -1024.0
    return hu.astype(np.float32), mask


def _covid_findings(rng, pt, z, lung_hu, lmask, dist, uu, vt, w_px, scale) -> np.ndarray:
    """Bilateral, peripheral, patchy ground-glass opacities (sometimes crazy paving or consolidation)."""
    f = pt.findings
    sev = float(np.clip(f["severity"] * rng.uniform(0.7, 1.25) * (0.75 + 0.4 * z), 0.1, 1.0))
    shape = lung_hu.shape
    n_lesions = 2 + int(round(sev * 12 * rng.uniform(0.8, 1.2)))
    ii, jj = np.nonzero(lmask & (dist < 0.09))
    if ii.size == 0:
        ii, jj = np.nonzero(lmask)
    wts = 1.0 + f["posterior_bias"] * vt[ii, jj]
    wts /= wts.sum()
    left = uu[ii, jj] < 0
    field_ = np.zeros(shape, dtype=np.float32)
    picks = list(rng.choice(ii.size, size=n_lesions, p=wts))
    # bilateral: at least one lesion in each lung when both have candidate pixels
    for side in (left, ~left):
        if side.any() and not side[picks].any():
            ws = wts * side
            picks[0 if side is left else 1] = int(rng.choice(ii.size, p=ws / ws.sum()))
    for k in picks:
        r_units = rng.uniform(0.04, 0.11) * (0.7 + 0.6 * sev)
        rad = r_units * w_px
        ci, cj = ii[k], jj[k]
        h = int(3 * rad) + 2
        a0, a1 = max(ci - h, 0), min(ci + h + 1, shape[0])
        b0, b1 = max(cj - h, 0), min(cj + h + 1, shape[1])
        yy = np.arange(a0, a1, dtype=np.float32)[:, None] - ci
        xx = np.arange(b0, b1, dtype=np.float32)[None, :] - cj
        ang = rng.uniform(0, np.pi)
        el = rng.uniform(0.55, 1.0)
        c_, s_ = math.cos(ang), math.sin(ang)
        a = (xx * c_ + yy * s_) / rad
        bb = (-xx * s_ + yy * c_) / (rad * el)
        field_[a0:a1, b0:b1] += np.exp(-0.5 * (a * a + bb * bb) * 2.0) * rng.uniform(0.8, 1.3)
    tex = _smooth_noise(rng, shape, 7 * scale)
    alpha = np.clip((field_ * (1.0 + 0.35 * tex) - 0.3) / 0.35, 0.0, 1.0) * lmask
    target = f["hu"] + 60.0 * _smooth_noise(rng, shape, 3 * scale)
    if f["consolidation"] > 0.5 and sev > 0.45:
        core = np.clip((field_ - 1.1) / 0.3, 0.0, 1.0)
        target = target + core * (-120.0 - target)
    if f["crazy"] > 0.5:
        wn = rng.standard_normal(shape).astype(np.float32)
        bp = ndimage.gaussian_filter(wn, 2.2 * scale + 0.3) - ndimage.gaussian_filter(wn, 4.5 * scale + 0.5)
        bp /= bp.std() + 1e-6
        target = target + 170.0 * np.exp(-((bp / 0.3) ** 2)) * alpha
    return lung_hu + alpha * (target - lung_hu)


def _cap_findings(rng, pt, z, lung_hu, lmask, uu, w_px, scale) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Lobar / segmental consolidation in one lung (rarely both), with a ground-glass halo and a fissure edge."""
    f = pt.findings
    shape = lung_hu.shape
    cons_total = np.zeros(shape, dtype=np.float32)
    regions: list[dict] = []
    sides = [f["side"], -f["side"]] if f["bilateral"] > 0.5 else [f["side"]]
    for n, side in enumerate(sides):
        sel = lmask & ((uu > 0) if side > 0 else (uu < 0))
        if sel.sum() < 20:
            sel = lmask & ((uu > 0) if side < 0 else (uu < 0))
            if sel.sum() < 20:
                continue
        ii, jj = np.nonzero(sel)
        centre = np.array([ii.mean(), jj.mean()])
        ang = f["angle"] + rng.normal(0.0, 0.15)
        d = np.array([math.sin(ang), side * math.cos(ang)])  # (row, col); angle 0 = lateral, pi/2 = posterior
        proj = (ii - centre[0]) * d[0] + (jj - centre[1]) * d[1]
        anchor = centre + d * proj.max() * 0.95
        extent = math.sqrt(ii.size / np.pi)  # equivalent radius of this lung, px
        zfac = math.exp(-(((z - f["z_center"]) / 0.35) ** 2))
        sev = f["severity"] * (0.35 + 0.65 * zfac) * (0.6 if n else 1.0)
        rad = extent * (0.35 + 0.9 * sev) * rng.uniform(0.9, 1.1)
        yy = np.arange(shape[0], dtype=np.float32)[:, None]
        xx = np.arange(shape[1], dtype=np.float32)[None, :]
        dy, dx = yy - anchor[0], xx - anchor[1]
        r = np.sqrt(dy * dy + dx * dx) / (rad * (1.0 + 0.2 * _smooth_noise(rng, shape, 10 * scale)))
        # a fissure-like straight edge between the anchor and the hilum
        fa = math.atan2(d[0], d[1]) + f["fissure_ang"]
        nrm = np.array([math.sin(fa), math.cos(fa)])
        pf = anchor - d * rad * (0.55 + 0.3 * sev)
        signed = (yy - pf[0]) * nrm[0] + (xx - pf[1]) * nrm[1]
        signed = signed * (1.0 if np.dot(anchor - pf, nrm) >= 0 else -1.0)
        cut = np.clip(signed / (1.5 * scale) + 0.5, 0.0, 1.0)
        core = np.clip((1.0 - r) / 0.12, 0.0, 1.0) * cut * sel
        halo = np.clip((1.3 - r) / 0.3, 0.0, 1.0) * cut * sel
        target = f["hu"] + 25.0 * _smooth_noise(rng, shape, 4 * scale)
        lung_hu = lung_hu + halo * (-480.0 - lung_hu) * 0.8
        lung_hu = lung_hu + core * (target - lung_hu)
        cons_total = np.maximum(cons_total, core)
        regions.append({"anchor": anchor, "centre": centre, "rad": rad})
    return lung_hu, cons_total, regions


def _bronchograms(rng, lung_hu, cons, regions, scale) -> np.ndarray:
    """Air bronchograms: dark branching tubes visible only inside the consolidation."""
    if not regions or cons.max() < 0.5:
        return lung_hu
    imp = np.zeros_like(lung_hu)
    for reg in regions:
        d = reg["anchor"] - reg["centre"]
        d /= np.linalg.norm(d) + 1e-9
        start = reg["anchor"] - d * reg["rad"] * 0.9
        pts = _branching_2d(rng, start, d, reg["rad"] * 0.45, 4, 0.5)
        imp += _splat(lung_hu.shape, pts[:, 0], pts[:, 1], 1.0)
    s_px = max(1.0 * scale, 0.6)
    br = 1.0 - np.exp(-ndimage.gaussian_filter(imp, s_px, truncate=3.0) * 3.0)
    m = np.clip((cons - 0.5) / 0.3, 0.0, 1.0)
    return lung_hu + br * m * (-930.0 - lung_hu)


def hu_to_png(hu: np.ndarray) -> np.ndarray:
    """Convert HU to the stored 16-bit values: ``round(HU + 1024)`` clipped to [0, 4095].

    Args:
        hu: image in Hounsfield units.

    Returns:
        ``uint16`` array of the same shape.
    """
    return np.clip(np.rint(hu + HU_OFFSET), 0, 4095).astype(np.uint16)


def _write_png(path: Path, hu: np.ndarray) -> None:
    atomic_write_png(Image.fromarray(hu_to_png(hu)), path, compress_level=1)


def _class_counts(n_patients: int, fractions: Sequence[float]) -> list[int]:
    """Patients per class by largest remainder, with at least three per class (one per split)."""
    fr = np.asarray(fractions, dtype=np.float64)
    raw = fr / fr.sum() * n_patients
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_patients - counts.sum()]:
        counts[i] += 1
    while counts.min() < _MIN_PATIENTS_PER_CLASS:
        counts[int(np.argmax(counts))] -= 1
        counts[int(np.argmin(counts))] += 1
    return [int(c) for c in counts]


def _split_patients(rng: np.random.Generator, patient_classes: list[int]) -> dict[int, str]:
    """Patient-disjoint split, stratified by class, about 70/15/15, every split holding every class."""
    out: dict[int, str] = {}
    for cls in range(len(CLASS_NAMES)):
        ids = [i for i, c in enumerate(patient_classes) if c == cls]
        ids = [ids[k] for k in rng.permutation(len(ids))]
        n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * len(ids))))
        n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * len(ids))))
        for k, pid in enumerate(ids):
            out[pid] = "val" if k < n_val else ("test" if k < n_val + n_test else "train")
    return out


def _render_patient(task: tuple) -> list[str]:
    """Render and write the slices of one patient; returns their annotation lines (runs in worker processes)."""
    images, pid, cls, seed_seq, n_sl, image_size = task
    rng = np.random.default_rng(seed_seq)
    patient = sample_patient(rng, cls)
    # distinct axial slice numbers between the apex and the base, spread over the lungs
    lo, hi = int(round(0.08 * (_N_AXIAL - 1))), int(round(0.95 * (_N_AXIAL - 1)))
    rows = []
    for k in np.sort(rng.choice(np.arange(lo, hi + 1), size=n_sl, replace=False)):
        hu, box = render_slice(rng, cls, image_size, patient, float(k) / (_N_AXIAL - 1))
        name = f"phantom_p{pid:04d}_s{int(k):03d}.png"
        _write_png(Path(images) / name, hu)
        rows.append(f"{name} {cls} {box[0]} {box[1]} {box[2]} {box[3]}")
    return rows


def generate_phantom_dataset(
    out_dir: str | os.PathLike,
    num_images: int = 600,
    seed: int = 0,
    image_size: int = 512,
    class_fractions: Sequence[float] = DEFAULT_CLASS_FRACTIONS,
    slices_per_patient: int = 6,
    overwrite: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Generate the phantom dataset: PNG slices, COVIDx-CT-format split files, ``README.md`` and ``dataset.json``.

    Args:
        out_dir: output folder; created when missing.
        num_images: number of slices.
        seed: random seed; the same arguments give byte-identical files.
        image_size: side of the square PNG slices.
        class_fractions: fractions of patients per class (normal, pneumonia, COVID-19).
        slices_per_patient: slices per synthetic patient (the last patient may have fewer).
        overwrite: allow writing into a non-empty ``out_dir`` (files of an earlier phantom set are replaced).
        num_workers: worker processes (patients are rendered independently, so the output does not depend on it).
        progress: log ``phantom: done/total patients, ETA`` lines (:class:`~monai_condflow.progress.ProgressLog`).

    Returns:
        The content of ``dataset.json``: seed, sizes, generator version, counts per split and class, and
        ``seconds`` (wall time, not written to the file).

    Raises:
        FileExistsError: if ``out_dir`` is not empty and ``overwrite`` is False.
        ValueError: on bad arguments (fewer than nine patients, bad fractions, ...).

    Example::

        info = generate_phantom_dataset("/tmp/phantom", num_images=60, seed=1)
        print(info["counts"]["train"])
    """
    if slices_per_patient < 1 or slices_per_patient > 50:
        raise ValueError(f"slices_per_patient must be in [1, 50], got {slices_per_patient}.")
    if len(class_fractions) != 3 or min(class_fractions) <= 0:
        raise ValueError(f"class_fractions must be three positive numbers, got {class_fractions!r}.")
    n_patients = math.ceil(num_images / slices_per_patient) if num_images > 0 else 0
    if n_patients < 3 * _MIN_PATIENTS_PER_CLASS:
        raise ValueError(
            f"num_images={num_images} with slices_per_patient={slices_per_patient} gives {n_patients} patients; at "
            f"least {3 * _MIN_PATIENTS_PER_CLASS} are needed (3 per class) for a stratified patient-disjoint split."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to write into it.")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("phantom_p*_s*.png"):
        old.unlink()
    start = time.perf_counter()
    master = np.random.SeedSequence(seed)
    plan_rng = np.random.default_rng(master.spawn(1)[0])
    counts = _class_counts(n_patients, class_fractions)
    patient_classes = [c for c, n in enumerate(counts) for _ in range(n)]
    patient_classes = [patient_classes[k] for k in plan_rng.permutation(n_patients)]
    split_of = _split_patients(plan_rng, patient_classes)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    table = {sp: [0, 0, 0] for sp in lines}
    n_patients_split = {sp: [0, 0, 0] for sp in lines}
    patient_seeds = master.spawn(n_patients + 1)[1:]
    tasks = [
        (
            str(images),
            pid,
            patient_classes[pid],
            patient_seeds[pid],
            min(slices_per_patient, num_images - pid * slices_per_patient),
            image_size,
        )
        for pid in range(n_patients)
    ]
    results = []
    with ProgressLog(len(tasks), "phantom", unit="patients", enabled=progress) as bar:
        if num_workers > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for rows in pool.map(_render_patient, tasks, chunksize=4):
                    results.append(rows)
                    bar.update()
        else:
            for task in tasks:
                results.append(_render_patient(task))
                bar.update()
    for (_, pid, cls, *_rest), rows in zip(tasks, results):
        split = split_of[pid]
        n_patients_split[split][cls] += 1
        table[split][cls] += len(rows)
        lines[split].extend(rows)
    info = {
        "name": "monai_condflow phantom chest CT",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_images": int(num_images),
        "image_size": int(image_size),
        "slices_per_patient": int(slices_per_patient),
        "class_fractions": [float(f) for f in class_fractions],
        "class_names": list(CLASS_NAMES),
        "png": "uint16, value = HU + 1024, clipped to [0, 4095]",
        "counts": {sp: dict(zip(CLASS_NAMES, table[sp])) for sp in lines},
        "patients": {sp: dict(zip(CLASS_NAMES, n_patients_split[sp])) for sp in lines},
    }
    for sp, rows in lines.items():
        atomic_write_text(out / f"{sp}.txt", "\n".join(sorted(rows)) + "\n")
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", _readme(info))
    info["seconds"] = time.perf_counter() - start
    logger.info("phantom: wrote %d images to %s in %.1f s", num_images, out, info["seconds"])
    return info


def _readme(info: dict) -> str:
    head = "| split | " + " | ".join(CLASS_NAMES) + " | patients |\n|---|" + "---|" * (len(CLASS_NAMES) + 1) + "\n"
    rows = "".join(
        f"| {sp} | " + " | ".join(str(info["counts"][sp][c]) for c in CLASS_NAMES) + f" | "
        f"{sum(info['patients'][sp].values())} |\n"
        for sp in ("train", "val", "test")
    )
    return (
        "# monai_condflow phantom chest CT\n\n"
        "Synthetic axial chest-CT slices made by `python -m monai_condflow.data.phantom` (generator "
        f"{info['generator_version']}, seed {info['seed']}, {info['num_images']} images of {info['image_size']} px, "
        f"{info['slices_per_patient']} slices per synthetic patient). No real patient data.\n\n"
        "- `images/phantom_p<patient>_s<slice>.png`: 16-bit PNG, value = HU + 1024 (air -1000 HU -> 24).\n"
        "- `train.txt`, `val.txt`, `test.txt`: COVIDx CT format, `<file> <class> <xmin> <ymin> <xmax> <ymax>`, "
        "class 0 normal, 1 pneumonia, 2 COVID-19, box = lungs in pixels. The split is patient-disjoint and "
        "stratified by class.\n\n"
        "Slices per split and class:\n\n" + head + rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m monai_condflow.data.phantom --out DIR [--num-images N] [--seed S]``.

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success, 2 when the output folder is not empty or an argument is bad).
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_condflow.data.phantom",
        description="Generate the embedded phantom chest-CT dataset (PNG slices in COVIDx-CT format, "
        "patient-disjoint train/val/test split files, README.md and dataset.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=600, help="number of slices")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same arguments, byte-identical files)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the square PNG slices")
    parser.add_argument("--slices-per-patient", type=int, default=6, help="slices per synthetic patient")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines (patients done, ETA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = generate_phantom_dataset(
            args.out,
            num_images=args.num_images,
            seed=args.seed,
            image_size=args.image_size,
            slices_per_patient=args.slices_per_patient,
            overwrite=args.overwrite,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_images']} images to {args.out} in {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
