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
"""monai_condflow.transforms: CT slice transforms, ready-made chains and PNG grids."""

from __future__ import annotations

from monai_condflow.transforms.array import (
    INTENSITY_MODES,
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
from monai_condflow.transforms.chains import (
    CROP_MODES,
    get_array_transforms,
    get_flow_train_transforms,
    get_preprocess_transforms,
)
from monai_condflow.transforms.dictionary import (
    AutoBodyCropd,
    CTIntensityd,
    CTWindowd,
    Dequantized,
    HUOffsetd,
    LoadCTSliced,
    LungBoxCropd,
    ToGrayscaled,
    ValidateImaged,
)
from monai_condflow.transforms.grid import make_grid, save_chain_preview, save_png_grid
from monai_condflow.transforms.lung_mask import (
    EstimateLungMask,
    EstimateLungMaskd,
    estimate_lung_mask,
    estimate_lung_masks,
)

__all__ = [
    "INTENSITY_MODES",
    "CROP_MODES",
    "LoadCTSlice",
    "LoadCTSliced",
    "ToGrayscale",
    "ToGrayscaled",
    "HUOffset",
    "HUOffsetd",
    "CTWindow",
    "CTWindowd",
    "CTIntensity",
    "CTIntensityd",
    "LungBoxCrop",
    "LungBoxCropd",
    "AutoBodyCrop",
    "AutoBodyCropd",
    "Dequantize",
    "Dequantized",
    "ValidateImage",
    "ValidateImaged",
    "EstimateLungMask",
    "EstimateLungMaskd",
    "estimate_lung_mask",
    "estimate_lung_masks",
    "get_preprocess_transforms",
    "get_flow_train_transforms",
    "get_array_transforms",
    "make_grid",
    "save_png_grid",
    "save_chain_preview",
]
