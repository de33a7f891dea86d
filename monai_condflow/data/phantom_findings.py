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
"""Class-specific findings of the phantom, drawn on the lung window of one slice: COVID-19 ground-glass opacities,
pneumonia consolidation with its air bronchograms (see :mod:`monai_condflow.data.phantom_render`).

Arrays are float32 ``[h, w]`` on the lung window; ``lmask`` is its boolean lung mask, ``uu`` / ``vt`` the
horizontal body coordinate and the 0 (anterior) .. 1 (posterior) depth, ``dist`` the distance to the lung edge (body
units), ``w_px`` pixels per body unit and ``scale`` the image size / 512.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from monai_condflow.data.phantom_anatomy import PhantomPatient, _smooth_noise, _splat

__all__: list[str] = []


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


def _covid_findings(
    rng: np.random.Generator,
    pt: PhantomPatient,
    z: float,
    lung_hu: np.ndarray,
    lmask: np.ndarray,
    dist: np.ndarray,
    uu: np.ndarray,
    vt: np.ndarray,
    w_px: float,
    scale: float,
) -> np.ndarray:
    """Bilateral, peripheral, patchy ground-glass opacities (sometimes crazy paving or consolidation).

    Returns:
        The lung HU ``[h, w]`` with the opacities blended in.
    """
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


def _cap_findings(
    rng: np.random.Generator,
    pt: PhantomPatient,
    z: float,
    lung_hu: np.ndarray,
    lmask: np.ndarray,
    uu: np.ndarray,
    w_px: float,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Lobar / segmental consolidation in one lung (rarely both), with a ground-glass halo and a fissure edge.

    Returns:
        ``(lung_hu, consolidation, regions)``: the lung HU ``[h, w]``, the consolidation weight ``[h, w]`` in
        ``[0, 1]`` and one ``{"anchor", "centre", "rad"}`` (pixels) per consolidated region, for
        :func:`_bronchograms`.
    """
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


def _bronchograms(
    rng: np.random.Generator, lung_hu: np.ndarray, cons: np.ndarray, regions: list[dict], scale: float
) -> np.ndarray:
    """Air bronchograms: dark branching tubes visible only inside the consolidation ``cons`` ``[h, w]``.

    Returns:
        The lung HU ``[h, w]`` with the bronchograms.
    """
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
