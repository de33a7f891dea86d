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
"""Rendering of the phantom's axial chest-CT slices (:func:`render_slice`), for :mod:`monai_condflow.data.phantom`.

A slice is drawn in Hounsfield units from the patient's slice-independent images (body, noise texture: cached per
image size) and named steps, each a small function: the slice geometry, the thorax window and cavity, mediastinum
and heart, diaphragm domes, cavity contents, lungs (parenchyma, findings of the class from
:mod:`monai_condflow.data.phantom_findings`, vessels), airways, aorta and stomach air, vertebra, ribs and scapulae,
sternum, table, and the acquisition (blur, noise, field of view). Lengths are in body half-widths (``u`` image
right, ``v`` posterior); ``scale`` is the image size / 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from monai_condflow.data.phantom_anatomy import (
    PhantomPatient,
    _lookup,
    _radius_table,
    _smooth_noise,
    _smoothstep,
    _soft,
    _splat,
    sample_patient,
)
from monai_condflow.data.phantom_findings import _bronchograms, _cap_findings, _covid_findings

__all__ = ["render_slice", "render_paired_slices"]

_BOX_MARGIN_PX = 3  # margin of the lung box at 512 px


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


def render_paired_slices(
    rng: np.random.Generator,
    cls: int,
    image_size: int = 512,
    patient: PhantomPatient | None = None,
    z: float | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """Render one slice twice, with and without the class's findings: same patient, height, breathing, vessels,
    noise and noise placement; the two differ only inside the lungs, where the findings are.

    The slice with findings is bit-identical to ``render_slice(rng, cls, image_size, patient, z)`` from the same
    generator state, and ``rng`` is left as that call leaves it. For a normal patient (``cls`` 0) the two are equal.
    This is the ground truth of counterfactuals ("this slice without / with the finding").

    Args:
        rng: random generator for the slice; consumed as by :func:`render_slice`.
        cls: class id, 0 normal, 1 pneumonia, 2 COVID-19.
        image_size: side of the square image in pixels (>= 64).
        patient: the synthetic patient; drawn from ``rng`` when ``None``.
        z: axial position in [0, 1]; drawn from ``rng`` when ``None``.

    Returns:
        ``(hu_with, hu_without, box, lung_mask)``: two float32 ``[image_size, image_size]`` HU images, the lung box
        ``(xmin, ymin, xmax, ymax)`` and the boolean lung mask (the same for both).

    Raises:
        ValueError: as :func:`render_slice`.
    """
    if patient is None:
        patient = sample_patient(rng, cls)
    if z is None:
        z = float(rng.uniform(0.08, 0.95))
    twin = np.random.Generator(type(rng.bit_generator)())
    twin.bit_generator.state = rng.bit_generator.state
    hu_with, box, mask = render_slice(rng, cls, image_size, patient, z, return_mask=True)
    hu_without, _ = _render(twin, patient, float(z), int(image_size), findings=False)
    return hu_with, hu_without, box, mask


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


@dataclass(frozen=True)
class _SliceGeometry:
    """Scalar geometry of one slice in body units (``u`` image right, ``v`` posterior), see :func:`_slice_geometry`."""

    wz: float  # width factor of the cavity at this height (narrow at the apex)
    rx: float  # half axes of the thoracic cavity
    ry: float
    cav_v0: float  # centre of the cavity (v)
    v_ant: float  # anterior and posterior ends of the cavity (v)
    v_post: float
    spine_r: float  # vertebral body: radius and centre (v)
    spine_v: float
    med_u: float  # mediastinum: centre (u) and half width of its band
    band_w: float
    aorta_r: float  # descending aorta: radius and centre
    aorta_u: float
    aorta_v: float


def _slice_geometry(p: dict[str, float], z: float, breath: float) -> _SliceGeometry:
    """The cavity, spine, mediastinum and aorta of a patient at height ``z`` in [0, 1] with breathing ``breath``."""
    wz = 0.72 + 0.28 * _smoothstep(z, 0.0, 0.55)
    hz = 0.80 + 0.20 * _smoothstep(z, 0.0, 0.45)
    rx = p["cav_x"] * wz * (1.0 + breath)
    ry = p["cav_y"] * p["body_b"] * hz * (1.0 + breath)
    cav_v0 = p["cav_dy"]
    v_post = cav_v0 + ry
    spine_r = p["spine_r"]
    spine_v = v_post - 2.0 * spine_r
    aorta_r = p["aorta_r"]
    return _SliceGeometry(
        wz=wz,
        rx=rx,
        ry=ry,
        cav_v0=cav_v0,
        v_ant=cav_v0 - ry,
        v_post=v_post,
        spine_r=spine_r,
        spine_v=spine_v,
        med_u=p["med_u"],
        band_w=p["med_w"] * (0.75 + 0.25 * wz),
        aorta_r=aorta_r,
        aorta_u=p["med_u"] + spine_r + aorta_r * 0.9,
        aorta_v=spine_v - spine_r * 0.5,
    )


@dataclass
class _Thorax:
    """The thorax window of a slice (cavity, ribs, scapulae), where most of the drawing happens, see
    :func:`_thorax`. Arrays are ``[h, w]`` on the window."""

    hu: np.ndarray  # view of the slice's HU on the window: writes go to the slice
    g: _Grid  # the window's grid
    win: tuple[slice, slice]  # (rows, columns) of the window in the slice
    theta: np.ndarray  # angle of each pixel around the body centre
    body: np.ndarray  # soft body mask
    cx: float  # body centre in window pixels (column, row)
    cy: float
    rho_c: np.ndarray  # normalised radius in the cavity ellipse
    r_cav: np.ndarray  # radius of the irregular cavity outline at the pixel's angle
    cavity: np.ndarray  # soft cavity mask


def _thorax(c: dict, full_g: _Grid, hu: np.ndarray, geo: _SliceGeometry) -> _Thorax:
    """The thorax window of the slice ``hu`` ``[size, size]`` and the soft thoracic cavity on it."""
    rx, ry, cav_v0 = geo.rx, geo.ry, geo.cav_v0
    wc0, wc1 = np.searchsorted(full_g.u, [-1.55 * rx, 1.55 * rx])
    wr0, wr1 = np.searchsorted(full_g.v, [cav_v0 - 1.6 * ry, cav_v0 + 1.6 * ry])
    win = (slice(int(wr0), int(wr1)), slice(int(wc0), int(wc1)))
    g = _Grid(full_g.u[win[1]], full_g.v[win[0]], full_g.px)
    u, v = g.u[None, :], g.v[:, None]
    cu_, cv_ = u / rx, (v - cav_v0) / ry
    rho_c = np.sqrt(cu_ * cu_ + cv_ * cv_ - 0.3 * (cu_ * cu_) * (cv_ * cv_) * (v > cav_v0))
    r_cav = c["r_cav"][win]
    return _Thorax(
        hu=hu[win],
        g=g,
        win=win,
        theta=c["theta"][win],
        body=c["body"][win],
        cx=float(c["cx"]) - float(wc0),
        cy=float(c["cy"]) - float(wr0),
        rho_c=rho_c,
        r_cav=r_cav,
        cavity=_soft((rho_c - r_cav) * rx * g.px),
    )


def _mediastinum(
    th: _Thorax, geo: _SliceGeometry, p: dict[str, float], z: float
) -> tuple[np.ndarray, tuple[slice, slice] | None, float]:
    """Mediastinum, heart, great vessels, hila, aorta and spine: what is taken out of the cavity to leave the lungs.

    Returns:
        ``(med, band, heart_s)``: soft mask ``[h, w]``, the window of the mediastinal band (``None`` when outside),
        and the heart's size factor in [0, 1] at this height.
    """
    g = th.g
    v = g.v[:, None]
    med = np.zeros(th.hu.shape, dtype=np.float32)
    med_u, band_w, v_ant, spine_r, spine_v = geo.med_u, geo.band_w, geo.v_ant, geo.spine_r, geo.spine_v
    band = g.window(med_u, 0.0, band_w + 0.1)
    if band is not None:
        cols = band[1]
        taper = 0.3 + 0.7 * _smoothstep(v, v_ant + 0.05, v_ant + 0.45)
        med[:, cols] = _soft((np.abs(g.u[cols] - med_u)[None, :] - band_w * taper) * g.px)
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
    if z > 0.22:
        _union(med, g.ellipse(geo.aorta_u, geo.aorta_v, geo.aorta_r + 0.015, geo.aorta_r + 0.015))
    _union(med, g.ellipse(0.0, spine_v, spine_r * 1.4, spine_r * 1.3))
    _union(med, g.ellipse(0.0, spine_v + 0.35, spine_r * 1.25, 0.35))
    return med, band, heart_s


def _diaphragm_domes(g: _Grid, p: dict[str, float], z: float, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Diaphragm domes near the base: liver under the right lung (image left), spleen / stomach under the left.

    Returns:
        ``(domes, spleen_s)``: soft mask ``shape`` and the spleen's size factor in [0, 1] (for the stomach air).
    """
    domes = np.zeros(shape, dtype=np.float32)
    liver_s = float(_smoothstep(z, p["liver_z"], 1.03))
    if liver_s > 0.0:
        _union(domes, g.ellipse(-0.3, -0.15, 0.8 * liver_s, 0.6 * liver_s, 0.2))
    spleen_s = float(_smoothstep(z, p["liver_z"] + 0.06, 1.06))
    if spleen_s > 0.0:
        _union(domes, g.ellipse(0.38, -0.05, 0.6 * spleen_s, 0.5 * spleen_s, -0.3))
    return domes, spleen_s


def _cavity_contents(
    th: _Thorax,
    geo: _SliceGeometry,
    med: np.ndarray,
    domes: np.ndarray,
    band: tuple[slice, slice] | None,
    heart_s: float,
) -> None:
    """Fill the cavity (in place): mediastinal soft tissue with fat around the vessels, liver and spleen under the
    domes."""
    hu, cavity, g = th.hu, th.cavity, th.g
    hu += cavity * (35.0 - hu)
    if band is not None:
        cols = band[1]
        mfat = _smoothstep(np.abs(g.u[cols] - geo.med_u), geo.band_w * 0.45, geo.band_w * 0.9)[None, :]
        hu[:, cols] -= cavity[:, cols] * med[:, cols] * mfat * (130.0 * (1.0 - 0.6 * heart_s))
    hu += domes * cavity * 20.0


def _lung_window(lung: np.ndarray, scale: float) -> tuple[slice, slice]:
    """Bounding window ``(rows, columns)`` of the lung mask ``lung`` ``[h, w]``, with a margin of a few pixels."""
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    pad = int(6 * scale) + 2
    r0, r1 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + pad + 1, lung.shape[0])
    c0, c1 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + pad + 1, lung.shape[1])
    return slice(r0, r1), slice(c0, c1)


def _edge_distance(lmask: np.ndarray, w_px: float, scale: float) -> np.ndarray:
    """Distance (body units) of each pixel of ``lmask`` ``[h, w]`` to the lung edge, on a coarse grid for speed."""
    shape = lmask.shape
    f = max(1, int(round(4 * scale)))
    dist_c = ndimage.distance_transform_edt(np.pad(lmask[::f, ::f], 1))[1:-1, 1:-1]
    return np.repeat(np.repeat(dist_c, f, axis=0), f, axis=1)[: shape[0], : shape[1]] * np.float32(f / w_px)


def _parenchyma(
    rng: np.random.Generator,
    p: dict[str, float],
    z: float,
    breath: float,
    uu: np.ndarray,
    vv: np.ndarray,
    vt: np.ndarray,
    lmask: np.ndarray,
    w_px: float,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Healthy lung density on the lung window: breathing, dependent gradient, texture, oblique fissures and (in
    every class) dependent subpleural atelectasis.

    Returns:
        ``(lung_hu, dist)``: float32 HU ``[h, w]`` and the distance to the lung edge (:func:`_edge_distance`).
    """
    shape = lmask.shape
    lung_hu = (p["lung_hu"] - breath * 800.0) + p["dependent_hu"] * vt * vt
    lung_hu = lung_hu + 10.0 * _smooth_noise(rng, shape, 10 * scale)
    if p["fissure"] > 0.5 and 0.3 < z < 0.95:  # oblique fissures: faint thin lines
        for side in (-1.0, 1.0):
            f_off = p["fissure_a"] * 0.1 + (z - 0.6) * 0.6
            dist_f = (np.abs(uu) * 0.5 + vv * 0.87 - f_off) * w_px
            fis = np.exp(-(dist_f**2) / (0.8 * scale + 0.3) ** 2) * ((side * uu) > 0.3)
            lung_hu = lung_hu + fis * 110.0
    dist = _edge_distance(lmask, w_px, scale)
    if p["atelectasis"] > 0.5:  # dependent subpleural density
        atel = _smoothstep(p["atel_thick"] - dist, -0.008, 0.008) * _smoothstep(vt, 0.7, 0.9)
        atel = atel * np.clip(_smooth_noise(rng, shape, 8 * scale) + 0.8, 0.0, 1.0)
        lung_hu = lung_hu + atel * (-300.0 - lung_hu)
    return lung_hu.astype(np.float32), dist


def _vessels(
    rng: np.random.Generator,
    pt: PhantomPatient,
    z: float,
    lmask: np.ndarray,
    dist: np.ndarray,
    centre: tuple[float, float],
    offset: tuple[int, int],
    w_px: float,
    scale: float,
) -> np.ndarray:
    """Pulmonary vessels on the lung window: the 3-D tree's points in a slab around this height, blurred to dots and
    tubes, plus small vessels seen in cross-section (dots everywhere, larger and denser towards the hila).

    Args:
        centre: body centre ``(row, column)`` in thorax-window pixels.
        offset: ``(row, column)`` of the lung window in the thorax window.

    Returns:
        Vessel weight ``[h, w]`` in [0, 1), faded out at the lung edge.
    """
    shape = lmask.shape
    pts = pt.vessels
    sel = pts[np.abs(pts[:, 2] - z * 2.0) < 0.02]
    vessel = np.zeros(shape, dtype=np.float32)
    for lo, hi, sigma, gain in ((0, 1, 2.2, 1.3), (2, 8, 1.1, 1.1)):
        m = (sel[:, 3] >= lo) & (sel[:, 3] <= hi)
        if not m.any():
            continue
        s_px = max(sigma * scale, 0.5)
        imp = _splat(
            shape,
            sel[m, 1] * w_px + centre[0] - offset[0],
            sel[m, 0] * w_px + centre[1] - offset[1],
            2.0 * np.pi * s_px * s_px * gain,
        )
        np.maximum(vessel, ndimage.gaussian_filter(imp, s_px, truncate=2.5), out=vessel)
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
    return (1.0 - np.exp(-1.4 * vessel)) * _smoothstep(dist, 0.0, 0.025)


def _lungs(
    rng: np.random.Generator,
    pt: PhantomPatient,
    z: float,
    th: _Thorax,
    geo: _SliceGeometry,
    lung_w: np.ndarray,
    breath: float,
    scale: float,
    findings: bool = True,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Draw the lungs (in place, on their bounding window): parenchyma, the class's findings, vessels, bronchograms.

    Args:
        lung_w: soft lung weight ``[h, w]`` on the thorax window (cavity minus mediastinum and domes).
        findings: ``False`` draws the findings (consuming ``rng`` as usual) but leaves them out of the image.

    Returns:
        ``(window, lmask)``: the lung window in the thorax window and its boolean lung mask.
    """
    w_px = th.g.px
    lung = lung_w > 0.5
    sl = _lung_window(lung, scale)
    (r0, c0), lw, lmask = (sl[0].start, sl[1].start), lung_w[sl], lung[sl]
    shape = lw.shape
    uu = np.broadcast_to(th.g.u[None, sl[1]], shape)
    vv = np.broadcast_to(th.g.v[sl[0], None], shape)
    vt = np.clip((vv - (geo.v_ant + 0.4 * geo.ry)) / (1.6 * geo.ry), 0.0, 1.0)  # 0 anterior .. 1 posterior
    lung_hu, dist = _parenchyma(rng, pt.params, z, breath, uu, vv, vt, lmask, w_px, scale)
    healthy = lung_hu
    cons, regions = np.zeros(shape, dtype=np.float32), []
    if pt.cls == 2:
        lung_hu = _covid_findings(rng, pt, z, lung_hu, lmask, dist, uu, vt, w_px, scale)
    elif pt.cls == 1:
        lung_hu, cons, regions = _cap_findings(rng, pt, z, lung_hu, lmask, uu, w_px, scale)
    vessel = _vessels(rng, pt, z, lmask, dist, (th.cy, th.cx), (r0, c0), w_px, scale)
    lung_hu = lung_hu + vessel * (40.0 - lung_hu) * 0.95
    if regions:
        lung_hu = _bronchograms(rng, lung_hu, cons, regions, scale)
    if not findings:
        # the findings were drawn (the generator advanced exactly as with them) and are dropped here, so every
        # later draw (vessels, noise placement) is the one of the slice with findings
        lung_hu = healthy + vessel * (40.0 - healthy) * 0.95
    region = th.hu[sl]
    th.hu[sl] = region + lw * (lung_hu - region)
    return sl, lmask


def _airways(hu: np.ndarray, g: _Grid, geo: _SliceGeometry, p: dict[str, float], z: float) -> None:
    """Trachea above the carina, main bronchi just below (in place)."""
    car = p["carina_z"]
    med_u = geo.med_u
    tr_v = geo.v_ant + 0.5 * (geo.spine_v - geo.v_ant)
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


def _aorta_and_stomach(
    hu: np.ndarray, g: _Grid, geo: _SliceGeometry, p: dict[str, float], z: float, spleen_s: float
) -> None:
    """Lumen of the descending aorta and the stomach's air bubble under the left dome (in place)."""
    if z > 0.22:
        _paint(hu, g.ellipse(geo.aorta_u, geo.aorta_v, geo.aorta_r, geo.aorta_r), 45.0)
    if p["stomach_air"] > 0.5 and spleen_s > 0.5:
        _paint(hu, g.ellipse(0.45, -0.08, 0.16 * spleen_s, 0.09 * spleen_s, -0.2), -1000.0)


def _vertebra(hu: np.ndarray, g: _Grid, geo: _SliceGeometry) -> None:
    """Vertebra: cortex, cancellous core, canal, arch and transverse processes (in place)."""
    spine_r, spine_v = geo.spine_r, geo.spine_v
    _paint(hu, g.ellipse(0.0, spine_v, spine_r, spine_r * 0.92), 750.0)
    _paint(hu, g.ellipse(0.0, spine_v, spine_r * 0.8, spine_r * 0.72), 230.0)
    canal_v = spine_v + spine_r * 1.55
    _paint(hu, g.ellipse(0.0, canal_v, spine_r * 0.85, spine_r * 0.7), 600.0)
    _paint(hu, g.ellipse(0.0, canal_v + spine_r * 1.0, spine_r * 0.2, spine_r * 0.6), 600.0)
    for sgn in (-1.0, 1.0):  # transverse processes
        _paint(hu, g.ellipse(sgn * spine_r * 1.4, canal_v - 0.01, spine_r * 0.75, spine_r * 0.22, sgn * 0.4), 500.0)
    _paint(hu, g.ellipse(0.0, canal_v, spine_r * 0.5, spine_r * 0.45), 20.0)


def _ribs_and_scapulae(th: _Thorax, geo: _SliceGeometry, p: dict[str, float], z: float) -> None:
    """Ribs (short arcs just outside the cavity, shifting with the height) and, near the apex, the scapulae (in
    place, on the thorax window)."""
    hu, theta, rho_c, r_cav = th.hu, th.theta, th.rho_c, th.r_cav
    w_px = th.g.px
    n_ribs = int(p["rib_n"])
    ang_tab = np.linspace(-np.pi, np.pi, 2048, dtype=np.float32)
    win = np.zeros_like(ang_tab)
    for k in range(2 * n_ribs):
        centre = -np.pi + (k + 0.5 + p["rib_phase"] + 3.0 * z) * (np.pi / n_ribs)
        dang = np.angle(np.exp(1j * (ang_tab - centre))).astype(np.float32)
        np.maximum(win, np.clip((p["rib_w"] - np.abs(dang)) / 0.03, 0.0, 1.0), out=win)
    win *= np.clip((np.abs(np.abs(ang_tab) - np.pi / 2) - 0.22) / 0.1, 0.0, 1.0)  # none on the midlines
    ring_d = np.abs(rho_c - r_cav - 0.06) * (geo.rx * w_px)
    rib_t = 0.026 * w_px
    near = ring_d < rib_t + 1.0
    rib_ang = _lookup(win, theta[near]) * th.body[near]
    hu[near] += _soft(ring_d[near] - rib_t) * rib_ang * (650.0 - hu[near])
    hu[near] += _soft(ring_d[near] - rib_t * 0.4) * rib_ang * (220.0 - hu[near])
    sc_s = 1.0 - float(_smoothstep(z, 0.3, 0.55))
    if sc_s > 0.05:
        sc_tab = np.clip((0.3 - np.abs(np.abs(ang_tab) - 2.3)) / 0.05, 0.0, 1.0) * (ang_tab > 0)
        sc_d = np.abs(rho_c - r_cav - 0.22) * (geo.rx * w_px)
        near = sc_d < 0.02 * w_px + 1.0
        hu[near] += _soft(sc_d[near] - 0.016 * w_px * sc_s) * _lookup(sc_tab, theta[near]) * (550.0 - hu[near])


def _sternum(hu: np.ndarray, g: _Grid, geo: _SliceGeometry, z: float) -> None:
    """Sternum below the apex (in place)."""
    if z > 0.1:
        _paint(hu, g.ellipse(geo.med_u * 0.5, geo.v_ant - 0.07, 0.1, 0.04), 600.0)
        _paint(hu, g.ellipse(geo.med_u * 0.5, geo.v_ant - 0.07, 0.075, 0.022), 200.0)


def _table(hu: np.ndarray, c: dict, p: dict[str, float], scale: float) -> None:
    """The scanner table under the patient, outside the body (in place; not every patient lies on one)."""
    if p["table"] <= 0.5:
        return
    size = hu.shape[0]
    w_px, cy, b = float(c["w_px"]), float(c["cy"]), p["body_b"]
    top = int(min(cy + b * w_px * 0.8, size - 1))
    yy = np.arange(top, size, dtype=np.float32)[:, None]
    xx = (np.arange(size, dtype=np.float32)[None, :] - size / 2) / size
    curve = cy + (b + p["table_gap"]) * w_px - 0.35 * size * xx * xx
    tab = hu[top:]
    outside = 1.0 - c["body"][top:]
    for off, val, thick in ((0.0, 120.0, 1.0), (0.02, 250.0, 1.5), (0.055, 100.0, 1.0)):
        tab += _soft(np.abs(yy - curve - off * size) - thick * scale) * outside * (val - tab)


def _acquisition(rng: np.random.Generator, hu: np.ndarray, c: dict, p: dict[str, float], scale: float) -> np.ndarray:
    """What the scanner adds: blur, a fresh view of the patient's noise texture, the field of view.

    Returns:
        float32 HU ``[size, size]`` (outside the field of view -1024).
    """
    size = hu.shape[0]
    hu = ndimage.gaussian_filter(hu, p["blur"] * scale + 0.2, truncate=2.5)
    shift = rng.integers(0, size, 2)
    noise = np.roll(c["noise"], (int(shift[0]), int(shift[1])), axis=(0, 1))
    if rng.random() < 0.5:
        noise = noise[::-1]
    hu += noise * c["noise_amp"]
    hu[c["outside_fov"]] = -1024.0
    return hu.astype(np.float32)


def _render(
    rng: np.random.Generator, pt: PhantomPatient, z: float, size: int, findings: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one slice of ``pt`` at height ``z``, from the inside of the thorax outwards, then the acquisition
    (``findings=False``: the class's findings are drawn but left out, see :func:`render_paired_slices`).

    Returns:
        ``(hu, mask)``: float32 HU ``[size, size]`` and the boolean lung mask ``[size, size]``.
    """
    p = pt.params
    scale = size / 512.0
    c = _patient_cache(pt, size)
    g = _Grid(c["u"], c["v"], float(c["w_px"]))
    hu = c["base"].copy()
    breath = float(rng.normal(0.0, 0.012))  # breathing / scan-to-scan variation of this slice
    geo = _slice_geometry(p, z, breath)
    th = _thorax(c, g, hu, geo)  # the cavity, lungs, ribs and scapulae are drawn on this window only
    med, band, heart_s = _mediastinum(th, geo, p, z)
    domes, spleen_s = _diaphragm_domes(th.g, p, z, th.hu.shape)
    lung_w = th.cavity * (1.0 - med) * (1.0 - domes)
    _cavity_contents(th, geo, med, domes, band, heart_s)
    lung_win, lmask = _lungs(rng, pt, z, th, geo, lung_w, breath, scale, findings)
    mask = np.zeros((size, size), dtype=bool)
    mask[th.win][lung_win] = lmask
    _airways(hu, g, geo, p, z)
    _aorta_and_stomach(hu, g, geo, p, z, spleen_s)
    _vertebra(hu, g, geo)
    _ribs_and_scapulae(th, geo, p, z)
    _sternum(hu, g, geo, z)
    _table(hu, c, p, scale)
    return _acquisition(rng, hu, c, p, scale), mask
