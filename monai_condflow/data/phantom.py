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
"""Embedded default dataset: synthetic 2-D chest-CT phantom slices in the COVIDx CT layout.

The generator draws synthetic patients (body habitus, thoracic cavity, mediastinum, spine, ribs, a 3-D pulmonary
vessel tree, ...) once and renders several axial slices per patient at different heights, so slices of one patient
share anatomy and a patient-disjoint split is meaningful. Three classes follow the COVIDx CT ids: 0 normal,
1 pneumonia (lobar / segmental consolidation with air bronchograms, usually unilateral), 2 COVID-19 (bilateral,
peripheral, patchy ground-glass opacities, sometimes crazy paving). Slices are written as 512x512 16-bit PNG with
value = HU + 1024 under ``DIR/images/``, with ``train.txt`` / ``val.txt`` / ``test.txt`` annotation files whose
lines are ``<file> <class> <xmin> <ymin> <xmax> <ymax>`` (the lung box), plus ``README.md`` and ``dataset.json``.

Command line::

    python -m monai_condflow.data.phantom --out DIR --num-images 600 --seed 0

The output is byte-identical for a given seed and set of arguments. See ``docs/phantom.md``.

This module writes the dataset (patients, splits, PNG files, annotation lists, CLI); the patients are drawn by
:mod:`monai_condflow.data.phantom_anatomy`, their slices rendered by :mod:`monai_condflow.data.phantom_render` (with
the class findings of :mod:`monai_condflow.data.phantom_findings`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from monai_condflow.data.phantom_anatomy import PhantomPatient, sample_patient
from monai_condflow.data.phantom_render import render_paired_slices, render_slice
from monai_condflow.progress import ProgressLog
from monai_condflow.utils.io import atomic_write_png, atomic_write_text

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_CLASS_FRACTIONS",
    "GENERATOR_VERSION",
    "PhantomPatient",
    "sample_patient",
    "render_slice",
    "render_paired_slices",
    "hu_to_png",
    "generate_phantom_dataset",
    "main",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0.0"
CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
DEFAULT_CLASS_FRACTIONS = (0.4, 0.35, 0.25)
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
HU_OFFSET = 1024
_N_AXIAL = 120  # synthetic slice numbers run 0 .. 119 from apex to base
_MIN_PATIENTS_PER_CLASS = 3
_OUTPUT_NAMES = ("train.txt", "val.txt", "test.txt", "README.md", "dataset.json")


def hu_to_png(hu: np.ndarray) -> np.ndarray:
    """Convert HU to the stored 16-bit values: ``round(HU + 1024)`` clipped to [0, 4095].

    Args:
        hu: image in Hounsfield units.

    Returns:
        ``uint16`` array of the same shape.
    """
    return np.clip(np.rint(hu + HU_OFFSET), 0, 4095).astype(np.uint16)


def _write_png(path: Path, hu: np.ndarray) -> None:
    atomic_write_png(Image.fromarray(hu_to_png(hu)), path, compress_level=1)


def _class_counts(n_patients: int, fractions: Sequence[float]) -> list[int]:
    """Patients per class by largest remainder, with at least three per class (one per split)."""
    fr = np.asarray(fractions, dtype=np.float64)
    raw = fr / fr.sum() * n_patients
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_patients - counts.sum()]:
        counts[i] += 1
    while counts.min() < _MIN_PATIENTS_PER_CLASS:
        counts[int(np.argmax(counts))] -= 1
        counts[int(np.argmin(counts))] += 1
    return [int(c) for c in counts]


def _split_patients(rng: np.random.Generator, patient_classes: list[int]) -> dict[int, str]:
    """Patient-disjoint split, stratified by class, about 70/15/15, every split holding every class."""
    out: dict[int, str] = {}
    for cls in range(len(CLASS_NAMES)):
        ids = [i for i, c in enumerate(patient_classes) if c == cls]
        ids = [ids[k] for k in rng.permutation(len(ids))]
        n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * len(ids))))
        n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * len(ids))))
        for k, pid in enumerate(ids):
            out[pid] = "val" if k < n_val else ("test" if k < n_val + n_test else "train")
    return out


def _render_patient(task: tuple) -> list[str]:
    """Render and write the slices of one patient; returns their annotation lines (runs in worker processes)."""
    images, pid, cls, seed_seq, n_sl, image_size = task
    rng = np.random.default_rng(seed_seq)
    patient = sample_patient(rng, cls)
    # distinct axial slice numbers between the apex and the base, spread over the lungs
    lo, hi = int(round(0.08 * (_N_AXIAL - 1))), int(round(0.95 * (_N_AXIAL - 1)))
    rows = []
    for k in np.sort(rng.choice(np.arange(lo, hi + 1), size=n_sl, replace=False)):
        hu, box = render_slice(rng, cls, image_size, patient, float(k) / (_N_AXIAL - 1))
        name = f"phantom_p{pid:04d}_s{int(k):03d}.png"
        _write_png(Path(images) / name, hu)
        rows.append(f"{name} {cls} {box[0]} {box[1]} {box[2]} {box[3]}")
    return rows


def generate_phantom_dataset(
    out_dir: str | os.PathLike,
    num_images: int = 600,
    seed: int = 0,
    image_size: int = 512,
    class_fractions: Sequence[float] = DEFAULT_CLASS_FRACTIONS,
    slices_per_patient: int = 6,
    overwrite: bool = False,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Generate the phantom dataset: PNG slices, COVIDx-CT-format split files, ``README.md`` and ``dataset.json``.

    Args:
        out_dir: output folder; created when missing.
        num_images: number of slices.
        seed: random seed; the same arguments give byte-identical files.
        image_size: side of the square PNG slices.
        class_fractions: fractions of patients per class (normal, pneumonia, COVID-19).
        slices_per_patient: slices per synthetic patient (the last patient may have fewer).
        overwrite: allow writing into a non-empty ``out_dir`` (files of an earlier phantom set are replaced).
        num_workers: worker processes (patients are rendered independently, so the output does not depend on it).
        progress: log ``phantom: done/total patients, ETA`` lines (:class:`~monai_condflow.progress.ProgressLog`).

    Returns:
        The content of ``dataset.json``: seed, sizes, generator version, counts per split and class, and
        ``seconds`` (wall time, not written to the file).

    Raises:
        FileExistsError: if ``out_dir`` is not empty and ``overwrite`` is False.
        ValueError: on bad arguments (fewer than nine patients, bad fractions, ...).

    Example::

        info = generate_phantom_dataset("/tmp/phantom", num_images=60, seed=1)
        print(info["counts"]["train"])
    """
    if slices_per_patient < 1 or slices_per_patient > 50:
        raise ValueError(f"slices_per_patient must be in [1, 50], got {slices_per_patient}.")
    if len(class_fractions) != 3 or min(class_fractions) <= 0:
        raise ValueError(f"class_fractions must be three positive numbers, got {class_fractions!r}.")
    n_patients = math.ceil(num_images / slices_per_patient) if num_images > 0 else 0
    if n_patients < 3 * _MIN_PATIENTS_PER_CLASS:
        raise ValueError(
            f"num_images={num_images} with slices_per_patient={slices_per_patient} gives {n_patients} patients; at "
            f"least {3 * _MIN_PATIENTS_PER_CLASS} are needed (3 per class) for a stratified patient-disjoint split."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to write into it.")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("phantom_p*_s*.png"):
        old.unlink()
    start = time.perf_counter()
    master = np.random.SeedSequence(seed)
    plan_rng = np.random.default_rng(master.spawn(1)[0])
    counts = _class_counts(n_patients, class_fractions)
    patient_classes = [c for c, n in enumerate(counts) for _ in range(n)]
    patient_classes = [patient_classes[k] for k in plan_rng.permutation(n_patients)]
    split_of = _split_patients(plan_rng, patient_classes)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    table = {sp: [0, 0, 0] for sp in lines}
    n_patients_split = {sp: [0, 0, 0] for sp in lines}
    patient_seeds = master.spawn(n_patients + 1)[1:]
    tasks = [
        (
            str(images),
            pid,
            patient_classes[pid],
            patient_seeds[pid],
            min(slices_per_patient, num_images - pid * slices_per_patient),
            image_size,
        )
        for pid in range(n_patients)
    ]
    results = []
    with ProgressLog(len(tasks), "phantom", unit="patients", enabled=progress) as bar:
        if num_workers > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for rows in pool.map(_render_patient, tasks, chunksize=4):
                    results.append(rows)
                    bar.update()
        else:
            for task in tasks:
                results.append(_render_patient(task))
                bar.update()
    for (_, pid, cls, *_rest), rows in zip(tasks, results):
        split = split_of[pid]
        n_patients_split[split][cls] += 1
        table[split][cls] += len(rows)
        lines[split].extend(rows)
    info = {
        "name": "monai_condflow phantom chest CT",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_images": int(num_images),
        "image_size": int(image_size),
        "slices_per_patient": int(slices_per_patient),
        "class_fractions": [float(f) for f in class_fractions],
        "class_names": list(CLASS_NAMES),
        "png": "uint16, value = HU + 1024, clipped to [0, 4095]",
        "counts": {sp: dict(zip(CLASS_NAMES, table[sp])) for sp in lines},
        "patients": {sp: dict(zip(CLASS_NAMES, n_patients_split[sp])) for sp in lines},
    }
    for sp, rows in lines.items():
        atomic_write_text(out / f"{sp}.txt", "\n".join(sorted(rows)) + "\n")
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", _readme(info))
    info["seconds"] = time.perf_counter() - start
    logger.info("phantom: wrote %d images to %s in %.1f s", num_images, out, info["seconds"])
    return info


def _readme(info: dict) -> str:
    head = "| split | " + " | ".join(CLASS_NAMES) + " | patients |\n|---|" + "---|" * (len(CLASS_NAMES) + 1) + "\n"
    rows = "".join(
        f"| {sp} | " + " | ".join(str(info["counts"][sp][c]) for c in CLASS_NAMES) + f" | "
        f"{sum(info['patients'][sp].values())} |\n"
        for sp in ("train", "val", "test")
    )
    return (
        "# monai_condflow phantom chest CT\n\n"
        "Synthetic axial chest-CT slices made by `python -m monai_condflow.data.phantom` (generator "
        f"{info['generator_version']}, seed {info['seed']}, {info['num_images']} images of {info['image_size']} px, "
        f"{info['slices_per_patient']} slices per synthetic patient). No real patient data.\n\n"
        "- `images/phantom_p<patient>_s<slice>.png`: 16-bit PNG, value = HU + 1024 (air -1000 HU -> 24).\n"
        "- `train.txt`, `val.txt`, `test.txt`: COVIDx CT format, `<file> <class> <xmin> <ymin> <xmax> <ymax>`, "
        "class 0 normal, 1 pneumonia, 2 COVID-19, box = lungs in pixels. The split is patient-disjoint and "
        "stratified by class.\n\n"
        "Slices per split and class:\n\n" + head + rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m monai_condflow.data.phantom --out DIR [--num-images N] [--seed S]``.

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success, 2 when the output folder is not empty or an argument is bad).
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_condflow.data.phantom",
        description="Generate the embedded phantom chest-CT dataset (PNG slices in COVIDx-CT format, "
        "patient-disjoint train/val/test split files, README.md and dataset.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=600, help="number of slices")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same arguments, byte-identical files)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the square PNG slices")
    parser.add_argument("--slices-per-patient", type=int, default=6, help="slices per synthetic patient")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines (patients done, ETA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate_phantom_dataset(
            args.out,
            num_images=args.num_images,
            seed=args.seed,
            image_size=args.image_size,
            slices_per_patient=args.slices_per_patient,
            overwrite=args.overwrite,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0  # the "phantom: wrote N images" line is the generator's own log line (INFO, configured above)


if __name__ == "__main__":
    sys.exit(main())
