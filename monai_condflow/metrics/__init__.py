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
"""monai_condflow.metrics."""

from .bits_per_dim import BitsPerDim, bits_per_dim_from_latent
from .classification import (
    ClassificationAccuracy,
    ClassificationReportMetric,
    MacroF1,
    MacroPrecision,
    MacroRecall,
    classification_report,
    confusion_matrix,
    report_from_confusion_matrix,
)
from .fid import (
    EmbeddingFID,
    embedding_fid,
    extract_features,
    fid_floor,
    fid_from_features,
    fid_to_floor_ratio,
    frechet_distance,
)
from .periodicity import lattice_bins, lattice_peak
from .sharpness import laplacian_energy, sharpness_ratio
from .variety import pixel_spread, variety_ratio

__all__ = [
    "BitsPerDim",
    "bits_per_dim_from_latent",
    "ClassificationAccuracy",
    "ClassificationReportMetric",
    "MacroF1",
    "MacroPrecision",
    "MacroRecall",
    "classification_report",
    "confusion_matrix",
    "report_from_confusion_matrix",
    "EmbeddingFID",
    "embedding_fid",
    "extract_features",
    "fid_floor",
    "fid_from_features",
    "fid_to_floor_ratio",
    "laplacian_energy",
    "lattice_bins",
    "lattice_peak",
    "sharpness_ratio",
    "pixel_spread",
    "variety_ratio",
    "frechet_distance",
]
