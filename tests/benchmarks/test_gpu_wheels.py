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
"""``benchmarks/gpu_wheels.sh``: the wheels it fetches for the GPU machine, together with what the GPU image holds,
cover every requirement that ``gpu_check.sh`` checks and that ``setup.cfg`` installs (with the ``privacy`` extra for
Opacus and pydicom of the ``dicom`` extra), each at a version ``constraints.txt`` pins. (The download itself needs a
network and is not run here.)"""

from __future__ import annotations

import configparser
import re

from tests.benchmarks.script import BENCHMARKS

ROOT = BENCHMARKS.parent


def _bash_array(text: str, name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", text, re.MULTILINE)
    assert match, f"{name}=(...) not found"
    return match.group(1).split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _norm(re.split(r"[<>=!\[;\s]", line.strip(), maxsplit=1)[0])


def test_the_wheels_and_the_image_cover_the_requirements_at_pinned_versions():
    script = (BENCHMARKS / "gpu_wheels.sh").read_text()
    packages = {_norm(p) for p in _bash_array(script, "PACKAGES")}
    image = {_norm(p) for p in _bash_array(script, "IMAGE_HAS")}
    assert not packages & image
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = {_requirement_name(r) for r in cfg["options"]["install_requires"].splitlines() if r.strip()}
    required |= {"opacus", "pydicom"}  # the privacy extra and the DICOM reader, which the check and the bundle run use
    assert required - (packages | image) == set(), "a requirement neither in the image nor fetched as a wheel"
    # gpu_check.sh's own list of what it installs when missing (module -> package)
    check = (BENCHMARKS / "gpu_check.sh").read_text()
    needed = {_norm(pkg) for pkg in re.findall(r'"[A-Za-z_]+": "([A-Za-z_-]+)"', check)}
    assert needed and needed <= packages | image
    pins = {_norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert packages <= pins, f"not pinned: {packages - pins}"
