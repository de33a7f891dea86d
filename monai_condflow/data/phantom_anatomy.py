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
"""The synthetic patients of the phantom (:mod:`monai_condflow.data.phantom`) and the shape / noise primitives that
its renderer (:mod:`monai_condflow.data.phantom_render`) draws them with.

A patient is drawn once (body habitus, thoracic cavity, mediastinum, spine, ribs, densities, a 3-D pulmonary vessel
tree, and the class-specific findings parameters) and shared by all of its slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["PhantomPatient", "sample_patient"]


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


def _soft(sd_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside weight from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sd_px, 0.0, 1.0)
