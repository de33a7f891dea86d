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
"""Issue 16: a built wheel, installed the normal way (not editable), carries the bundle and runs a bundle stage.

The wheel is built from a copy of the sources with ``pip wheel --no-deps --no-build-isolation --no-index`` and
installed with ``--no-deps --no-index`` into a fresh virtual environment that sees this environment's
site-packages through a ``.pth`` file (so nothing is downloaded; the editable install's finder is not loaded
there, because ``.pth`` files of a directory added that way are not processed). The stage runs from a folder
outside the checkout, so only the installed copy can be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from monai_condflow.pipeline import BUNDLE_ROOT, default_stages

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "monai_condflow", "bundle")


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv with the built wheel installed, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(src)], cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("monai_condflow-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_condflow_test_parent.pth").write_text("\n".join(parents) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    return python, wheel


def test_wheel_ships_the_bundle(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"monai_condflow/bundle/configs/{p.name}" for p in (BUNDLE_ROOT / "configs").iterdir()}
    expected |= {f"monai_condflow/bundle/docs/{p.name}" for p in (BUNDLE_ROOT / "docs").iterdir()}
    expected.add("monai_condflow/bundle/LICENSE")
    assert expected <= names, sorted(expected - names)


def test_installed_package_finds_its_bundle_and_documents_the_option(installed, tmp_path: Path):
    python, _ = installed
    venv = python.parents[1]
    probe = textwrap.dedent(
        """
        import json, monai_condflow.pipeline as p
        print(json.dumps({"module": p.__file__, "bundle": str(p.BUNDLE_ROOT)}))
        """
    )
    found = json.loads(_run([str(python), "-c", probe], cwd=tmp_path).stdout)
    assert Path(found["module"]).resolve().is_relative_to(venv.resolve()), found  # not the checkout
    bundle = Path(found["bundle"])
    assert bundle.resolve().is_relative_to(venv.resolve()), found
    for stage in default_stages(50, baseline=True):
        for name in stage.config_files:
            assert (bundle / "configs" / name).is_file(), name
    assert (bundle / "configs" / "metadata.json").is_file() and (bundle / "LICENSE").is_file()
    helptext = _run([str(python), "-m", "monai_condflow.pipeline", "--help"], cwd=tmp_path).stdout
    assert "--bundle-root" in helptext and "default:" in helptext


def test_installed_package_runs_a_bundle_stage_from_outside_the_checkout(installed, tmp_path: Path):
    python, _ = installed
    script = textwrap.dedent(
        """
        from pathlib import Path
        from monai_condflow.data.phantom import generate_phantom_dataset
        from monai_condflow.pipeline import Stage, run_pipeline

        generate_phantom_dataset("data", num_images=48, seed=3, image_size=64, slices_per_patient=4, overwrite=True)
        tiny = {"image_size": 32, "batch_size": 16, "max_epochs": 1, "num_workers": 0, "device": "cpu"}
        run_pipeline(Path("data"), Path("out"), "all", stages=[Stage("classifier", ["train_classifier.json"], tiny)])
        """
    )
    _run([str(python), "-c", script], cwd=tmp_path)
    meta = json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())
    assert meta["num_classes"] >= 2
    assert (tmp_path / "out" / "classifier" / "model.pt").is_file()
