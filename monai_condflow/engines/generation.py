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
"""
Conditional synthetic images: keep the condition ``z`` of real images, draw a new ``nu ~ N(0, T^2 I)`` and decode.

Modes of :func:`generate`:

- ``"same_z"``: one synthetic image per real input, with that input's ``z`` and class;
- ``"pairs"``: as ``same_z``, plus an ``original | synthetic`` PNG per input (the paper's Fig. 5). The pair files
  contain the *real* image: they are for figures, not for release;
- ``"n_per_class"``: ``n_per_class`` images per class, whose conditions are real inputs drawn class-balanced
  (without replacement when the class has enough inputs).

Output hygiene: files are named only by index and class (``synthetic_000123_class1.png`` / ``.nii.gz``); the
PNGs carry no text chunks and the NIfTI headers a fixed description; the manifest CSV records index, file(s), class,
temperature, seed, model version and mode; ``generation.json`` the per-image pixel counts that were non-finite
or outside ``SAMPLE_RANGE`` *before* clamping (a failed decode is reported, not hidden).
temperature, seed, model version and mode. No source file name, patient id or DICOM tag is read into any output.
In ``same_z`` / ``pairs`` mode the files are numbered in a shuffled order (a permutation keyed by the seed *and* the
flow's weights), so a file's index is not its source image's position in the training list: the order is
reproducible with the model, but not from the training list and the manifest's seed alone.

Output sets: the whole set (images + manifest) is written into a hidden sibling folder
(``.<name>.partial-*``) and swapped into place by renaming when complete, so the folder and its manifest always
describe the same files: a killed run leaves the previous set untouched, a smaller rerun leaves no stale file, and
leftovers of a killed run are removed by the next one. ``output_dir`` must hold only files of an earlier generation
(a folder with anything else is refused, never emptied). Files and the folder get the usual permissions
(``0644`` / ``0755`` under the process umask), not the ``0600`` of temp files.

Formats: 16-bit grayscale PNG with ``value = round(x * 65535)`` (re-read with intensity mode ``"uint16"``);
NIfTI-1 (gzip) float32 in ``[0, 1]``, stored ``[W, H]`` (voxel ``(i, j)`` = pixel column ``i``, row ``j``) with an
LPS affine of 1 mm voxels (``i`` to the patient's left, ``j`` to the back), so that viewers show it as the PNG and
:class:`~monai_condflow.transforms.array.LoadCTSlice` reads it back as the same ``[1, H, W]`` image.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import inspect
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import list_data_collate
from PIL import Image
from torch.utils.data import DataLoader

from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
from monai_condflow.networks.blocks.compiled_steps import compiled_steps
from monai_condflow.networks.nets.conditional_glow import SAMPLE_RANGE
from monai_condflow.progress import ProgressLog
from monai_condflow.transforms.grid import make_grid
from monai_condflow.utils.checks import ConfigValueError, check_flag, check_positive_int, check_temperature
from monai_condflow.utils.distributed import unwrap_model

__all__ = [
    "GENERATION_MODES",
    "check_generation_mode",
    "SUMMARY_NAME",
    "generate_tensors",
    "generate",
    "pixel_range_stats",
    "png16_bytes",
    "nifti_bytes",
    "summarize_sample_stats",
]

logger = logging.getLogger(__name__)

GENERATION_MODES = ("same_z", "pairs", "n_per_class")
_FORMATS = ("png", "nifti")
_NIFTI_DESCRIP = b"monai_condflow synthetic image"
# LPS, 1 mm: the stored [W, H] is the image as a DICOM viewer shows it
_NIFTI_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SUMMARY_NAME = "generation.json"
"""Summary JSON next to the manifest: the pre-clamp overflow / non-finite counts of the images written."""


def pixel_range_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image counts of the pixels of *unclamped* images that are non-finite or outside :data:`SAMPLE_RANGE`.

    Args:
        x: ``[N, C, *spatial]`` images as decoded, before any clamping.

    Returns:
        ``{"overflow_pixels": LongTensor[N], "nonfinite_pixels": LongTensor[N]}`` (overflow includes non-finite).
    """
    flat = x.detach().flatten(1)
    finite = torch.isfinite(flat)
    lo, hi = SAMPLE_RANGE
    overflow = (~finite | (flat < lo) | (flat > hi)).sum(1)
    return {"overflow_pixels": overflow.long().cpu(), "nonfinite_pixels": (~finite).sum(1).long().cpu()}


def summarize_sample_stats(
    overflow_pixels: torch.Tensor | Sequence[int],
    nonfinite_pixels: torch.Tensor | Sequence[int],
    pixels_per_image: int,
    source: str = "flow",
) -> dict[str, Any]:
    """The ``samples`` block of ``metrics.json`` / ``generation.json`` from per-image pixel counts.

    Args:
        overflow_pixels: ``[N]`` pixels per image that were non-finite or outside :data:`SAMPLE_RANGE` before clamping.
        nonfinite_pixels: ``[N]`` non-finite pixels per image before clamping.
        pixels_per_image: ``C * H * W`` of one image.
        source: where the counts come from: ``"flow"`` (``sample(return_stats=True)``, before the flow's own clamp)
            or ``"sampler output"`` (counted on the raw output of a sampler without statistics, e.g. the ACGAN).

    Returns:
        ``{n_images, images_with_overflow, images_with_nonfinite, overflow_pixel_fraction, nonfinite_pixel_fraction,
        range, counted_on}`` (fractions of all pixels of all images; ``range`` is :data:`SAMPLE_RANGE`).
    """
    over = torch.as_tensor(overflow_pixels, dtype=torch.long).reshape(-1)
    bad = torch.as_tensor(nonfinite_pixels, dtype=torch.long).reshape(-1)
    n = int(over.numel())
    total = n * int(pixels_per_image)
    return {
        "n_images": n,
        "images_with_overflow": int((over > 0).sum()),
        "images_with_nonfinite": int((bad > 0).sum()),
        "overflow_pixel_fraction": float(over.sum()) / total if total else 0.0,
        "nonfinite_pixel_fraction": float(bad.sum()) / total if total else 0.0,
        "range": [float(SAMPLE_RANGE[0]), float(SAMPLE_RANGE[1])],
        "counted_on": source,
    }


def _accepts_return_stats(sample_fn: Any) -> bool:
    try:
        params = inspect.signature(sample_fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return "return_stats" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def generate_tensors(
    flow: torch.nn.Module,
    z: torch.Tensor,
    temperature: float = 0.9,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    Decode ``nu ~ N(0, T^2 I)`` with conditions ``z``: ``[N, condition_dim] -> [N, C, S, S]`` in ``[0, 1]``.

    Runs in eval mode without gradients (the flow's mode is restored) and on the flow's device. The per-image
    overflow / non-finite pixel counts are taken *before* clamping: from ``flow.sample(return_stats=True)``
    when the flow offers it (:class:`~monai_condflow.networks.nets.ConditionalGlow` clamps inside ``sample``),
    otherwise on the flow's raw output (:func:`pixel_range_stats`). Non-finite pixels of a flow without statistics
    are kept non-finite (callers drop or count them); the values are clamped to ``[0, 1]``.

    Args:
        flow: the conditional flow (``sample(condition, temperature, generator)``); DDP wrappers are unwrapped.
        z: conditions, one row per image.
        temperature: ``T > 0`` (0.9 in the paper).
        generator: random generator on the flow's device, for reproducible noise.
        return_stats: also return ``{"overflow_pixels": LongTensor[N], "nonfinite_pixels": LongTensor[N]}`` (CPU).

    Raises:
        ValueError: ``temperature <= 0`` or ``z`` not 2-D.
    """
    check_temperature(temperature)
    if z.ndim != 2:
        raise ValueError(f"z must be [N, condition_dim], got shape {tuple(z.shape)}.")
    flow = unwrap_model(flow)
    param = next(flow.parameters(), None)
    if param is not None:
        z = z.to(device=param.device, dtype=param.dtype)
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            if _accepts_return_stats(flow.sample):
                x, stats = flow.sample(z, temperature=temperature, generator=generator, return_stats=True)
                stats = {k: torch.as_tensor(v).long().cpu() for k, v in stats.items()}
            else:
                x = flow.sample(z, temperature=temperature, generator=generator)
                stats = pixel_range_stats(x)
    finally:
        flow.train(was_training)
    x = x.clamp(0.0, 1.0)
    return (x, stats) if return_stats else x


def png16_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of ``image`` ``[1, H, W]`` or ``[H, W]`` in ``[0, 1]`` (``round(x * 65535)``), no
    metadata chunks."""
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    arr = arr.reshape(arr.shape[-2:])
    values = np.rint(np.clip(arr, 0.0, 1.0) * 65535.0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_image(stored: np.ndarray) -> nib.Nifti1Image:
    """The NIfTI-1 image of :func:`nifti_bytes` for the stored ``[W, H]`` float32 array: 1 mm voxels, axes to the
    patient's left and to the back (LPS), so viewers and :class:`~monai_condflow.transforms.LoadCTSlice` show the
    ``[H, W]`` image as it is, rows anterior -> posterior and columns right -> left (the PNG's view)."""
    img = nib.Nifti1Image(stored, affine=_NIFTI_AFFINE)
    img.header["descrip"] = _NIFTI_DESCRIP
    img.header.set_xyzt_units("mm")
    return img


@functools.lru_cache(maxsize=16)
def _nifti_header(stored_shape: tuple[int, int]) -> bytes:
    """The bytes before the voxels (header and empty extension flag) of :func:`nifti_bytes`'s files of one shape.

    They are the same for every image of that shape: float32 voxels are written unscaled and nibabel computes no
    header field from their values (``tests/engines/test_generation.py`` compares whole files with nibabel's for
    values in and out of range, NaN and inf), so nibabel builds them once per shape instead of once per image (its
    ~1 ms of Python per image held the writer threads on the GIL)."""
    raw = _nifti_image(np.zeros(stored_shape, np.float32)).to_bytes()
    return raw[: len(raw) - 4 * stored_shape[0] * stored_shape[1]]


def nifti_bytes(image: torch.Tensor | np.ndarray) -> bytes:
    """A gzipped NIfTI-1 of ``image`` ``[1, H, W]`` or ``[H, W]`` (float32, stored ``[W, H]`` with an LPS affine of
    1 mm voxels so that it reads back as the same image, a fixed description, no extensions; the gzip header has no
    file name and mtime 0).

    Raises:
        ValueError: fewer than 2 dimensions.

    The same bytes as nibabel writes for that image (``Nifti1Image(...).to_bytes()``, gzipped), built from a cached
    header and the voxels; the compression runs without the GIL, so writer threads encode in parallel."""
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if arr.ndim < 2:
        raise ValueError(f"nifti_bytes: an image [1, H, W] or [H, W], got shape {tuple(arr.shape)}.")
    plane = arr.reshape(arr.shape[-2:])
    # the stored array is plane.T; NIfTI voxels are in Fortran order, i.e. plane's own C order, in the machine's byte
    # order (as nibabel writes them and the cached header says)
    voxels = np.ascontiguousarray(plane, dtype=np.float32).tobytes()
    return gzip.compress(_nifti_header((plane.shape[1], plane.shape[0])) + voxels, mtime=0)


def _pair_png_bytes(original: torch.Tensor, synthetic: torch.Tensor) -> bytes:
    grid = make_grid(torch.stack([original.float().cpu(), synthetic.float().cpu()]), nrow=2, padding=2)
    buf = io.BytesIO()
    Image.fromarray(grid, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _as_loader(data: DataLoader | Sequence[Mapping[str, Any]] | Iterable, batch_size: int) -> Iterable:
    if isinstance(data, DataLoader) or not isinstance(data, Sequence):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=list_data_collate)  # type: ignore


def _labels_of(batch: Mapping[str, Any], label_key: str, classifier: torch.nn.Module | None, images: torch.Tensor):
    if label_key in batch and batch[label_key] is not None:
        return torch.as_tensor(batch[label_key]).reshape(-1).long().cpu()
    if classifier is None:
        raise KeyError(f"batch has no '{label_key}' key and no classifier was given to predict the class.")
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            return classifier(images).argmax(dim=1).long().cpu()
    finally:
        classifier.train(was_training)


def check_generation_mode(mode: object, n_per_class: object) -> bool:
    """``mode`` one of :data:`GENERATION_MODES`; ``n_per_class`` an integer >= 1 in mode ``"n_per_class"`` and
    ``None`` in the other modes, which do not read it (a count given without ``--mode n_per_class`` would otherwise
    be ignored without a word). Returns True so configs can use it in ``check_config``.

    Raises:
        ConfigValueError: naming ``mode`` or ``n_per_class`` and what to pass.
    """
    if mode not in GENERATION_MODES:
        raise ConfigValueError(f"config id 'mode' must be one of {list(GENERATION_MODES)}, got {mode!r}.")
    if mode == "n_per_class":
        check_positive_int("n_per_class", n_per_class)
    elif n_per_class is not None:
        raise ConfigValueError(
            f"config id 'n_per_class' is {n_per_class!r} but 'mode' is {mode!r}, which does not read it (mode "
            f"{mode!r} makes one image per input). For {n_per_class!r} images per class pass --mode n_per_class too; "
            "otherwise leave n_per_class out."
        )
    return True


def check_class_names(
    class_names: Sequence[str] | None, class_ids: Iterable[int] = (), where: str = "the inputs hold"
) -> list[str] | None:
    """``class_names`` as a list (``None`` stays ``None``), refused unless it is a list of non-empty strings that
    names every id of ``class_ids`` (``where`` says whose ids they are in the message)."""
    if class_names is None:
        return None
    # a list in id order only: a dict (``read_class_folders``' name -> id map) or a set has no order of the ids
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in class_names):
        raise ValueError(
            f"class_names must be a list of non-empty names in class-id order (name 0 first), got {class_names!r}."
        )
    names = [str(n) for n in class_names]
    if unnamed := sorted(set(int(c) for c in class_ids) - set(range(len(names)))):
        raise ValueError(
            f"class_names names {len(names)} class(es) ({names}) but {where} class id(s) {unnamed}: give one name "
            "per class id (bundle id 'class_names'; 'class_map' sets it)."
        )
    return names


def generate(
    flow: torch.nn.Module,
    classifier: torch.nn.Module | None,
    records_or_loader: DataLoader | Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    *,
    output_dir: str | os.PathLike,
    model_version: str,
    mode: str = "same_z",
    n_per_class: int | None = None,
    temperature: float = 0.9,
    seed: int = 0,
    formats: Sequence[str] = ("png", "nifti"),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    label_key: str = "label",
    condition_key: str = "condition",
    manifest_name: str = "manifest.csv",
    dp_epsilon: float | str | None = None,
    dp_noise: str | None = None,
    progress: bool = True,
    writer_threads: int = 4,
    cuda_graphs: bool = False,
    compile: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """
    Write conditional synthetic images and their manifest; see the module docstring for modes and formats.

    Args:
        flow: the trained conditional flow.
        classifier: frozen classifier for ``z = embed(x)`` (and the class when items have no label); ``None`` when
            every item has a ``condition_key``.
        records_or_loader: a non-shuffling ``DataLoader`` of dict batches, or a sequence (e.g. a MONAI ``Dataset``
            with the transform chain applied) of dict items whose ``image`` is a ``[1, S, S]`` tensor / array in
            ``[0, 1]``. Other keys (``source``, ``patient_id`` ...) are ignored and never written.
        output_dir: destination folder (created; its previous content, which must be an earlier generation's
            files, is replaced as a whole when the new set is complete).
        model_version: recorded in the manifest (e.g. a checkpoint name / hash and package version).
        mode: ``"same_z"``, ``"pairs"`` or ``"n_per_class"``.
        n_per_class: images per class in ``"n_per_class"`` mode.
        temperature: sampling temperature ``T > 0``.
        seed: seed of the noise (and of the class-balanced draw); same inputs + seed -> same images.
        formats: any of ``"png"`` and ``"nifti"``.
        batch_size: images decoded at once (and batch size when a sequence is given).
        device: where the flow and classifier run.
        image_key: key of the image.
        label_key: key of the class label.
        condition_key: key of precomputed conditions.
        manifest_name: file name of the manifest in ``output_dir``.
        dp_epsilon: the DP-SGD epsilon the generator (and its conditioning classifier) spent, recorded in the
            manifest's ``dp_epsilon`` column (``none`` for a non-private run; a string is written as is, e.g.
            ``"flow only: 9.9"``).
        dp_noise: for a DP run, where the DP-SGD noise came from (``"os_entropy"``, ``"secure_mode"``,
            ``"caller_generator"``; see :data:`monai_condflow.privacy.dp.NOISE_SOURCES`), written in a ``dp_noise``
            column before ``dp_epsilon`` (no such column when ``None``).

        progress: log ``generation: done/total images, ETA`` lines (:class:`~monai_condflow.progress.ProgressLog`;
            bundle id ``progress``).
        writer_threads: threads that encode and write the files (PNG and gzip encoding and ``fsync`` release the
            GIL), so that a GPU's decoding does not wait on the disk; 1 writes in the calling thread. The files, their
            names and the manifest are the same for any value (bundle id ``writer_threads``).
        cuda_graphs: on a GPU, decode each batch by replaying a CUDA graph
            (:meth:`~monai_condflow.networks.nets.ConditionalGlow.graph_sampling`; bundle id ``cuda_graphs``);
            ignored for flows without it and on the CPU.
        compile: decode through ``torch.compile``'d flow steps
            (:meth:`~monai_condflow.networks.nets.ConditionalGlow.compile_steps` ``sampling=True``; bundle id
            ``compile``): the first batch compiles, the images equal the eager ones up to fp32 rounding; ignored for
            flows without it and for a flow whose steps already have a compiler (its own setting is kept: it decodes
            compiled only if that compiler was made with ``sampling=True``).
        class_names: the classes' names by id (e.g. ``["non-COVID", "COVID-19"]``; bundle id ``class_names``,
            set from ``class_map``): a ``class_name`` column after ``class`` in the manifest and ``class_names`` in
            ``generation.json``, so that a shared set says what its classes are; ``None``: ids only. A class id
            without a name is refused before any file is written.

    Returns:
        the manifest path. ``generation.json`` (:data:`SUMMARY_NAME`) beside it holds the ``samples`` block of
        :func:`summarize_sample_stats` (pre-clamp overflow / non-finite counts) and the overflowed images' indices.

    Raises:
        ValueError: bad mode / formats / temperature / ``n_per_class`` / ``model_version``, an image path
            instead of a tensor, no input, or an ``output_dir`` that holds files this function did not write.
        NotADirectoryError: ``output_dir`` (or its parent) is a file.
        PermissionError: the parent of ``output_dir`` cannot be written; the message names it.
    """
    check_generation_mode(mode, n_per_class)
    formats = tuple(formats)
    if not formats or any(f not in _FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty subset of {_FORMATS}, got {formats}.")
    check_temperature(temperature)
    if not isinstance(model_version, str) or not model_version.strip():
        raise ValueError("model_version must be a non-empty string.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_positive_int("writer_threads", writer_threads)
    for key, value in (("cuda_graphs", cuda_graphs), ("compile", compile)):
        check_flag(value, key)
    class_names = check_class_names(class_names)

    device = torch.device(device)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, manifest_name)
    flow = unwrap_model(flow).to(device)
    if classifier is not None:
        classifier = unwrap_model(classifier).to(device)
    prepare = ConditionPrepareBatch(classifier=classifier, image_key=image_key, condition_key=condition_key)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    rows: list[dict[str, Any]] = []
    staging = _staging_dir(output_dir)
    overflow: list[torch.Tensor] = []
    nonfinite: list[torch.Tensor] = []
    pixels_per_image = [0]
    files = _FileWriter(writer_threads)

    def write(originals: torch.Tensor | None, z: torch.Tensor, labels: torch.Tensor) -> None:
        synthetic, stats = generate_tensors(flow, z, temperature, generator, return_stats=True)
        overflow.append(stats["overflow_pixels"])
        nonfinite.append(stats["nonfinite_pixels"])
        # a flow without its own clamp may hand back NaN / Inf: counted above, written as the flow's own fallback
        synthetic = torch.nan_to_num(synthetic.cpu(), nan=0.5, posinf=1.0, neginf=0.0)
        pixels_per_image[0] = int(synthetic[0].numel()) if synthetic.shape[0] else pixels_per_image[0]
        for k in range(synthetic.shape[0]):
            index, cls = len(rows), int(labels[k])
            stem = f"synthetic_{index:06d}_class{cls}"
            row: dict[str, Any] = {"index": index}
            if "png" in formats:
                files.put(staging / f"{stem}.png", png16_bytes, synthetic[k])
                row["file"] = f"{stem}.png"
            if "nifti" in formats:
                files.put(staging / f"{stem}.nii.gz", nifti_bytes, synthetic[k])
                row["nifti_file"] = f"{stem}.nii.gz"
                row.setdefault("file", row["nifti_file"])
            if originals is not None:
                name = f"pair_{index:06d}_class{cls}.png"
                files.put(staging / name, _pair_png_bytes, originals[k], synthetic[k])
                row["pair_file"] = name
            row.update(class_=cls, temperature=temperature, seed=seed, model_version=model_version, mode=mode)
            if class_names is not None:
                row["class_name"] = class_names[cls]
            row["dp_noise"] = dp_noise
            row["dp_epsilon"] = (
                "none" if dp_epsilon is None else dp_epsilon if isinstance(dp_epsilon, str) else f"{dp_epsilon:.6g}"
            )
            rows.append(row)

    graphs_here = cuda_graphs and device.type == "cuda" and getattr(flow, "graph_sampling_enabled", True) is False
    compile_here = compile and hasattr(flow, "compile_steps") and compiled_steps(flow) is None
    try:
        if graphs_here:
            flow.graph_sampling()  # switched off again at the end: the caller's flow keeps its own setting
        if compile_here:
            flow.compile_steps(training=False, sampling=True)  # likewise removed at the end
        all_z: list[torch.Tensor] = []
        all_labels: list[torch.Tensor] = []
        all_images: list[torch.Tensor] = []
        for batch in _as_loader(records_or_loader, batch_size):
            if not isinstance(batch, Mapping) or image_key not in batch:
                raise ValueError(f"expected dict batches with an '{image_key}' key.")
            raw = batch[image_key]
            if isinstance(raw, (str, os.PathLike)) or (
                isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str)
            ):
                raise ValueError(
                    f"'{image_key}' holds file paths: apply the transform chain first (e.g. monai.data.Dataset("
                    "records, transform=chain)) so that items carry [1, S, S] tensors."
                )
            images = torch.as_tensor(np.asarray(raw) if not isinstance(raw, torch.Tensor) else raw).float().to(device)
            if images.ndim == 3:
                images = images.unsqueeze(1)
            z = prepare.get_condition(batch, images, device)
            all_z.append(z.detach().cpu())
            all_labels.append(_labels_of(batch, label_key, classifier, images))
            if mode == "pairs":
                all_images.append(images.cpu())
        if not all_z:
            raise ValueError("generate got no input items.")
        z_all, labels_all = torch.cat(all_z), torch.cat(all_labels)
        check_class_names(class_names, labels_all.tolist(), "the inputs hold")
        if mode == "n_per_class":
            draw = torch.Generator().manual_seed(seed)
            chosen = []
            for cls in sorted(set(labels_all.tolist())):
                idx = torch.nonzero(labels_all == cls).reshape(-1)
                reps = -(-n_per_class // idx.numel())  # without replacement while the class has enough inputs
                order = torch.cat([idx[torch.randperm(idx.numel(), generator=draw)] for _ in range(reps)])
                chosen.append(order[:n_per_class])
            chosen_idx = torch.cat(chosen)
        else:  # a file's index must not be its source's position in the input list
            chosen_idx = torch.randperm(z_all.shape[0], generator=torch.Generator().manual_seed(_order_key(flow, seed)))
        originals = torch.cat(all_images) if mode == "pairs" else None
        with ProgressLog(chosen_idx.numel(), "generation", unit="images", enabled=progress) as bar:
            for start in range(0, chosen_idx.numel(), batch_size):
                sel = chosen_idx[start : start + batch_size]
                write(None if originals is None else originals[sel], z_all[sel].to(device), labels_all[sel])
                bar.update(sel.numel())
        files.finish()

        columns = ["index", "file", "class", "temperature", "seed", "model_version", "mode", "dp_epsilon"]
        if "nifti" in formats:
            columns.insert(2, "nifti_file")
        if mode == "pairs":
            columns.insert(2, "pair_file")
        if dp_noise is not None:
            columns.insert(columns.index("dp_epsilon"), "dp_noise")
        if class_names is not None:
            columns.insert(columns.index("class") + 1, "class_name")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            row["class"] = row.pop("class_")
            writer.writerow({k: row.get(k, "") for k in columns})
        over_all, bad_all = torch.cat(overflow), torch.cat(nonfinite)
        samples = summarize_sample_stats(over_all, bad_all, pixels_per_image[0])
        summary = {
            "manifest": manifest_name,
            "mode": mode,
            "temperature": temperature,
            "seed": seed,
            "model_version": model_version,
            "class_names": class_names,
            "samples": samples,
            # per image (manifest index) only where something overflowed: the honest pre-clamp record
            "overflowed_images": [
                {"index": i, "overflow_pixels": int(o), "nonfinite_pixels": int(b)}
                for i, (o, b) in enumerate(zip(over_all.tolist(), bad_all.tolist()))
                if o > 0
            ],
        }
        _write_new_file(staging / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
        _write_new_file(staging / manifest_name, buf.getvalue().encode("utf-8"))
        _swap_into_place(staging, output_dir)
    except BaseException:
        files.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if graphs_here:
            flow.graph_sampling(False)
        if compile_here:
            flow.compile_steps(False)
    manifest = output_dir / manifest_name
    logger.info(
        "wrote %d synthetic image(s) (%s mode, T=%s, seed %d) to %s", len(rows), mode, temperature, seed, output_dir
    )
    if samples["images_with_overflow"]:
        logger.warning(
            "%d of %d synthetic image(s) had pixels outside %s or non-finite before clamping (%.3g%% of all pixels, "
            "%.3g%% non-finite); see %s",
            samples["images_with_overflow"],
            samples["n_images"],
            tuple(samples["range"]),
            100 * samples["overflow_pixel_fraction"],
            100 * samples["nonfinite_pixel_fraction"],
            output_dir / SUMMARY_NAME,
        )
    return manifest


_OWN_FILE = re.compile(r"^(synthetic_\d+_class\d+\.(png|nii\.gz)|pair_\d+_class\d+\.png|generation\.json|\..*\.tmp)$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# how a user set the folder: generate()'s argument, or the bundle's synthetic_dir (OUTPUT_DIR/synthetic by default)
_FOLDER_IDS = "(generate()'s output_dir; generate.json's synthetic_dir, by default OUTPUT_DIR/synthetic)"


def _check_output_dir(output_dir: Path, manifest_name: str) -> None:
    """Refuse an ``output_dir`` that is a file, whose parent cannot be written, or that holds foreign files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"the synthetic-set folder {output_dir} {_FOLDER_IDS} is a file, not a folder: give a folder for the "
            "synthetic set."
        )
    parent = output_dir.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(
            f"the parent of the synthetic-set folder {output_dir} {_FOLDER_IDS}, {parent}, is a file, not a folder."
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot create the folder {parent} for the synthetic-set folder {output_dir} {_FOLDER_IDS}: {err}"
        ) from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write into {parent} (the folder that holds the synthetic-set folder {output_dir} {_FOLDER_IDS}): "
            "it is read-only for this user; choose another output folder."
        )
    if output_dir.is_dir():
        foreign = sorted(
            p.name for p in output_dir.iterdir() if p.name != manifest_name and not _OWN_FILE.match(p.name)
        )
        if foreign:
            raise ValueError(
                f"the synthetic-set folder {output_dir} {_FOLDER_IDS} holds files that generate() did not write "
                f"({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); the synthetic set replaces the whole folder, so choose an "
                "empty or new folder (or move those files)."
            )


def _staging_dir(output_dir: Path) -> Path:
    """A fresh hidden sibling of ``output_dir`` for the new set; leftovers of killed runs are removed first."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in output_dir.parent.glob(f".{output_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def _write_new_file(path: Path, data: bytes) -> None:
    """Write a new file in the staging folder (permissions ``0666`` under the umask, e.g. ``0644``)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _FileWriter:
    """Encodes and writes new files on ``threads`` threads (in the calling thread for 1), at most ``4 * threads``
    files in flight; :meth:`finish` waits for all and raises the first error (e.g. a full disk)."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="condflow-writer") if threads > 1 else None
        self._pending: deque = deque()
        self._limit = 4 * threads

    @staticmethod
    def _job(path: Path, encode: Callable[..., bytes], args: tuple) -> None:
        _write_new_file(path, encode(*args))

    def put(self, path: Path, encode: Callable[..., bytes], *args: Any) -> None:
        if self._pool is None:
            self._job(path, encode, args)
            return
        self._pending.append(self._pool.submit(self._job, path, encode, args))
        while len(self._pending) > self._limit:
            self._pending.popleft().result()

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        if self._pool is not None:
            self._pool.shutdown()

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def _swap_into_place(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the complete ``staging`` folder with renames (the old set is deleted last)."""
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{secrets.token_hex(4)}"
        os.rename(output_dir, old)
    os.rename(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:  # make the renames durable
        fd = os.open(output_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _order_key(flow: torch.nn.Module, seed: int) -> int:
    """Seed of the file order in ``same_z`` / ``pairs`` mode: a hash of ``seed`` and the flow's weights, so the order
    is reproducible with the model but cannot be recomputed from the public seed and the training list alone."""
    h = hashlib.sha256(b"monai_condflow synthetic file order\0" + str(int(seed)).encode() + b"\0")
    for name, tensor in sorted(flow.state_dict().items()):
        h.update(name.encode() + b"\0")
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little")
