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
"""Packaging beyond ``setup.cfg``: the top-level ``bundle/`` folder ships as ``monai_condflow/bundle``.

The checkout keeps ``bundle/`` at the repository root (``python -m monai.bundle run --bundle_root bundle``); an
installed wheel carries the same files as package data, which :data:`monai_condflow.utils.bundle.BUNDLE_ROOT` finds.
"""

from setuptools import find_packages, setup

BUNDLE_PACKAGES = ["monai_condflow.bundle", "monai_condflow.bundle.configs", "monai_condflow.bundle.docs"]

setup(
    packages=find_packages(include=["monai_condflow", "monai_condflow.*"]) + BUNDLE_PACKAGES,
    package_dir={"monai_condflow.bundle": "bundle"},
    package_data={
        "monai_condflow.bundle": ["LICENSE"],
        "monai_condflow.bundle.configs": ["*.json", "*.conf"],
        "monai_condflow.bundle.docs": ["*.md", "*.txt", "*.json"],
    },
)
