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
"""The estimated lung mask: drawn chests with known lungs, the phantom's true masks, the transforms' contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_condflow.transforms import EstimateLungMask, EstimateLungMaskd, estimate_lung_mask, estimate_lung_masks


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def drawn_chest(size: int = 64, body_rx: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest of known lungs: air 0 around a body (0.7), two lungs (0.1) with a vessel (0.8) and a ground-glass
    patch (0.4) inside the left one; returns ``(image, true lungs)``."""
    c = size / 2
    image = np.zeros((size, size))
    image[_ellipse(size, c, c, 0.42 * size, body_rx)] = 0.7
    lungs = _ellipse(size, c, c - 0.2 * size, 0.3 * size, 0.14 * size) | _ellipse(size, c, c + 0.2 * size,
                                                                               0.3 * size, 0.14 * size)  # fmt: skip
    image[lungs] = 0.1
    image[_ellipse(size, c, c - 0.2 * size, 2, 2)] = 0.8  # vessel
    image[_ellipse(size, c - 8, c - 0.2 * size, 3, 3)] = 0.4  # finding
    return image, lungs


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_drawn_chest_lungs_found_with_vessels_and_findings_and_without_outside_air():
    image, lungs = drawn_chest()
    mask = estimate_lung_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    assert iou(mask, lungs) > 0.9
    c = 32
    assert mask[c, c - 13] and mask[c - 8, c - 13]  # the vessel and the finding inside the left lung
    assert not mask[0, 0] and not mask[c, c]  # outside air, mediastinum
    # the same through the torch path, channel-first
    assert np.array_equal(estimate_lung_mask(torch.as_tensor(image)[None].float()), mask)


def test_chest_wall_cut_by_the_crop_falls_back_to_the_dark_regions():
    image, lungs = drawn_chest(96, body_rx=40.0)
    image, lungs = image[:, 20:76], lungs[:, 20:76]  # a tight lung-box crop: the lungs reach both side edges
    mask = estimate_lung_mask(image)
    assert (mask & lungs).sum() / lungs.sum() > 0.9  # the lungs are found although the body does not close
    assert not mask[48, 28]  # the mediastinum is not lung


def _rectangles(size: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = True
    return mask


def test_erosion_by_hand_on_rectangular_lungs():
    lungs = _rectangles(40, [(8, 30, 5, 15), (10, 28, 24, 35)])  # two lungs closed in by the body
    image = np.where(lungs, 0.1, 0.7)
    assert np.array_equal(estimate_lung_mask(image), lungs)
    assert np.array_equal(estimate_lung_mask(image, erosion=1), _rectangles(40, [(9, 29, 6, 14), (11, 27, 25, 34)]))
    twice = EstimateLungMask(erosion=2)(image[None])[0].astype(bool)
    assert np.array_equal(twice, _rectangles(40, [(10, 28, 7, 13), (12, 26, 26, 33)]))


def test_no_lungs_gives_an_empty_mask():
    assert not estimate_lung_mask(np.full((32, 32), 0.6)).any()
    soft = np.full((32, 32), 0.7)
    soft[10:12, 10:12] = 0.0  # dark, but below min_area
    assert not estimate_lung_mask(soft).any()


def test_phantom_slices_against_their_true_lung_masks():
    from monai_condflow.data.phantom import hu_to_png, render_paired_slices
    from monai_condflow.transforms import get_preprocess_transforms

    chain = get_preprocess_transforms(image_size=64, keep_keys=None)
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(4):
        hu, _, box, lung = render_paired_slices(rng, 2, 512, None, float(rng.uniform(0.3, 0.85)))
        image = chain({"image": hu_to_png(hu), "box": list(box)})["image"]
        truth = chain({"image": lung.astype(np.float32), "box": list(box)})["image"][0].numpy() > 0.5
        scores.append(iou(estimate_lung_mask(image), truth))
    assert min(scores) > 0.75 and float(np.mean(scores)) > 0.85, scores


def test_batch_and_transforms_keep_shape_type_and_values():
    image, _ = drawn_chest(32)
    expected = estimate_lung_mask(image)
    batch = torch.as_tensor(np.stack([image, np.full_like(image, 0.6)]))[:, None].double()
    masks = estimate_lung_masks(batch)
    assert masks.shape == (2, 1, 32, 32) and masks.dtype == torch.float64
    assert np.array_equal(masks[0, 0].numpy().astype(bool), expected) and not masks[1].any()
    out = EstimateLungMask()(image[None].astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and np.array_equal(out[0].astype(bool), expected)
    d = EstimateLungMaskd("image", mask_key="lungs")({"image": torch.as_tensor(image[None]).float(), "label": 1})
    assert d["label"] == 1 and isinstance(d["lungs"], torch.Tensor)
    assert np.array_equal(d["lungs"][0].numpy().astype(bool), expected)


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="NaN"):
        estimate_lung_mask(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        estimate_lung_mask(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):  # 0-255 values would give an empty mask silently
        estimate_lung_mask(np.full((8, 8), 200.0))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        estimate_lung_masks(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        EstimateLungMask()(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="min_area"):
        EstimateLungMask(min_area=1.5)
    for bad in ({"erosion": -1}, {"closing": 1.5}, {"erosion": True}):
        with pytest.raises(ValueError, match="erosion"):
            EstimateLungMask(**bad)
    with pytest.raises(ValueError, match="one image key"):
        EstimateLungMaskd(["image", "label"])
