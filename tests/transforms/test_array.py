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
"""Tests of monai_condflow.transforms.array on hand-made arrays."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_condflow.transforms.array import (
    AutoBodyCrop,
    CTIntensity,
    CTWindow,
    Dequantize,
    HUOffset,
    LoadCTSlice,
    LungBoxCrop,
    ToGrayscale,
    ValidateImage,
)


def _disc(size: int = 64, cy: int = 30, cx: int = 36, r: int = 15) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((1, size, size), np.float32)
    img[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    return img


# --- intensity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_ct_window_exact(as_tensor):
    hu = np.array([[-1350.0, -600.0, 150.0, -2000.0, 1000.0, -975.0]], np.float32)
    x = torch.from_numpy(hu) if as_tensor else hu
    out = CTWindow()(x)
    assert out.dtype in (np.float32, torch.float32)
    np.testing.assert_allclose(np.asarray(out), [[0.0, 0.5, 1.0, 0.0, 1.0, 0.25]], atol=1e-7)
    soft = CTWindow(level=40, width=400)(np.array([-160.0, 40.0, 140.0]))
    np.testing.assert_allclose(np.asarray(soft), [0, 0.5, 0.75])
    with pytest.raises(ValueError, match="width must be > 0, got 0"):
        CTWindow(width=0)


def test_hu_offset_no_wraparound():
    out = HUOffset()(np.array([0, 1024, 2048], np.uint16))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-1024.0, 0.0, 1024.0])
    np.testing.assert_array_equal(HUOffset(1000)(torch.tensor([0, 1000], dtype=torch.int32)), [-1000.0, 0.0])


@pytest.mark.parametrize(
    "arr, mode",
    [
        (np.array([0, 255], np.uint8), "uint8"),
        (np.array([0, 2000], np.uint16), "hu_offset"),
        (np.array([-1024, 400], np.int16), "hu"),
        (np.array([0.0, 1.0], np.float32), "unit"),
        (np.array([-0.1, 0.5], np.float64), "hu"),
        (torch.tensor([0.2, 0.9]), "unit"),
        (torch.tensor([-1000.0, 0.0]), "hu"),
        (torch.tensor([0, 3], dtype=torch.uint8), "uint8"),
    ],
)
def test_ct_intensity_auto_resolution(arr, mode):
    assert CTIntensity.resolve_mode(arr) == mode


def test_ct_intensity_values():
    np.testing.assert_allclose(CTIntensity()(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0], atol=1e-7)
    # uint16 HU + 1024: 424 -> -600 HU -> 0.5 ; 1174 -> 150 HU -> 1 ; 0 -> -1024 HU -> 326 / 1500
    np.testing.assert_allclose(CTIntensity()(np.array([424, 1174, 0], np.uint16)), [0.5, 1.0, 326 / 1500], atol=1e-6)
    np.testing.assert_allclose(CTIntensity()(np.array([-600, 150], np.int16)), [0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(CTIntensity("uint16")(np.array([0, 65535], np.uint16)), [0.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(CTIntensity("hu", window=(0, 100))(np.array([-50.0, 0.0])), [0.0, 0.5], atol=1e-7)
    unit = np.array([0.25, 0.75], np.float64)
    out = CTIntensity("unit")(unit)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.25, 0.75])


def test_ct_intensity_errors():
    with pytest.raises(ValueError, match="unknown intensity mode 'png'"):
        CTIntensity("png")
    with pytest.raises(ValueError, match=r"ann\.txt:7: intensity mode 'unit' needs values in \[0, 1\], got \[0, 1\.5"):
        CTIntensity("unit")(np.array([0.0, 1.5]), source="ann.txt:7")


def test_ct_intensity_auto_refuses_a_full_range_16bit_image_but_not_a_few_metal_pixels():
    """A 16-bit export scaled to 0-65535 would come out of the HU window almost all white: "auto" refuses it
    (naming the record and the mode to pass) instead; 5 % of pixels above 3071 HU are still read as HU + 1024."""
    hu = np.random.default_rng(0).integers(0, 2000, (40, 40)).astype(np.uint16)  # HU + 1024, a plausible slice
    stretched = (hu.astype(np.float64) * 32.0).clip(0, 65535).astype(np.uint16)
    with pytest.raises(ValueError, match=r"slice_7\.png: a 16-bit image whose .* above 4095 .*--intensity uint16"):
        CTIntensity()(stretched, source="slice_7.png")
    with pytest.raises(ValueError, match="not HU"):  # the same for a torch uint16 tensor
        CTIntensity()(torch.from_numpy(stretched.astype(np.int32)).to(torch.uint16))
    np.testing.assert_allclose(CTIntensity("uint16")(stretched), stretched / 65535.0, atol=1e-6)  # the mode to pass
    metal = hu.copy()
    metal.flat[:80] = 6000  # exactly 5 % of the 1,600 pixels
    out = CTIntensity()(metal)
    np.testing.assert_allclose(out, CTIntensity("hu_offset")(metal), atol=0)
    metal.flat[80] = 6000  # one pixel more: refused
    with pytest.raises(ValueError, match="5.1 % of its pixels"):
        CTIntensity()(metal)


# --- grayscale -------------------------------------------------------------------------------------------------


def test_to_grayscale_rgb_rgba_la():
    rgb = np.zeros((3, 1, 3), np.uint8)
    rgb[0, 0, 0], rgb[1, 0, 1], rgb[2, 0, 2] = 255, 255, 255
    out = ToGrayscale()(rgb)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3)
    np.testing.assert_array_equal(out[0, 0], [76, 150, 29])  # 76.245, 149.685, 29.07 rounded
    rgba = np.concatenate([rgb, np.full((1, 1, 3), 7, np.uint8)])
    np.testing.assert_array_equal(ToGrayscale()(rgba), out)  # alpha ignored
    la = np.stack([np.array([[3, 4]]), np.array([[9, 9]])]).astype(np.uint8)
    np.testing.assert_array_equal(ToGrayscale()(la), [[[3, 4]]])
    flt = torch.tensor([[[1.0]], [[1.0]], [[1.0]]])
    assert torch.allclose(ToGrayscale()(flt), torch.tensor([[[1.0]]]))
    one = np.zeros((1, 2, 2))
    assert ToGrayscale()(one) is one


def test_to_grayscale_bad_channels():
    with pytest.raises(ValueError, match=r"x\.png: .*1 to 4 channels, got shape \(5, 2, 2\)"):
        ToGrayscale()(np.zeros((5, 2, 2)), source="x.png")


# --- lung box crop ---------------------------------------------------------------------------------------------


def test_lung_box_crop_x_is_column_y_is_row():
    img = np.arange(6 * 8, dtype=np.float32).reshape(1, 6, 8)  # H=6 rows, W=8 columns
    out = LungBoxCrop()(img, (2, 1, 5, 4))  # xmin=2 ymin=1 xmax=5 ymax=4
    np.testing.assert_array_equal(np.asarray(out), img[:, 1:4, 2:5])
    assert out.shape == (1, 3, 3)
    out = LungBoxCrop()(img, (0, 0, 8, 2))  # full width, two rows
    np.testing.assert_array_equal(np.asarray(out), img[:, 0:2, :])
    out = LungBoxCrop(margin=1)(torch.from_numpy(img), (0, 1, 3, 6))  # margin clipped at the borders
    np.testing.assert_array_equal(np.asarray(out), img[:, 0:6, 0:4])
    out = LungBoxCrop()(img, (1.5, 0.2, 3.1, 2.0))  # widened to whole pixels
    np.testing.assert_array_equal(np.asarray(out), img[:, 0:2, 1:4])


@pytest.mark.parametrize(
    "box, what",
    [
        ((3, 1, 3, 4), "empty lung box"),
        ((2, 4, 5, 4), "empty lung box"),
        ((5, 1, 2, 4), "inverted lung box"),
        ((2, 4, 5, 1), "inverted lung box"),
        ((-1, 1, 5, 4), "outside the image"),
        ((2, 1, 9, 4), "outside the image"),
        ((2, 1, 5, 7), "outside the image"),
    ],
)
def test_lung_box_crop_errors(box, what):
    img = np.zeros((1, 6, 8), np.float32)
    with pytest.raises(ValueError) as err:
        LungBoxCrop()(img, box, source="train.txt:12")
    msg = str(err.value)
    assert msg.startswith("train.txt:12: ") and what in msg
    assert str(box) in msg and "8 x 6" in msg


def test_lung_box_crop_malformed():
    with pytest.raises(ValueError, match=r"rec: lung box must be 4 finite numbers .*got \(1, 2, 3\)"):
        LungBoxCrop()(np.zeros((1, 4, 4)), (1, 2, 3), source="rec")
    with pytest.raises(ValueError, match="4 numbers"):
        LungBoxCrop()(np.zeros((1, 4, 4)), ("a", 0, 2, 2))
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        LungBoxCrop()(np.zeros((4, 4)), (0, 0, 2, 2))


# --- automatic body crop ---------------------------------------------------------------------------------------


def test_auto_body_crop_finds_disc_bbox():
    img = _disc()
    img[0, 2:4, 2:4] = 1.0  # a speck: removed by the opening / not the largest component
    img[0, 55:57, 5:60] = 1.0  # a thin "table": removed by the opening
    crop = AutoBodyCrop(margin=0, sigma=0)
    assert crop.compute_box(img) == (21, 15, 52, 46)  # disc rows 15..45, columns 21..51
    out = crop(img)
    np.testing.assert_array_equal(np.asarray(out), img[:, 15:46, 21:52])
    assert AutoBodyCrop(margin=3, sigma=0).compute_box(img) == (18, 12, 55, 49)
    # soft-tissue body on air background, with a darker "lung" inside: box unchanged
    ct = img * 0.7 + 0.2
    ct[0, 25:35, 30:40] = 0.3
    assert AutoBodyCrop(margin=0, sigma=0).compute_box(ct) == (21, 15, 52, 46)
    assert AutoBodyCrop(threshold=0.5, margin=0, sigma=0).compute_box(ct) == (21, 15, 52, 46)
    # smoothing and the default margin keep the disc inside the crop
    xmin, ymin, xmax, ymax = AutoBodyCrop().compute_box(torch.from_numpy(img))
    assert xmin <= 21 and ymin <= 15 and xmax >= 52 and ymax >= 46 and xmax - xmin <= 31 + 8


def test_auto_body_crop_fallback_warns(caplog):
    const = np.full((1, 16, 16), 0.3, np.float32)
    with caplog.at_level(logging.WARNING, logger="monai_condflow.transforms.array"):
        out = AutoBodyCrop()(const, source="scan_7.png")
    assert out is const
    assert "scan_7.png" in caplog.text and "found no body" in caplog.text
    tiny = np.zeros((1, 64, 64), np.float32)
    tiny[0, 10:12, 10:12] = 1.0  # 4 px < 1 % of 4096 px
    assert AutoBodyCrop(opening_radius=0, sigma=0).compute_box(tiny) is None


def test_otsu_threshold_between_modes():
    values = np.concatenate([np.full(100, 0.2), np.full(50, 0.8)])
    thr = AutoBodyCrop.otsu_threshold(values)
    assert 0.2 <= thr < 0.8


def test_auto_body_crop_bad_settings():
    with pytest.raises(ValueError, match="threshold must be 'otsu' or a number, got 'mean'"):
        AutoBodyCrop(threshold="mean")
    with pytest.raises(ValueError, match="margin=-1"):
        AutoBodyCrop(margin=-1)


# --- dequantisation --------------------------------------------------------------------------------------------


def test_dequantize_rounding_and_bounds():
    levels = np.arange(256, dtype=np.float32) / 255
    x = torch.from_numpy(levels).reshape(1, 16, 16)
    dq = Dequantize(n_bits=8)
    dq.set_random_state(seed=3)
    out = dq(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) < 1.0
    np.testing.assert_array_equal(np.floor(out.numpy().ravel() * 256), np.arange(256))  # bin k holds level k
    # exact values with the noise fixed
    dq.randomize(x)
    dq._noise[:] = 0.0
    np.testing.assert_array_equal(dq(x, randomize=False).numpy().ravel(), np.arange(256) / 256)
    dq._noise[:] = np.nextafter(np.float32(1), np.float32(0))
    assert float(dq(x, randomize=False).max()) < 1.0  # 255 + (1 - 2**-24) would round to 256 in float32
    # round half to even, values outside [0, 1] clipped to the extreme levels
    y = np.array([0.5, 0.2, -0.3, 1.7], np.float32)
    dq.randomize(y)
    dq._noise[:] = 0.0
    np.testing.assert_array_equal(dq(y, randomize=False), np.array([128, 51, 0, 255], np.float32) / 256)
    z = torch.tensor([0.0, 3 / 7, 1.0])
    d3 = Dequantize(n_bits=3)
    d3.randomize(z)
    d3._noise[:] = 0.5
    np.testing.assert_allclose(d3(z, randomize=False).numpy(), [0.5 / 8, 3.5 / 8, 7.5 / 8])


def test_dequantize_numpy_path_equals_the_torch_ops_bit_for_bit():
    """The CPU path computes in NumPy; the torch ops (the path of GPU tensors, and the CPU path before) give the same
    float32 values: half levels, values outside [0, 1], the noise's extremes, several bit depths."""
    from monai.data import MetaTensor

    from monai_condflow.transforms.array import _dequantize_numpy, _dequantize_torch

    rng = np.random.default_rng(0)
    for n_bits in (1, 3, 8, 12, 16):
        x = rng.uniform(-0.2, 1.2, size=(1, 33, 17)).astype(np.float32)
        x.flat[:4] = np.array([0.5, 1.5, 127.5, 254.5], np.float32) / (2**n_bits - 1)  # exact halves: to even
        noise = rng.random(x.shape).astype(np.float32)
        noise.flat[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
        fast = _dequantize_numpy(x, noise, n_bits)
        ref = _dequantize_torch(torch.from_numpy(x), torch.from_numpy(noise), n_bits)
        assert fast.dtype == np.float32 and np.array_equal(fast, ref.numpy())
        assert 0.0 <= fast.min() and fast.max() < 1.0
    # each input type gets its own type back, with the same values for the same seed
    x = torch.rand(1, 8, 8)
    meta = MetaTensor(x.clone(), meta={"note": "kept"})
    outs = [Dequantize().set_random_state(seed=5)(v) for v in (x, meta, x.numpy().astype(np.float64))]
    assert type(outs[0]) is torch.Tensor and isinstance(outs[1], MetaTensor) and outs[1].meta["note"] == "kept"
    assert isinstance(outs[2], np.ndarray) and outs[2].dtype == np.float32
    assert torch.equal(outs[0], outs[1].as_tensor()) and np.array_equal(outs[0].numpy(), outs[2])
    assert torch.equal(x, meta.as_tensor())  # the input is not modified


def test_dequantize_seeded():
    x = torch.rand(1, 8, 8)
    a = Dequantize().set_random_state(seed=7)(x)
    b = Dequantize().set_random_state(seed=7)(x)
    c = Dequantize().set_random_state(seed=8)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert isinstance(Dequantize()(x.numpy()), np.ndarray)
    with pytest.raises(ValueError, match="n_bits must be in"):
        Dequantize(n_bits=0)
    with pytest.raises(RuntimeError, match="call randomize"):
        Dequantize()(x, randomize=False)


# --- validation ------------------------------------------------------------------------------------------------


def test_validate_image_passes_through():
    img = torch.rand(1, 8, 16)
    assert ValidateImage(divisible_by=8, value_range=(0, 1), float_only=True)(img) is img


@pytest.mark.parametrize(
    "img, kwargs, pattern",
    [
        (np.full((1, 4, 4), np.nan), {}, r"rec\.png: image has 16 NaN and 0 Inf"),
        (np.array([[[1.0, np.inf], [0.0, -np.inf]]]), {}, r"rec\.png: image has 0 NaN and 2 Inf"),
        (np.full((1, 4, 4), 3.0), {}, r"rec\.png: constant image \(every value = 3"),
        (np.zeros((4, 4)), {}, r"rec\.png: expected .* 3 dims \[C, \*spatial\], got 2 dims with shape \(4, 4\)"),
        (np.random.rand(3, 4, 4), {}, r"rec\.png: expected 1 channel\(s\), got 3 \(shape \(3, 4, 4\)\)"),
        (np.random.rand(1, 16, 12), {"divisible_by": 8}, r"side\(s\) \[12\] not divisible by 8"),
        (np.array([[[0.0, 2.0]]]), {"value_range": (0, 1)}, r"values \[0, 2\] outside the required range \[0, 1\]"),
        (np.array([[[0, 2]]], np.uint8), {"float_only": True}, r"expected a floating-point image, got dtype"),
    ],
)
def test_validate_image_errors(img, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ValidateImage(**kwargs)(img, source="rec.png")


def test_validate_image_allows_constant():
    img = np.zeros((1, 8, 8))
    assert ValidateImage(allow_constant=True)(img) is img


# --- loading ---------------------------------------------------------------------------------------------------


def test_load_arrays():
    hw = np.arange(6).reshape(2, 3)
    out = LoadCTSlice()(hw)
    assert out.shape == (1, 2, 3)
    chw = torch.zeros(1, 2, 3)
    assert LoadCTSlice()(chw) is chw
    with pytest.raises(ValueError, match=r"rec: expected an array \[H, W\] or \[C, H, W\], got shape \(1, 1, 2, 3\)"):
        LoadCTSlice()(np.zeros((1, 1, 2, 3)), source="rec")
    with pytest.raises(ValueError, match="expected a file path or an array, got int"):
        LoadCTSlice()(3)


def test_load_png_16bit_and_rgb_row_major(tmp_path):
    arr16 = (np.arange(5 * 7, dtype=np.uint16).reshape(5, 7) * 60).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a16.png")
    out = LoadCTSlice()(tmp_path / "a16.png")
    assert out.dtype == np.uint16 and out.shape == (1, 5, 7)
    np.testing.assert_array_equal(out[0], arr16)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = LoadCTSlice()(str(tmp_path / "rgb.png"))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 5, 7)
    np.testing.assert_array_equal(np.asarray(out), rgb.transpose(2, 0, 1))


def test_load_nifti_slice_as_dicom_viewers_show_it(tmp_path):
    """Rows anterior -> posterior, columns patient right -> left, from the affine: a slice stored RAS (i to the
    right, j to the front) and its copy stored LPS give the same image; so does a volume of one slice. (Before, the
    slice was only transposed: an RAS slice came out upside down and mirrored against its DICOM.)"""
    ij = np.arange(4 * 6, dtype=np.int16).reshape(4, 6) - 1000  # [i: right, j: anterior]
    nib.save(nib.Nifti1Image(ij, np.eye(4)), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ij[::-1, ::-1]), np.diag([-1.0, -1.0, 1.0, 1.0])),
             tmp_path / "lps.nii.gz")  # fmt: skip
    nib.save(nib.Nifti1Image(ij[:, :, None], np.eye(4)), tmp_path / "one.nii.gz")
    shown = ij[::-1, ::-1].T  # row 0: the most anterior voxels; column 0: the patient's rightmost
    for name in ("ras", "lps", "one"):
        out = LoadCTSlice()(tmp_path / f"{name}.nii.gz")
        assert tuple(out.shape) == (1, 6, 4), name
        np.testing.assert_array_equal(np.asarray(out)[0], shown)
    nib.save(nib.Nifti1Image(np.zeros((4, 6, 2), np.int16), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(ValueError, match=r"expected a 2-D NIfTI slice in .*vol\.nii\.gz"):
        LoadCTSlice()(tmp_path / "vol.nii.gz")


def test_load_errors_name_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.png \(record ann\.txt:3\)"):
        LoadCTSlice()(tmp_path / "missing.png", source="ann.txt:3")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image file .*corrupt\.png"):
        LoadCTSlice()(bad)


def _png_header_only(path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims ``width x height`` 16-bit pixels (the pixel data is not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


def test_load_refuses_huge_images_and_decompression_bombs_by_name(tmp_path):
    """the size comes from the header; nothing is decoded, and the file is named."""
    big, bomb = tmp_path / "big_scan.png", tmp_path / "bomb.png"
    _png_header_only(big, 10000, 10000)
    _png_header_only(bomb, 15000, 15000)
    assert big.stat().st_size < 1000
    with pytest.raises(ValueError, match=r"big_scan\.png.*10000 x 10000 = 100000000 pixels is above the limit"):
        LoadCTSlice()(str(big))
    with pytest.raises(ValueError, match=r"bomb\.png.*decompression bomb"):
        LoadCTSlice(max_pixels=None)(str(bomb))
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(small)
    with pytest.raises(ValueError, match=r"small\.png: 30 x 20 = 600 pixels"):
        LoadCTSlice(max_pixels=500)(str(small))
    assert LoadCTSlice(max_pixels=600)(str(small)).shape == (1, 20, 30)
    nii = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 20), np.float32), np.eye(4)), nii)
    with pytest.raises(ValueError, match=r"slice\.nii\.gz: 30 x 20 = 600 pixels"):
        LoadCTSlice(max_pixels=500)(str(nii))
    with pytest.raises(ValueError, match="max_pixels"):
        LoadCTSlice(max_pixels=0)
