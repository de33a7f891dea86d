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
"""Dataset readers (records as MONAI-style lists of dicts), splits and bad-input errors."""

from __future__ import annotations

from monai_condflow.data.errors import DataError, ReadReport
from monai_condflow.data.npz import class_names_from_npz, load_npz_dataset
from monai_condflow.data.readers import (
    CLASS_MAPS,
    CLASS_NAMES,
    IMAGE_EXTENSIONS,
    parse_patient_id,
    read_class_folders,
    read_covidx_annotations,
    read_dicom_folder,
    read_dicom_slice,
    read_nifti_slices,
    resolve_class_map,
    validate_box,
)
from monai_condflow.data.splits import patient_disjoint_split, sample_labelled_subset

__all__ = [
    "CLASS_MAPS",
    "CLASS_NAMES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ReadReport",
    "class_names_from_npz",
    "load_npz_dataset",
    "parse_patient_id",
    "patient_disjoint_split",
    "read_class_folders",
    "read_covidx_annotations",
    "read_dicom_folder",
    "read_dicom_slice",
    "read_nifti_slices",
    "resolve_class_map",
    "sample_labelled_subset",
    "validate_box",
]
