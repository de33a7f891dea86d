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
"""Counterfactual triplets and novelty scores of real images under a trained conditional flow (``counterfactual.json``,
``novelty.json``).

:func:`write_counterfactuals`: for every input slice ``x`` with embedding ``z = classifier.embed(x)``, encode
``nu = flow(x, z)``, decode ``x' = flow.inverse(nu, z')`` with the target class's condition ``z'`` (class centroid
or nearest real embedding of that class, :func:`~monai_condflow.networks.nets.target_conditions`) and write
``source`` / ``counterfactual`` / ``difference`` files (16-bit PNG and / or NIfTI, the writers of
:mod:`~monai_condflow.engines.generation`) with ``manifest.csv`` (index, files, source / target / predicted class)
and ``counterfactual.json`` (flip rate). The set is written into a hidden staging folder and renamed into place, as
the synthetic set is. The difference PNG stores ``0.5 + (x' - x) / 2`` (mid-grey = no change); its NIfTI the signed
difference ``x' - x``.

:func:`score_novelty`: per-image novelty scores (:mod:`~monai_condflow.metrics.novelty`) against reference images,
written to ``scores.csv`` and ``novelty.json`` (with the AUROC of novel versus known images when labels say which
are novel); with ``heat_maps`` also a per-pixel map of each image (:func:`~monai_condflow.metrics.novelty.novelty_map`
minus the reference images' mean map: *where* it is unusual) as NIfTI in ``heat_maps/`` and an overview PNG.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_condflow.engines.generation import (
    _as_loader,
    _staging_dir,
    _swap_into_place,
    _write_new_file,
    check_class_names,
    nifti_bytes,
    png16_bytes,
)
from monai_condflow.metrics.auc import binary_auc
from monai_condflow.metrics.novelty import (
    NOVELTY_STATISTICS,
    NoveltyScorer,
    flow_statistics,
    max_softmax_score,
    novelty_map,
)
from monai_condflow.networks.embeddings import compute_embeddings
from monai_condflow.networks.nets.counterfactual import TARGET_MODES, restrict_change, target_conditions
from monai_condflow.transforms.grid import make_grid
from monai_condflow.transforms.lung_mask import estimate_lung_masks
from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.distributed import unwrap_model
from monai_condflow.utils.io import atomic_write_text

__all__ = ["write_counterfactuals", "score_novelty"]

logger = logging.getLogger(__name__)

_CF_FILE = re.compile(r"^((source|counterfactual|difference)_\d+\.(png|nii\.gz)|counterfactual\.json|\..*\.tmp)$")
_FORMATS = ("png", "nifti")
REGIONS: tuple[str, ...] = ("image", "lungs")
"""Where :func:`write_counterfactuals` lets the counterfactual change the source: the whole ``"image"`` (the flow's
exact counterfactual) or only the ``"lungs"`` (:func:`~monai_condflow.transforms.lung_mask.estimate_lung_mask` of the
source: ``x + mask * (x' - x)``)."""


def _batches(data: Iterable | Sequence[Mapping[str, Any]], batch_size: int) -> Iterable:
    return _as_loader(data, batch_size)


def _check_cf_output_dir(output_dir: Path, own: re.Pattern, manifest: str) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} is a file, not a folder.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if output_dir.is_dir():
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name != manifest and not own.match(p.name))
        if foreign:
            raise ValueError(
                f"output_dir {output_dir} holds files this stage did not write ({', '.join(foreign[:5])}); the set "
                "replaces the whole folder, so choose an empty or new folder."
            )


@torch.no_grad()
def write_counterfactuals(
    flow: torch.nn.Module,
    classifier: torch.nn.Module,
    data: Iterable | Sequence[Mapping[str, Any]],
    bank: Iterable | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    num_classes: int,
    target: int | None = None,
    mode: str = "centroid",
    guidance: float | None = None,
    formats: Sequence[str] = _FORMATS,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    model_version: str = "",
    limit: int | None = None,
    region: str = "image",
    region_margin: int = 1,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write counterfactual triplets of ``data`` (see the module docstring).

    Args:
        flow: the trained ``ConditionalGlow``.
        classifier: the frozen classifier (``embed(x) -> z``, ``forward(x) -> logits``).
        data: records or batches with ``image`` ``[1, S, S]`` (and ``label``; without it the classifier's
            prediction is the source class).
        bank: real images of every class (``image``, ``label``), e.g. the training records: the target conditions
            are computed from their embeddings.
        output_dir: folder of the set (replaced as a whole).
        num_classes: number of classes.
        target: target class of every image; ``None``: the next class, ``(source + 1) % num_classes`` (with two
            classes: the other one).
        mode: ``"centroid"`` or ``"nearest"`` (:data:`~monai_condflow.networks.nets.counterfactual.TARGET_MODES`).
        guidance: guidance weight of both passes (default: the flow's).
        formats: any of ``"png"``, ``"nifti"``.
        batch_size: images per forward pass.
        device: device of the passes.
        model_version: written to the manifest.
        limit: at most this many images (``None``: all).
        region: one of :data:`REGIONS`: ``"image"`` (this function's default) keeps the flow's counterfactual whole;
            ``"lungs"`` (the default of ``counterfactual.json``) keeps its change only inside the source's estimated
            lung mask. An image whose mask is empty (no lungs found, or none left after the margin) is left
            unchanged, counted in ``empty_masks`` and still counted in ``flip_rate``.
        region_margin: with ``"lungs"``, pixels the mask is eroded by (a margin inside the estimated lung border).
        class_names: the classes' names by id (bundle id ``class_names``): ``source_class_name`` and
            ``target_class_name`` columns at the end of the manifest and ``class_names`` in the summary; ``None``: ids
            only. Fewer names than ``num_classes`` are refused before anything is written, a data label without a
            name (e.g. ``-1``) when it is met (nothing is kept of the set).

    Returns:
        The summary written to ``counterfactual.json``: ``count``; ``flip_rate``: of the ``to_flip`` sources
        that the classifier does not already read as the target class, the share whose counterfactual it reads as
        the target (``None`` when there is none; before the thirtieth session sources already read as the target
        counted as flips); ``target_rate`` (every counterfactual read as the target); ``source_accuracy``,
        ``mode``, ``guidance``, ``mean_abs_change``, ``region``, ``region_margin`` (``None`` for ``"image"``),
        ``mean_region_fraction`` (share of the pixels the change may touch) and ``empty_masks``.
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown counterfactual mode {mode!r}; available: {list(TARGET_MODES)}.")
    if region not in REGIONS:
        raise ValueError(f"unknown counterfactual region {region!r}; available: {list(REGIONS)}.")
    if isinstance(region_margin, bool) or not isinstance(region_margin, int) or region_margin < 0:
        raise ValueError(f"region_margin must be an integer >= 0 (pixels), got {region_margin!r}.")
    formats = list(formats)
    if not formats or any(f not in _FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty subset of {list(_FORMATS)}, got {formats}.")
    if target is not None and not 0 <= int(target) < num_classes:
        raise ValueError(f"target must be a class id in [0, {num_classes}), got {target}.")
    class_names = check_class_names(class_names, range(num_classes), f"num_classes {num_classes} has")
    device = torch.device(device)
    net, clf = unwrap_model(flow).to(device).eval(), unwrap_model(classifier).to(device).eval()
    bank_z, bank_y = compute_embeddings(clf, _batches(bank, batch_size), device)
    bank_z, bank_y = bank_z.to(device), bank_y.to(device)
    if bool((bank_y < 0).any()):
        raise ValueError("every bank record needs a label (the target conditions are per class).")
    output_dir = Path(output_dir)
    _check_cf_output_dir(output_dir, _CF_FILE, "manifest.csv")
    staging = _staging_dir(output_dir)
    rows, index, flips, correct, change, fraction, empty = [], 0, 0, 0, 0.0, 0.0, 0
    to_flip, on_target = 0, 0
    try:
        for batch in _batches(data, batch_size):
            x = torch.as_tensor(batch["image"]).float().to(device)
            if limit is not None:
                x = x[: max(limit - index, 0)]
            if x.shape[0] == 0:
                break
            z = clf.embed(x)
            pred_src = clf(x).argmax(1)
            src = torch.as_tensor(batch["label"]).long().to(device)[: x.shape[0]] if "label" in batch else pred_src
            if class_names is not None:  # a data label outside the names (e.g. -1) would be named wrongly
                check_class_names(class_names, src.tolist(), "the data hold")
            tgt = torch.full_like(src, int(target)) if target is not None else (src + 1) % num_classes
            z_t = target_conditions(z, tgt, bank_z, bank_y, num_classes, mode)
            x_cf = net.counterfactual(x, z, z_t, guidance=guidance).clamp(0.0, 1.0)
            if region == "lungs":
                mask = estimate_lung_masks(x, erosion=region_margin)
                x_cf = restrict_change(x, x_cf, mask)
                area = mask.flatten(1).mean(1)
                fraction += float(area.sum())
                empty += int((area == 0).sum())
            else:
                fraction += float(x.shape[0])
            pred = clf(x_cf).argmax(1)
            diff = x_cf - x
            for k in range(x.shape[0]):
                names = {}
                for kind, img, png_img in (("source", x[k], x[k]), ("counterfactual", x_cf[k], x_cf[k]),
                                           ("difference", diff[k], 0.5 + diff[k] / 2)):  # fmt: skip
                    files = []
                    if "png" in formats:
                        files.append(f"{kind}_{index:06d}.png")
                        _write_new_file(staging / files[-1], png16_bytes(png_img))
                    if "nifti" in formats:
                        files.append(f"{kind}_{index:06d}.nii.gz")
                        _write_new_file(staging / files[-1], nifti_bytes(img))
                    names[kind] = ";".join(files)
                needed = bool(pred_src[k] != tgt[k])  # a source already read as the target needs no flip
                classes = [int(src[k]), int(pred_src[k]), int(tgt[k]), int(pred[k]), int(needed and pred[k] == tgt[k])]
                named = [] if class_names is None else [class_names[classes[0]], class_names[classes[2]]]
                rows.append([index, names["source"], names["counterfactual"], names["difference"], *classes,
                             model_version, *named])  # fmt: skip
                index += 1
            needs = pred_src != tgt
            flips += int((needs & (pred == tgt)).sum())
            to_flip += int(needs.sum())
            on_target += int((pred == tgt).sum())
            correct += int((pred_src == src).sum())
            change += float(diff.abs().flatten(1).mean(1).sum())
        if index == 0:
            raise ValueError("write_counterfactuals: no input images.")
        summary = {
            "count": index,
            "flip_rate": flips / to_flip if to_flip else None,
            "to_flip": to_flip,
            "target_rate": on_target / index,
            "source_accuracy": correct / index,
            "mean_abs_change": change / index,
            "region": region,
            "region_margin": region_margin if region == "lungs" else None,
            "mean_region_fraction": fraction / index,
            "empty_masks": empty,
            "mode": mode,
            "target": target,
            "guidance": float(net.guidance if guidance is None else guidance),
            "model_version": model_version,
            "class_names": class_names,
        }
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["index", "source", "counterfactual", "difference", "source_class", "source_predicted",
                         "target_class", "predicted_class", "flipped", "model_version",
                         *([] if class_names is None else ["source_class_name", "target_class_name"])])  # fmt: skip
        writer.writerows(rows)
        _write_new_file(staging / "counterfactual.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
        _write_new_file(staging / "manifest.csv", buf.getvalue().encode("utf-8"))
        _swap_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if empty:
        logger.warning("counterfactuals: no lung pixels (after a margin of %d) in %d of %d source images; those are "
                       "left unchanged.", region_margin, empty, index)  # fmt: skip
    logger.info(
        "counterfactuals: %d images, flip rate %s of %d that needed a flip -> %s", index,
        "n/a" if summary["flip_rate"] is None else f"{summary['flip_rate']:.3f}", to_flip, output_dir,
    )  # fmt: skip
    return summary


def _statistics(flow: torch.nn.Module, clf: torch.nn.Module, data: Iterable, batch_size: int, device: torch.device,
                n_bits: int, background: torch.nn.Module | None = None, maps: list[torch.Tensor] | None = None,
                images: list[torch.Tensor] | None = None,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-image flow statistics, labels (-1 without) and the classifier's ``1 - max softmax``; with ``maps`` /
    ``images`` lists, each batch's :func:`novelty_map` and images (CPU) are appended to them."""
    parts, labels, msp = [], [], []
    for batch in _batches(data, batch_size):
        x = torch.as_tensor(batch["image"]).float().to(device)
        z = clf.embed(x)
        parts.append(flow_statistics(flow, x, z, n_bits, background=background))
        if maps is not None:
            maps.append(novelty_map(flow, x, z, background).float())
        if images is not None:
            images.append(x.detach().float().cpu())
        msp.append(max_softmax_score(clf(x)))
        lab = batch.get("label") if isinstance(batch, Mapping) else None
        labels.append(torch.as_tensor(lab).long().reshape(-1).cpu() if lab is not None else torch.full((len(x),), -1))
    if not parts:
        raise ValueError("score_novelty: no input images.")
    stats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return stats, torch.cat(labels), torch.cat(msp)


def _write_heat_maps(folder: Path, maps: torch.Tensor, images: torch.Tensor, scores: torch.Tensor,
                     overview: int) -> dict[str, Any]:  # fmt: skip
    """Write every map ``[N, H, W]`` as ``heat_<index>.nii.gz`` and the overview PNG into ``folder`` (replaced as a
    whole); returns the ``heat_maps`` record of ``novelty.json``."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    scale = float(torch.quantile(maps.abs().flatten(), 0.99).clamp_min(1e-12))
    top = scores.argsort(descending=True)[: max(1, min(int(overview), len(scores)))]
    staging = _staging_dir(folder)
    try:
        for i in range(maps.shape[0]):
            _write_new_file(staging / f"heat_{i:06d}.nii.gz", nifti_bytes(maps[i]))
        shown = (0.5 + maps[top] / (2 * scale)).clamp(0, 1)
        grid = make_grid(torch.cat([images[top, 0].clamp(0, 1), shown]), nrow=len(top), padding=2, pad_value=1.0)
        _write_new_file(staging / "overview.png", png16_bytes(grid.astype("float64") / 255.0))
        _swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "count": int(maps.shape[0]),
        "units": "bits per pixel above the reference images' mean map",
        "overview": f"{folder.name}/overview.png",
        "overview_indices": [int(i) for i in top],
        "overview_scale_bits": scale,
    }


@torch.no_grad()
def score_novelty(
    flow: torch.nn.Module,
    classifier: torch.nn.Module,
    reference: Iterable | Sequence[Mapping[str, Any]],
    data: Iterable | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    statistic: str = "level_typicality",
    novel_labels: Sequence[int] | None = None,
    ood_data: Iterable | Sequence[Mapping[str, Any]] | None = None,
    n_bits: int = 8,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    background: torch.nn.Module | None = None,
    heat_maps: bool = False,
    overview: int = 8,
) -> dict[str, Any]:
    """Score every image of ``data`` (and ``ood_data``) by how unusual it is to ``flow``.

    Args:
        flow: the trained ``ConditionalGlow`` (conditioned on ``classifier.embed(x)``).
        classifier: the frozen classifier (its max-softmax score is written beside, as a baseline).
        reference: in-distribution images not used for training the flow (e.g. the validation set).
        data: images to score (``image``, optional ``label``).
        output_dir: where ``scores.csv`` and ``novelty.json`` go (created; those two files are replaced).
        statistic: one of :data:`~monai_condflow.metrics.novelty.NOVELTY_STATISTICS`.
        novel_labels: labels of ``data`` that count as novel (positives of the AUROC).
        ood_data: further images that all count as novel (e.g. another dataset).
        n_bits: bit depth of the data.
        batch_size: images per forward pass.
        device: device of the passes.
        background: a lower-capacity flow trained on the same images with the same condition (statistic
            ``"likelihood_ratio"``; bundle id ``background_flow_dir``); its bits/dim go to ``scores.csv`` too.
        heat_maps: also write ``heat_maps/heat_<index>.nii.gz`` per scored image (float32, bits per pixel above the
            reference images' mean map; with ``background`` the map of the likelihood ratio, else of the flow's own
            bits) and ``heat_maps/overview.png`` (the ``overview`` highest-scoring images above their maps,
            mid-grey = as usual as the reference, white = more unusual); the folder is replaced as a whole.
        overview: images in the overview.

    Returns:
        The content of ``novelty.json``: statistic, counts, mean score and, when some images are novel and some
        known, ``auroc`` (the flow's score) and ``auroc_max_softmax`` (the classifier's).
    """
    if statistic not in NOVELTY_STATISTICS:
        raise ValueError(f"unknown novelty statistic {statistic!r}; available: {list(NOVELTY_STATISTICS)}.")
    if statistic == "likelihood_ratio" and background is None:
        raise ValueError(
            "novelty statistic 'likelihood_ratio' needs a background flow: set the config id 'background_flow_dir' to "
            "the folder of a lower-capacity flow trained with train_flow.json on the same data (see "
            "docs/counterfactuals.md)."
        )
    if novel_labels is not None:
        if isinstance(novel_labels, (str, bytes)) or not isinstance(novel_labels, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in novel_labels
        ):
            raise ConfigValueError(
                f"config id 'novel_labels' must be a list of class ids (e.g. [1]) or null, got {novel_labels!r}."
            )
    device = torch.device(device)
    net, clf = unwrap_model(flow).to(device).eval(), unwrap_model(classifier).to(device).eval()
    bg = None if background is None else unwrap_model(background).to(device).eval()
    ref_maps: list[torch.Tensor] | None = [] if heat_maps else None
    maps: list[torch.Tensor] | None = [] if heat_maps else None
    images: list[torch.Tensor] | None = [] if heat_maps else None
    ref, _, _ = _statistics(net, clf, reference, batch_size, device, n_bits, bg, maps=ref_maps)
    scorer = NoveltyScorer(statistic, ref)
    stats, labels, msp = _statistics(net, clf, data, batch_size, device, n_bits, bg, maps=maps, images=images)
    novel = torch.zeros(len(labels), dtype=torch.bool)
    if novel_labels is not None:
        novel = torch.isin(labels, torch.as_tensor(list(novel_labels), dtype=torch.long))
        absent = sorted(set(novel_labels) - set(labels.tolist()))
        if absent:
            raise ConfigValueError(
                f"config id 'novel_labels' names class(es) {absent} that no scored image has (labels present: "
                f"{sorted(set(labels.tolist()))}); the AUROC would have no positives from them."
            )
    source = ["data"] * len(labels)
    if ood_data is not None:
        ood, ood_labels, ood_msp = _statistics(net, clf, ood_data, batch_size, device, n_bits, bg, maps, images)
        stats = {k: torch.cat([stats[k], ood[k]]) for k in stats}
        labels, msp = torch.cat([labels, ood_labels]), torch.cat([msp, ood_msp])
        novel = torch.cat([novel, torch.ones(len(ood_labels), dtype=torch.bool)])
        source += ["ood_data"] * len(ood_labels)
    scores = scorer(stats)
    summary: dict[str, Any] = {
        "statistic": statistic,
        "count": len(scores),
        "novel": int(novel.sum()),
        "reference": int(ref["bpd"].numel()),
        "mean_score": float(scores.mean()),
        "mean_bpd": float(stats["bpd"].mean()),
    }
    if 0 < int(novel.sum()) < len(novel):
        summary["auroc"] = binary_auc(scores, novel.long())
        summary["auroc_max_softmax"] = binary_auc(msp, novel.long())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = ["background_bpd"] if "background_bpd" in stats else []
    writer.writerow(["index", "source", "label", "novel", "score", "bpd", "png_bpd", *extra, "max_softmax_score"])
    for i in range(len(scores)):
        values = [scores[i], stats["bpd"][i], stats["png_bpd"][i], *(stats[k][i] for k in extra), msp[i]]
        writer.writerow([i, source[i], int(labels[i]), int(novel[i]), *(f"{float(v):.6g}" for v in values)])
    atomic_write_text(output_dir / "scores.csv", buf.getvalue())
    if heat_maps:
        summary["heat_maps"] = _write_heat_maps(
            output_dir / "heat_maps", torch.cat(maps) - torch.cat(ref_maps).mean(0), torch.cat(images), scores, overview
        )
    atomic_write_text(output_dir / "novelty.json", json.dumps(summary, indent=2) + "\n")
    logger.info("novelty (%s): %d images, AUROC %s -> %s", statistic, len(scores), summary.get("auroc"), output_dir)
    return summary
