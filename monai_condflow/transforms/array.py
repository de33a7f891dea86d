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
"""Array transforms for 2-D chest-CT slices: loading, grayscale, HU windowing, lung-box / body crops,
dequantisation and validation.

Orientation convention: every transform here works on channel-first slices ``[C, H, W]`` in row-major
order (axis 1 = row = y, axis 2 = column = x), the layout of PIL / pydicom pixel arrays and of the
``.npz`` arrays. Lung boxes are ``(xmin, ymin, xmax, ymax)`` with x = column and y = row; the max
bounds are exclusive (Python slice convention, as COVIDNet-CT crops ``image[ymin:ymax, xmin:xmax]``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.transforms import (
    EnsureChannelFirst,
    Orientation,
    RandomizableTransform,
    ScaleIntensityRange,
    SpatialCrop,
)
from monai.transforms.transform import Transform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage

from monai_condflow.utils.loading import load_writable, make_load_image

__all__ = [
    "INTENSITY_MODES",
    "DEFAULT_MAX_PIXELS",
    "LoadCTSlice",
    "ToGrayscale",
    "HUOffset",
    "CTWindow",
    "CTIntensity",
    "LungBoxCrop",
    "AutoBodyCrop",
    "Dequantize",
    "ValidateImage",
]

logger = logging.getLogger(__name__)

HU_OFFSET_MAX = 4095
"""The largest stored value of a 12-bit CT slice saved as HU + 1024 (3071 HU)."""
MAX_SHARE_ABOVE_CT_RANGE = 0.05
"""Share of a 16-bit slice's pixels above :data:`HU_OFFSET_MAX` beyond which ``CTIntensity("auto")`` refuses to read
it as HU + 1024 (metal can exceed the 12-bit range in a few pixels; a full-range 16-bit export in most)."""
INTENSITY_MODES = ("auto", "hu", "hu_offset", "uint8", "uint16", "unit")
"""Intensity modes understood by :class:`CTIntensity`."""

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
DEFAULT_MAX_PIXELS = 4096 * 4096
"""Default pixel limit of :class:`LoadCTSlice`: larger images are refused from their header, before decoding."""


def _where(source: str | None) -> str:
    """Prefix for error messages naming the record (or file) that caused them."""
    return f"{source}: " if source else ""


def _is_float(img: NdarrayOrTensor) -> bool:
    return img.dtype.is_floating_point if isinstance(img, torch.Tensor) else bool(np.issubdtype(img.dtype, np.floating))


def _shape(img: NdarrayOrTensor) -> tuple[int, ...]:
    return tuple(int(s) for s in img.shape)


class LoadCTSlice(Transform):
    """Load one 2-D slice from a file path, or take an in-memory array, and return it channel-first.

    Paths are read with MONAI's :class:`~monai.transforms.LoadImage` (PIL for PNG / JPG, pydicom for DICOM with
    the rescale slope / intercept applied, i.e. in HU, nibabel for NIfTI) and made channel-first with
    :class:`~monai.transforms.EnsureChannelFirst`. The stored dtype is kept (``LoadImage(dtype=None)``) so that
    :class:`CTIntensity` can decide the intensity mode from it; 16-bit PNGs, which PIL hands over as int32, are
    cast back to ``uint16``. The result is in row-major order ``[C, H, W]`` for every format: PIL and pydicom
    arrays are read without MONAI's axis swap, and a 2-D NIfTI slice (or a volume of one slice) is shown as DICOM
    viewers show an axial slice, rows from anterior to posterior and columns from the patient's right to their left
    (turned to ``LP`` with :class:`~monai.transforms.Orientation` from the file's affine, then transposed), the
    display of :func:`~monai_condflow.data.readers.read_nifti_slices`' slices.

    Arrays (numpy or torch, or anything ``np.asarray`` reads, such as the lazy NIfTI slices of
    :func:`~monai_condflow.data.readers.read_nifti_slices`) are accepted as ``[H, W]`` (a channel axis is added) or
    channel-first ``[C, H, W]``.

    Args:
        check_exists: raise ``FileNotFoundError`` naming the file before trying the readers (MONAI otherwise tries
            every registered reader and prints their tracebacks).
        max_pixels: largest image (pixels per slice, ``H * W``) to decode; the size is read from the file's header
            (PNG / JPEG / TIFF ..., NIfTI, DICOM) before any pixel is decoded, so a small file that claims a huge
            image (a decompression bomb) costs no memory. ``None`` disables the limit (PIL's own decompression-bomb
            check still applies). Default :data:`DEFAULT_MAX_PIXELS` (4096 x 4096).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be read (corrupt / unsupported), is larger than ``max_pixels`` or is a
            decompression bomb, or an array has a shape other than ``[H, W]`` / ``[C, H, W]``; the message names the
            file / record.
    """

    def __init__(self, check_exists: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) < 1):
            raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.check_exists = check_exists
        readers = [NibabelReader(), PydicomReader(swap_ij=False), PILReader(reverse_indexing=False)]
        self.loader = make_load_image(reader=readers, image_only=True, dtype=None)
        self.channel_first = EnsureChannelFirst()
        self.radiological = Orientation(axcodes="LP", labels=None)

    def _load_path(self, path: str | os.PathLike, source: str | None) -> NdarrayOrTensor:
        name = os.fspath(path)
        where = f"{name} (record {source})" if source and source != name else name
        if self.check_exists and not os.path.isfile(name):
            raise FileNotFoundError(f"image file not found: {where}")
        self._check_size(name, where)
        try:
            img = load_writable(self.loader, name)
        except Exception as e:  # MONAI wraps every reader failure into one long RuntimeError
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot read image file {where}: {first_line}") from None
        meta = getattr(img, "meta", {})
        lower = name.lower()
        if lower.endswith(_NIFTI_SUFFIXES):
            if img.ndim == 3 and img.shape[-1] == 1:  # a volume of one slice
                img = img[..., 0]
            if img.ndim != 2:
                raise ValueError(f"expected a 2-D NIfTI slice in {where}, got an array of shape {_shape(img)}")
            # as DICOM viewers show an axial slice (rows anterior -> posterior, columns patient right -> left):
            # turned to LP from the file's affine, then rows = the P axis
            img = self.radiological(self.channel_first(img)).transpose(1, 2)
            return img
        img = self.channel_first(img)
        if meta.get("mode") in _PIL_16BIT_MODES:
            img = self._to_uint16(img, where)
        return img

    def _check_size(self, name: str, where: str) -> None:
        """Refuse, from the header only, an image above ``max_pixels`` or one PIL flags as a decompression bomb."""
        from PIL import Image

        lower = name.lower()
        try:
            if lower.endswith(_NIFTI_SUFFIXES):
                import nibabel as nib

                shape = tuple(int(v) for v in nib.load(name).shape)  # header only; the data is a lazy proxy
                pixels = int(np.prod(shape[:2])) if shape else 0
                size = " x ".join(str(v) for v in shape[:2])
            else:
                try:
                    with Image.open(name) as im:  # reads the header; no pixel is decoded here
                        width, height = im.size
                except Image.UnidentifiedImageError:
                    rows, cols = _dicom_size(name)
                    width, height = cols, rows
                pixels, size = width * height, f"{width} x {height}"
        except Image.DecompressionBombError as err:
            raise ValueError(
                f"refusing image file {where}: decompression bomb (PIL: {err}). The file claims far more pixels than a "
                "CT slice; it was not decoded."
            ) from None
        except Exception:  # noqa: BLE001 - unreadable headers are reported by the loader with its own message
            return
        if self.max_pixels is not None and pixels > self.max_pixels:
            raise ValueError(
                f"refusing image file {where}: {size} = {pixels} pixels is above the limit of {self.max_pixels} "
                "(LoadCTSlice max_pixels); it was not decoded. Raise max_pixels if such images are expected."
            )

    @staticmethod
    def _to_uint16(img: NdarrayOrTensor, where: str) -> NdarrayOrTensor:
        """Restore the stored uint16 dtype of a 16-bit PNG (PIL yields int32); torch lacks full uint16 support,
        so the result is a numpy array with the MetaTensor's meta dropped."""
        arr = np.asarray(img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"16-bit image {where} has values outside [0, 65535]")
        return arr.astype(np.uint16)

    def __call__(self, img: str | os.PathLike | NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: a file path, or an array ``[H, W]`` / ``[C, H, W]``.
            source: the record's ``source`` (used in error messages only).

        Returns:
            the slice, channel-first ``[C, H, W]``, with its stored dtype.
        """
        if isinstance(img, (str, Path, os.PathLike)):
            return self._load_path(img, source)
        if not isinstance(img, (np.ndarray, torch.Tensor)) and hasattr(img, "__array__"):
            img = np.asarray(img)  # e.g. a NiftiSlice of read_nifti_slices, read here
        if not isinstance(img, (np.ndarray, torch.Tensor)):
            raise ValueError(f"{_where(source)}expected a file path or an array, got {type(img).__name__}")
        if img.ndim == 2:
            return img[None]
        if img.ndim == 3:
            return img
        raise ValueError(f"{_where(source)}expected an array [H, W] or [C, H, W], got shape {_shape(img)}")


def _dicom_size(name: str) -> tuple[int, int]:
    """``(rows, columns)`` of a DICOM file from its header (pixel data not read); frames multiply the rows."""
    import pydicom

    ds = pydicom.dcmread(name, stop_before_pixels=True)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return int(ds.Rows) * frames, int(ds.Columns)


class ToGrayscale(Transform):
    """Convert a channel-first slice to one channel: RGB / RGBA -> luminance (ITU-R BT.601 weights
    ``0.299 R + 0.587 G + 0.114 B``, as PIL's ``convert("L")``; alpha is ignored), gray + alpha -> gray,
    one channel -> unchanged. Integer inputs stay in their dtype (the luminance is rounded), so that the
    stored bit depth still drives :class:`CTIntensity`.

    Raises:
        ValueError: the input is not ``[C, H, W]`` with C in 1..4 (message gives the shape).
    """

    weights = (0.299, 0.587, 0.114)

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: ``[C, H, W]``, C in {1, 2, 3, 4}.
            source: the record's ``source`` (used in error messages only).

        Returns:
            ``[1, H, W]`` with the input's type and dtype.
        """
        if img.ndim != 3 or not 1 <= img.shape[0] <= 4:
            raise ValueError(
                f"{_where(source)}expected a channel-first image [C, H, W] with 1 to 4 channels, got shape "
                f"{_shape(img)}"
            )
        channels = img.shape[0]
        if channels == 1:
            return img
        if channels == 2:
            return img[:1]
        t, *_ = convert_data_type(img, torch.Tensor, dtype=torch.float64)
        gray = (t[0] * self.weights[0] + t[1] * self.weights[1] + t[2] * self.weights[2])[None]
        if not _is_float(img):
            gray = torch.round(gray)
        out, *_ = convert_to_dst_type(gray, img, dtype=img.dtype)
        return out


class HUOffset(Transform):
    """Undo a stored intensity offset: ``hu = float32(x) - offset``, e.g. uint16 PNGs that store HU + 1024
    (COVID-CT-MD raw samples, the embedded phantom). The cast to float32 comes first, so unsigned inputs do not
    wrap around.

    Args:
        offset: the offset that was added when the file was stored (1024 by default).
    """

    def __init__(self, offset: float = 1024.0) -> None:
        self.offset = float(offset)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            img: any shape, any real dtype.

        Returns:
            float32, same shape and type (numpy in, numpy out; tensor in, tensor out).
        """
        if isinstance(img, np.ndarray):
            return img.astype(np.float32) - np.float32(self.offset)
        return img.to(torch.float32) - self.offset


class CTWindow(Transform):
    """Window CT values in HU to ``[0, 1]``: ``clip((hu - (level - width / 2)) / width, 0, 1)``, float32.

    A thin wrapper over MONAI's :class:`~monai.transforms.ScaleIntensityRange` with ``a_min = level - width / 2``,
    ``a_max = level + width / 2``, ``b_min = 0``, ``b_max = 1``, ``clip=True``. The default lung window
    (level -600, width 1500) maps [-1350, 150] HU to [0, 1], as COVIDNet-CT does.

    Args:
        level: window centre in HU.
        width: window width in HU (> 0).

    Raises:
        ValueError: ``width <= 0``.
    """

    def __init__(self, level: float = -600.0, width: float = 1500.0) -> None:
        if not width > 0:
            raise ValueError(f"CT window width must be > 0, got {width}")
        self.level = float(level)
        self.width = float(width)
        self.scaler = ScaleIntensityRange(
            a_min=self.level - self.width / 2, a_max=self.level + self.width / 2, b_min=0.0, b_max=1.0, clip=True,
            dtype=np.float32,
        )  # fmt: skip

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            img: HU values, any shape.

        Returns:
            float32 in ``[0, 1]``, same shape.
        """
        if isinstance(img, np.ndarray):
            img = img.astype(np.float32, copy=False)
        elif not img.dtype.is_floating_point:
            img = img.to(torch.float32)
        return self.scaler(img)


class CTIntensity(Transform):
    """Map a slice's stored intensities to float32 ``[0, 1]``.

    Modes:
        - ``"hu"``: values are HU -> :class:`CTWindow`.
        - ``"hu_offset"``: values are HU + 1024 (uint16 PNGs) -> :class:`HUOffset` then :class:`CTWindow`.
        - ``"uint8"``: ``x / 255``; ``"uint16"``: ``x / 65535`` (plain 8- / 16-bit images, no HU meaning).
        - ``"unit"``: already in ``[0, 1]``; cast to float32 (values outside ``[0, 1]`` raise).
        - ``"auto"``: decided per image from its dtype (see :meth:`resolve_mode`): uint8 / bool -> ``"uint8"``,
          uint16 -> ``"hu_offset"``, other integers -> ``"hu"``, floats within ``[0, 1]`` -> ``"unit"``,
          other floats -> ``"hu"``. A 16-bit slice with more than 5 % of its pixels above 4095 (3071 HU) is not
          read as HU + 1024 but refused, naming the record and the modes to pass (a full-range 16-bit export would
          come out almost all white).

    Args:
        mode: one of :data:`INTENSITY_MODES`.
        window: ``(level, width)`` of the HU window.

    Raises:
        ValueError: unknown mode; in ``"unit"`` mode, values outside ``[0, 1]``; in ``"auto"`` mode, a 16-bit
            slice that is not HU + 1024 (messages name the record).
    """

    def __init__(self, mode: str = "auto", window: Sequence[float] = (-600.0, 1500.0)) -> None:
        if mode not in INTENSITY_MODES:
            raise ValueError(f"unknown intensity mode {mode!r}; expected one of {INTENSITY_MODES}")
        if len(window) != 2:
            raise ValueError(f"window must be (level, width), got {tuple(window)}")
        self.mode = mode
        self.window = CTWindow(level=window[0], width=window[1])
        self.offset = HUOffset(1024.0)

    @staticmethod
    def _check_hu_offset(img: NdarrayOrTensor, source: str | None) -> None:
        """Refuse a 16-bit slice that ``"auto"`` would read as HU + 1024 but whose values are not CT numbers: more
        than :data:`MAX_SHARE_ABOVE_CT_RANGE` of its pixels above 4095 (3071 HU, the top of the 12-bit CT range),
        as in a 16-bit export scaled to the full 0-65535 range, which the HU window would turn almost all white."""
        values = img.to(torch.int32) if isinstance(img, torch.Tensor) else img  # torch compares no uint16 on the CPU
        above = float((values > HU_OFFSET_MAX).sum()) / max(int(np.prod(img.shape)), 1)
        if above > MAX_SHARE_ABOVE_CT_RANGE:
            raise ValueError(
                f"{_where(source)}a 16-bit image whose values are not HU + 1024 (how intensity 'auto' reads 16-bit "
                f"slices): {100 * above:.1f} % of its pixels are above {HU_OFFSET_MAX} (3071 HU). If the files hold "
                "plain 16-bit grey levels (e.g. an export scaled to 0-65535), pass intensity 'uint16' (bundle: "
                "--intensity uint16); if they hold HU, 'hu'."
            )

    @staticmethod
    def resolve_mode(img: NdarrayOrTensor) -> str:
        """The mode ``"auto"`` picks for ``img`` (see the class docstring)."""
        dtype = np.dtype(str(img.dtype).replace("torch.", "")) if isinstance(img, torch.Tensor) else img.dtype
        if dtype == np.uint8 or dtype == np.bool_:
            return "uint8"
        if dtype == np.uint16:
            return "hu_offset"
        if np.issubdtype(dtype, np.integer):
            return "hu"
        lo, hi = float(img.min()), float(img.max())
        return "unit" if 0.0 <= lo and hi <= 1.0 else "hu"

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: a slice, any shape.
            source: the record's ``source`` (used in error messages only).

        Returns:
            float32 in ``[0, 1]``, same shape.
        """
        mode = self.resolve_mode(img) if self.mode == "auto" else self.mode
        if mode == "hu":
            return self.window(img)
        if mode == "hu_offset":
            if self.mode == "auto":
                self._check_hu_offset(img, source)
            return self.window(self.offset(img))
        out, *_ = convert_data_type(img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        if mode == "uint8":
            return out / 255.0
        if mode == "uint16":
            return out / 65535.0
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{_where(source)}intensity mode 'unit' needs values in [0, 1], got [{lo:g}, {hi:g}]")
        return out


class LungBoxCrop(Transform):
    """Crop a channel-first slice to a lung box ``(xmin, ymin, xmax, ymax)`` (x = column, y = row, max exclusive),
    optionally enlarged by ``margin`` pixels (clipped to the image). Uses MONAI's
    :class:`~monai.transforms.SpatialCrop` with ``roi_start = (ymin, xmin)``, ``roi_end = (ymax, xmax)``.

    Non-integer box values are widened to whole pixels (floor of the mins, ceil of the maxes).

    Args:
        margin: pixels added on every side of the box after validation.

    Raises:
        ValueError: the box does not have 4 finite values, is empty (``xmax == xmin`` or ``ymax == ymin``),
            inverted (``xmax < xmin`` or ``ymax < ymin``) or out of the image (negative mins, ``xmax > W`` or
            ``ymax > H``); the message names the record's source, the box and the image size.
    """

    def __init__(self, margin: int = 0) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = int(margin)

    @staticmethod
    def validate_box(box: Sequence[float], height: int, width: int, source: str | None = None) -> tuple[int, ...]:
        """Check ``box`` against an image of ``height`` x ``width`` and return it as whole pixels.

        Returns:
            ``(xmin, ymin, xmax, ymax)`` as ints.
        """
        where = _where(source)
        size = f"image size (W x H) {width} x {height}"
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            raise ValueError(f"{where}lung box must be 4 numbers (xmin, ymin, xmax, ymax), got {box!r}") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{where}lung box must be 4 finite numbers (xmin, ymin, xmax, ymax), got {box!r}")
        xmin, ymin = math.floor(values[0]), math.floor(values[1])
        xmax, ymax = math.ceil(values[2]), math.ceil(values[3])
        shown = tuple(box)
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{where}inverted lung box {shown} (xmax < xmin or ymax < ymin); {size}")
        if xmax == xmin or ymax == ymin:
            raise ValueError(f"{where}empty lung box {shown} (zero width or height); {size}")
        if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
            raise ValueError(f"{where}lung box {shown} lies outside the image; {size}")
        return xmin, ymin, xmax, ymax

    def __call__(self, img: NdarrayOrTensor, box: Sequence[float], source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: ``[C, H, W]``.
            box: ``(xmin, ymin, xmax, ymax)`` in pixel coordinates of ``img``.
            source: the record's ``source`` (used in error messages only).

        Returns:
            ``[C, ymax - ymin + 2 * margin, xmax - xmin + 2 * margin]`` (less where the margin meets the border).
        """
        if img.ndim != 3:
            raise ValueError(f"{_where(source)}expected a channel-first image [C, H, W], got shape {_shape(img)}")
        height, width = int(img.shape[1]), int(img.shape[2])
        xmin, ymin, xmax, ymax = self.validate_box(box, height, width, source)
        m = self.margin
        start = (max(ymin - m, 0), max(xmin - m, 0))
        end = (min(ymax + m, height), min(xmax + m, width))
        return SpatialCrop(roi_start=start, roi_end=end)(img)


class AutoBodyCrop(Transform):
    """Crop a channel-first slice to the body when no lung box is known (COVIDNet-CT's automatic crop).

    Steps (on the first channel): Gaussian smoothing (``sigma``) -> threshold (Otsu's by default) ->
    morphological opening with a disc of radius ``opening_radius`` (cuts the table and thin structures) ->
    largest connected component (``scipy.ndimage.label``) -> its bounding box enlarged by ``margin`` pixels ->
    :class:`~monai.transforms.SpatialCrop`. When nothing is found (constant image, or the largest component
    covers less than ``min_fraction`` of the slice) the whole image is returned and a warning is logged.

    Args:
        threshold: ``"otsu"`` or a fixed intensity threshold (foreground is ``> threshold``).
        opening_radius: radius in pixels of the disc used for the opening (0 disables it).
        margin: pixels added on every side of the bounding box (clipped to the image).
        min_fraction: smallest accepted component, as a fraction of the slice area.
        sigma: Gaussian smoothing before thresholding (0 disables it).
    """

    def __init__(
        self,
        threshold: str | float = "otsu",
        opening_radius: int = 3,
        margin: int = 4,
        min_fraction: float = 0.01,
        sigma: float = 1.0,
    ) -> None:
        if isinstance(threshold, str) and threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}")
        if opening_radius < 0 or margin < 0 or sigma < 0 or not 0 <= min_fraction < 1:
            raise ValueError(
                f"invalid AutoBodyCrop settings: opening_radius={opening_radius}, margin={margin}, sigma={sigma}, "
                f"min_fraction={min_fraction}"
            )
        self.threshold = threshold
        self.opening_radius = int(opening_radius)
        self.margin = int(margin)
        self.min_fraction = float(min_fraction)
        self.sigma = float(sigma)
        r = self.opening_radius
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        self.structure = (yy**2 + xx**2) <= r * r

    @staticmethod
    def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
        """Otsu's threshold of ``values`` (the bin edge maximising the between-class variance)."""
        hist, edges = np.histogram(values, bins=bins)
        hist = hist.astype(np.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        w0 = np.cumsum(hist)
        w1 = w0[-1] - w0
        s0 = np.cumsum(hist * centers)
        m0 = s0 / np.maximum(w0, 1)
        m1 = (s0[-1] - s0) / np.maximum(w1, 1)
        between = w0 * w1 * (m0 - m1) ** 2
        return float(edges[1:][int(np.argmax(between[:-1]))])

    def compute_box(self, img: NdarrayOrTensor) -> tuple[int, int, int, int] | None:
        """Body bounding box ``(xmin, ymin, xmax, ymax)`` (max exclusive, margin included), or None if not found.

        Args:
            img: ``[C, H, W]``.
        """
        plane, *_ = convert_data_type(img[0], np.ndarray, dtype=np.float32)
        if not np.isfinite(plane).all() or float(plane.max()) <= float(plane.min()):
            return None
        if self.sigma > 0:
            plane = ndimage.gaussian_filter(plane, self.sigma)
        thr = self.otsu_threshold(plane) if self.threshold == "otsu" else float(self.threshold)
        mask = plane > thr
        if self.opening_radius > 0:
            mask = ndimage.binary_opening(mask, structure=self.structure)
        labels, count = ndimage.label(mask)
        if count == 0:
            return None
        sizes = np.bincount(labels.ravel())[1:]
        best = int(np.argmax(sizes)) + 1
        if sizes[best - 1] < self.min_fraction * mask.size:
            return None
        rows, cols = ndimage.find_objects(labels)[best - 1]
        height, width = mask.shape
        m = self.margin
        return (
            max(cols.start - m, 0),
            max(rows.start - m, 0),
            min(cols.stop + m, width),
            min(rows.stop + m, height),
        )

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: ``[C, H, W]``.
            source: the record's ``source`` (named in the fallback warning).

        Returns:
            ``[C, h, w]`` cropped to the body, or ``img`` unchanged when no body is found.
        """
        if img.ndim != 3:
            raise ValueError(f"{_where(source)}expected a channel-first image [C, H, W], got shape {_shape(img)}")
        box = self.compute_box(img)
        if box is None:
            logger.warning("%sautomatic body crop found no body; keeping the whole image %s", _where(source),
                           _shape(img))  # fmt: skip
            return img
        xmin, ymin, xmax, ymax = box
        return SpatialCrop(roi_start=(ymin, xmin), roi_end=(ymax, xmax))(img)


_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))  # the largest float32 below 1


def _dequantize_torch(x: torch.Tensor, noise: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``min((clip(round(x (2^n - 1)), 0, 2^n - 1) + noise) / 2^n, 1 - ulp)`` in float32 torch ops."""
    levels = 2**n_bits
    q = torch.clamp(torch.round(x * (levels - 1)), 0, levels - 1)
    return torch.clamp((q + noise) / levels, max=float(_BELOW_ONE))


def _dequantize_numpy(x: np.ndarray, noise: np.ndarray, n_bits: int) -> np.ndarray:
    """The same as :func:`_dequantize_torch` in float32 NumPy ops (the same values; both round half to even)."""
    levels = 2**n_bits
    q = np.clip(np.round(x * np.float32(levels - 1)), 0, levels - 1)
    out = (q + noise) / np.float32(levels)
    return np.minimum(out, _BELOW_ONE, out=out)


class Dequantize(RandomizableTransform):
    """Uniform dequantisation of an image in ``[0, 1]`` stored with ``n_bits`` bits:
    ``x' = (round(x * (2**n - 1)) + u) / 2**n`` with ``u ~ U[0, 1)`` drawn per pixel from ``self.R``
    (seed it with ``set_random_state``). The quantised level is clipped to ``[0, 2**n - 1]`` and the result
    to the largest float32 below 1, so the output lies in ``[0, 1)`` even after float32 rounding.

    Args:
        n_bits: bits per pixel of the data (1..16).
    """

    def __init__(self, n_bits: int = 8) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 1 <= int(n_bits) <= 16:
            raise ValueError(f"n_bits must be in [1, 16], got {n_bits}")
        self.n_bits = int(n_bits)
        self._noise: np.ndarray | None = None

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw ``u ~ U[0, 1)`` with the shape of ``img``."""
        super().randomize(None)
        self._noise = self.R.uniform(0.0, 1.0, size=tuple(img.shape)).astype(np.float32)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """
        Args:
            img: values in ``[0, 1]``, any shape.
            randomize: draw new noise; False reuses the last draw (its shape must match).

        Returns:
            float32 in ``[0, 1)``, same shape and type.
        """
        if randomize:
            self.randomize(img)
        if self._noise is None or self._noise.shape != tuple(img.shape):
            raise RuntimeError("Dequantize: call randomize(img) before __call__(img, randomize=False)")
        if isinstance(img, torch.Tensor) and img.device.type != "cpu":
            x, *_ = convert_data_type(img, torch.Tensor, dtype=torch.float32)
            out = _dequantize_torch(x, torch.as_tensor(self._noise, device=x.device), self.n_bits)
        else:  # on the CPU in NumPy: the same float32 values as the torch ops, ~1.5x faster per 64 px slice
            x, *_ = convert_data_type(img, np.ndarray, dtype=np.float32)
            out = _dequantize_numpy(x, self._noise, self.n_bits)
            if type(img) is torch.Tensor:  # a plain tensor: no metadata to carry over
                return torch.from_numpy(out)
        result, *_ = convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return result


class ValidateImage(Transform):
    """Refuse slices that would break training; returns the image unchanged when it passes.

    Args:
        spatial_dims: number of spatial dims; the image must have ``spatial_dims + 1`` dims (channel-first).
        channels: required channel count (None: any).
        divisible_by: every spatial side must be divisible by this (e.g. 8 for the flow's squeezes).
        value_range: ``(lo, hi)`` the values must lie in (None: no check).
        allow_constant: accept an image whose values are all equal.
        float_only: require a floating-point dtype.

    Raises:
        ValueError: with the record's source and the offending numbers: NaN / Inf count, constant value,
            ndim and shape, channel count, sides not divisible, values out of range, dtype.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: int | None = 1,
        divisible_by: int = 1,
        value_range: tuple[float, float] | None = None,
        allow_constant: bool = False,
        float_only: bool = False,
    ) -> None:
        if divisible_by < 1:
            raise ValueError(f"divisible_by must be >= 1, got {divisible_by}")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.divisible_by = int(divisible_by)
        self.value_range = value_range
        self.allow_constant = allow_constant
        self.float_only = float_only

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image ``[C, *spatial]``.
            source: the record's ``source`` / key (used in error messages only).

        Returns:
            ``img`` unchanged.
        """
        where = _where(source)
        shape = _shape(img)
        if len(shape) != self.spatial_dims + 1:
            raise ValueError(
                f"{where}expected a channel-first image with {self.spatial_dims + 1} dims [C, *spatial], got "
                f"{len(shape)} dims with shape {shape}"
            )
        if self.channels is not None and shape[0] != self.channels:
            raise ValueError(f"{where}expected {self.channels} channel(s), got {shape[0]} (shape {shape})")
        bad = [s for s in shape[1:] if s % self.divisible_by]
        if bad:
            raise ValueError(f"{where}spatial shape {shape[1:]} has side(s) {bad} not divisible by {self.divisible_by}")
        t, *_ = convert_data_type(img, torch.Tensor)
        if self.float_only and not t.dtype.is_floating_point:
            raise ValueError(f"{where}expected a floating-point image, got dtype {t.dtype}")
        if t.dtype.is_floating_point:
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            if n_nan or n_inf:
                raise ValueError(f"{where}image has {n_nan} NaN and {n_inf} Inf value(s) (shape {shape})")
        lo, hi = float(t.min()), float(t.max())
        if not self.allow_constant and lo == hi:
            raise ValueError(f"{where}constant image (every value = {lo:g}, shape {shape})")
        if self.value_range is not None and (lo < self.value_range[0] or hi > self.value_range[1]):
            raise ValueError(
                f"{where}values [{lo:g}, {hi:g}] outside the required range "
                f"[{self.value_range[0]:g}, {self.value_range[1]:g}]"
            )
        return img
