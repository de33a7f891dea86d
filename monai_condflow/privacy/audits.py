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
"""Privacy audits of a synthetic-image generator: memorisation and membership inference.

* :func:`distance_to_closest_record` (DCR): for every query image the distance to its nearest reference image.
* :func:`dcr_audit`: synthetic -> train DCR against the baseline of fresh real images, held-out -> train DCR, in
  pixel space and (optionally) in the embedding space of a feature extractor; synthetic images closer to a training
  image than the ``near_copy_quantile`` of the held-out distances are flagged as near-copies and counted.
* :func:`membership_inference_auc`: the likelihood-threshold attack. A flow gives the exact ``log p(x | z)``, so
  "higher likelihood means training member" is the baseline attack; its AUC (train vs held-out) is exact
  (Mann-Whitney, ties counted one half). 0.5: no leakage the attack can see; 1.0: perfect separation.
* :func:`privacy_summary` (the ``privacy`` block of ``metrics.json``: ``epsilon``, ``delta``, ``mia_auc``, ``dcr``)
  and :func:`privacy_section` (its markdown for ``report.md``).

Use an *evaluation* feature extractor for the embedding-space DCR, not the conditioning classifier: synthetic images
are generated from the ``z`` of real training images, so in the conditioning embedding they sit next to their
source by construction (that is the design, and it is itself a leak of ``z``; see ``docs/privacy.md``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from monai_condflow.metrics.auc import mann_whitney_auc, max_advantage
from monai_condflow.metrics.fid import embedding_feature_fn, extract_features

__all__ = [
    "distance_to_closest_record",
    "dcr_statistics",
    "dcr_audit",
    "membership_inference_scores",
    "membership_inference_auc",
    "privacy_summary",
    "privacy_section",
]

logger = logging.getLogger(__name__)

_METRICS = ("l2", "l1", "cosine")


def _flat(images: Tensor | Sequence[Tensor], name: str) -> Tensor:
    if not isinstance(images, Tensor):
        images = torch.stack([torch.as_tensor(i) for i in images]) if len(images) else torch.empty(0)
    if images.ndim < 1 or images.shape[0] == 0:
        raise ValueError(f"{name} is empty: the DCR needs at least one image.")
    return images.detach().reshape(images.shape[0], -1).to(device="cpu", dtype=torch.float64)


def distance_to_closest_record(
    query: Tensor | Sequence[Tensor],
    reference: Tensor | Sequence[Tensor],
    metric: str = "l2",
    batch_size: int = 256,
    return_index: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Distance from every query record to its nearest reference record (DCR), exact, in float64.

    Args:
        query: ``[N, ...]`` images or features (flattened per record).
        reference: ``[M, ...]`` with the same per-record size.
        metric: ``"l2"`` (Euclidean), ``"l1"`` or ``"cosine"`` (``1 - cos``).
        batch_size: query and reference rows per block (memory is ``batch_size^2`` distances).
        return_index: also return the index of the nearest reference record.

    Returns:
        ``dcr [N]`` (float64), or ``(dcr [N], index [N])`` with ``return_index``.

    Raises:
        ValueError: empty input, mismatched record sizes, unknown metric or ``batch_size < 1``.
    """
    if metric not in _METRICS:
        raise ValueError(f"unknown DCR metric {metric!r}; available: {list(_METRICS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    q, r = _flat(query, "query"), _flat(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query records have {q.shape[1]} values but reference records have {r.shape[1]}.")
    if metric == "cosine":
        q, r = nn.functional.normalize(q, dim=1), nn.functional.normalize(r, dim=1)
    best = torch.full((q.shape[0],), math.inf, dtype=torch.float64)
    index = torch.zeros(q.shape[0], dtype=torch.long)
    for qs in range(0, q.shape[0], batch_size):
        qb = q[qs : qs + batch_size]
        for rs in range(0, r.shape[0], batch_size):
            rb = r[rs : rs + batch_size]
            if metric == "cosine":
                dist = 1.0 - qb @ rb.T
            else:
                p = 2.0 if metric == "l2" else 1.0
                dist = torch.cdist(qb, rb, p=p, compute_mode="donot_use_mm_for_euclid_dist")
            value, arg = dist.min(dim=1)
            better = value < best[qs : qs + batch_size]
            best[qs : qs + batch_size] = torch.where(better, value, best[qs : qs + batch_size])
            index[qs : qs + batch_size] = torch.where(better, arg + rs, index[qs : qs + batch_size])
    return (best, index) if return_index else best


def dcr_statistics(
    synthetic_dcr: Tensor,
    holdout_dcr: Tensor,
    near_copy_quantile: float = 0.01,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Compare synthetic -> train DCRs with held-out -> train DCRs and count near-copies.

    A synthetic record is a near-copy when its DCR is strictly below ``threshold``, by default the
    ``near_copy_quantile`` of the held-out DCRs (``torch.quantile``, linear interpolation). A generator that does
    not memorise flags about the same fraction of its samples as of the held-out set (``expected_fraction``).

    Args:
        synthetic_dcr: ``[N_syn]`` synthetic -> train distances.
        holdout_dcr: ``[N_hold]`` held-out -> train distances.
        near_copy_quantile: quantile of ``holdout_dcr`` used as threshold, in ``[0, 1]``.
        threshold: explicit threshold (overrides the quantile).

    Returns:
        dict with ``threshold``, ``n_near_copies``, ``near_copy_fraction``, ``expected_fraction`` (held-out records
        below the threshold), ``near_copy_indices`` (synthetic indices), the mean / median / min / 5th percentile of
        each set (``synthetic_*``, ``holdout_*``), ``median_ratio`` (synthetic median / held-out median; < 1: closer
        to the training set than fresh real images are) and ``closer_auc`` = P(synthetic DCR < held-out DCR) (ties
        one half; 0.5: same distribution, 1.0: every synthetic record is closer than every held-out one) and
        ``holdout_copies``, the held-out records at distance 0 (exact copies of training records: the hold-out is
        not held out, and a threshold of 0 flags nothing).
    """
    syn = synthetic_dcr.detach().reshape(-1).double().cpu()
    hold = holdout_dcr.detach().reshape(-1).double().cpu()
    if syn.numel() == 0 or hold.numel() == 0:
        raise ValueError("dcr_statistics needs at least one synthetic and one held-out distance.")
    if threshold is None:
        if not 0.0 <= near_copy_quantile <= 1.0:
            raise ValueError(f"near_copy_quantile must be in [0, 1], got {near_copy_quantile}.")
        threshold = float(torch.quantile(hold, near_copy_quantile))
    flagged = torch.nonzero(syn < threshold).reshape(-1)

    def _describe(values: Tensor, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_mean": float(values.mean()),
            f"{prefix}_median": float(values.median()),
            f"{prefix}_min": float(values.min()),
            f"{prefix}_p05": float(torch.quantile(values, 0.05)),
        }

    median_hold = float(hold.median())
    return {
        "threshold": float(threshold),
        "n_synthetic": int(syn.numel()),
        "n_holdout": int(hold.numel()),
        "n_near_copies": int(flagged.numel()),
        "near_copy_fraction": float(flagged.numel() / syn.numel()),
        "expected_fraction": float((hold < threshold).double().mean()),
        "near_copy_indices": flagged.tolist(),
        **_describe(syn, "synthetic"),
        **_describe(hold, "holdout"),
        "median_ratio": float(syn.median()) / median_hold if median_hold > 0 else math.inf,
        "closer_auc": mann_whitney_auc(-syn, -hold),
        "holdout_copies": int((hold == 0).sum()),
    }


def dcr_audit(
    synthetic: Tensor,
    train: Tensor,
    holdout: Tensor,
    feature_extractor: nn.Module | Callable[[Tensor], Tensor] | None = None,
    near_copy_quantile: float = 0.01,
    threshold: float | None = None,
    embedding_threshold: float | None = None,
    metric: str = "l2",
    embedding_metric: str = "l2",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Memorisation audit: synthetic -> train DCR vs held-out -> train DCR, in pixel and embedding space.

    Args:
        synthetic: ``[N_syn, C, *S]`` synthetic images in ``[0, 1]``.
        train: ``[N_train, C, *S]`` the generator's training images (same preprocessing).
        holdout: ``[N_hold, C, *S]`` real images the generator never saw (same preprocessing).
        feature_extractor: optional embedding (a module with ``embed`` such as ``PEPXNet``, or a callable
            ``[B, C, *S] -> [B, D]``); use an evaluation classifier, not the conditioning one (module docstring).
        near_copy_quantile: held-out DCR quantile used as the near-copy threshold.
        threshold: explicit pixel-space threshold (overrides the quantile).
        embedding_threshold: explicit embedding-space threshold (overrides the quantile).
        metric: pixel-space distance (see :func:`distance_to_closest_record`).
        embedding_metric: embedding-space distance.
        batch_size: block size for the distances and the feature extraction.

    Returns:
        ``{"pixel": stats, "embedding": stats | None, "near_copy_quantile": q}`` with ``stats`` from
        :func:`dcr_statistics` plus ``metric`` and ``nearest_train_indices`` (the nearest training index of every
        flagged synthetic image, aligned with ``near_copy_indices``).
    """

    def _space(syn: Tensor, tr: Tensor, hold: Tensor, space_metric: str, thr: float | None) -> dict[str, Any]:
        syn_dcr, syn_idx = distance_to_closest_record(syn, tr, space_metric, batch_size, return_index=True)
        hold_dcr = distance_to_closest_record(hold, tr, space_metric, batch_size)
        stats = dcr_statistics(syn_dcr, hold_dcr, near_copy_quantile, thr)
        stats["metric"] = space_metric
        stats["nearest_train_indices"] = syn_idx[stats["near_copy_indices"]].tolist()
        return stats

    result: dict[str, Any] = {
        "near_copy_quantile": near_copy_quantile,
        "pixel": _space(synthetic, train, holdout, metric, threshold),
        "embedding": None,
    }
    if feature_extractor is not None:
        feats = [extract_features(feature_extractor, s, batch_size=batch_size) for s in (synthetic, train, holdout)]
        result["embedding"] = _space(*feats, embedding_metric, embedding_threshold)
    for space in ("pixel", "embedding"):
        stats = result[space]
        if stats is not None:
            logger.info(
                "DCR audit (%s): %d/%d synthetic near-copies (threshold %.4g, held-out rate %.3f), median ratio %.3f",
                space, stats["n_near_copies"], stats["n_synthetic"], stats["threshold"], stats["expected_fraction"],
                stats["median_ratio"],
            )  # fmt: skip
    return result


def _condition_fn(condition_fn_or_classifier: nn.Module | Callable[[Tensor], Tensor] | None) -> Callable | None:
    if condition_fn_or_classifier is None:
        return None
    return embedding_feature_fn(condition_fn_or_classifier)


@torch.no_grad()
def membership_inference_scores(
    flow: nn.Module,
    condition_fn_or_classifier: nn.Module | Callable[[Tensor], Tensor] | None,
    images: Tensor,
    n_bits: int = 8,
    batch_size: int = 64,
) -> Tensor:
    """Bits per dimension of every image under the flow, ``bpd(x | z)`` with ``z = classifier.embed(x)``.

    Runs in eval mode without gradients; the train / eval mode of ``flow`` and of the classifier is restored.

    Args:
        flow: a :class:`~monai_condflow.networks.nets.ConditionalGlow` (anything with ``bits_per_dim(x, z, n_bits)``).
        condition_fn_or_classifier: the conditioning classifier (its ``embed``) or a callable ``x -> z``; ``None``
            for an unconditional flow.
        images: ``[N, C, *S]`` in ``[0, 1]``.
        n_bits: bit depth of the data (a constant offset of the bpd; the attack AUC does not depend on it).
        batch_size: images per forward pass.

    Returns:
        ``[N]`` float64 bits per dimension (lower = more likely); non-finite values become ``+inf``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    fn = _condition_fn(condition_fn_or_classifier)
    modules = [m for m in (flow, condition_fn_or_classifier) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    param = next(flow.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = []
    try:
        for m in modules:
            m.eval()
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            z = fn(x) if fn is not None else None
            out.append(flow.bits_per_dim(x, z, n_bits=n_bits).double().cpu())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    if not out:
        raise ValueError("membership_inference_scores got an empty image set.")
    bpd = torch.cat(out)
    bad = ~torch.isfinite(bpd)
    if bad.any():
        logger.warning("membership inference: %d non-finite bits/dim set to +inf", int(bad.sum()))
        bpd = torch.where(bad, torch.full_like(bpd, math.inf), bpd)
    return bpd


def membership_inference_auc(
    flow: nn.Module,
    condition_fn_or_classifier: nn.Module | Callable[[Tensor], Tensor] | None,
    train_images: Tensor,
    holdout_images: Tensor,
    n_bits: int = 8,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Likelihood-threshold membership-inference attack: "lower bits/dim means training member".

    Args:
        flow: the trained conditional flow.
        condition_fn_or_classifier: conditioning classifier or ``x -> z`` callable (``None``: unconditional).
        train_images: ``[N_train, C, *S]`` members (images the flow was trained on).
        holdout_images: ``[N_hold, C, *S]`` non-members from the same distribution.
        n_bits: data bit depth.
        batch_size: images per forward pass.

    Returns:
        dict with ``auc`` (exact Mann-Whitney AUC of the score ``-bpd``; 0.5 = chance), ``advantage``
        (max over thresholds of TPR - FPR), ``train_bpd_mean``, ``holdout_bpd_mean``, ``bpd_gap``
        (held-out minus train mean; > 0 = the flow fits its training images better), ``n_train``, ``n_holdout``.
    """
    train_bpd = membership_inference_scores(flow, condition_fn_or_classifier, train_images, n_bits, batch_size)
    hold_bpd = membership_inference_scores(flow, condition_fn_or_classifier, holdout_images, n_bits, batch_size)
    result = {
        "auc": mann_whitney_auc(-train_bpd, -hold_bpd),
        "advantage": max_advantage(-train_bpd, -hold_bpd),
        "train_bpd_mean": float(train_bpd.mean()),
        "holdout_bpd_mean": float(hold_bpd.mean()),
        "bpd_gap": float(hold_bpd.mean() - train_bpd.mean()),
        "n_train": int(train_bpd.numel()),
        "n_holdout": int(hold_bpd.numel()),
    }
    logger.info("membership inference: AUC %.4f, advantage %.4f, bpd gap %.4g", result["auc"], result["advantage"],
                result["bpd_gap"])  # fmt: skip
    return result


def privacy_summary(
    dcr: Mapping[str, Any] | None = None,
    mia: Mapping[str, Any] | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    dp_covers: str | None = None,
) -> dict[str, Any]:
    """The ``privacy`` block of ``metrics.json`` (JSON-ready; index lists dropped, ``None`` where not measured).

    Args:
        dcr: result of :func:`dcr_audit`.
        mia: result of :func:`membership_inference_auc`.
        epsilon: DP-SGD epsilon spent (``None``: not trained with DP).
        delta: the DP delta.
        dp_covers: what the (epsilon, delta) covers (e.g. :func:`monai_condflow.privacy.dp.coverage_note`).

    Returns:
        ``{"epsilon", "delta", "mia_auc", "dcr", ...}`` with ``dcr = {"pixel": stats, "embedding": stats}``.
    """
    dcr_out: dict[str, Any] | None = None
    if dcr is not None:
        dcr_out = {}
        for space in ("pixel", "embedding"):
            stats = dcr.get(space)
            dcr_out[space] = None if stats is None else {k: v for k, v in stats.items() if not k.endswith("_indices")}
    out: dict[str, Any] = {
        "epsilon": None if epsilon is None else float(epsilon),
        "delta": None if delta is None else float(delta),
        "mia_auc": None if mia is None else float(mia["auc"]),
        "dcr": dcr_out,
    }
    if mia is not None:
        out["mia"] = dict(mia)
    if dp_covers is not None:
        out["dp_covers"] = dp_covers
    return out


def _fmt(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def privacy_section(results: Mapping[str, Any]) -> str:
    """Markdown "Privacy" section for ``report.md`` from a :func:`privacy_summary` dict.

    Args:
        results: dict with keys ``epsilon``, ``delta``, ``mia_auc``, ``dcr`` (and optionally ``mia``, ``dp_covers``).

    Returns:
        markdown text ending with a newline.
    """
    lines = ["## Privacy", ""]
    eps, delta = results.get("epsilon"), results.get("delta")
    if eps is None:
        lines.append("- Differential privacy: **not** trained with DP-SGD (no formal guarantee).")
    else:
        lines.append(f"- DP-SGD: (epsilon = {_fmt(eps)}, delta = {_fmt(delta)}).")
    if results.get("dp_covers"):
        lines.append(f"- The guarantee covers: {results['dp_covers']}")
    mia = results.get("mia") or {}
    if results.get("mia_auc") is not None:
        extra = ""
        if mia:
            extra = (
                f" (advantage {_fmt(mia.get('advantage'))}; mean bits/dim train {_fmt(mia.get('train_bpd_mean'))} vs "
                f"held-out {_fmt(mia.get('holdout_bpd_mean'))})"
            )
        lines.append(
            f"- Likelihood-threshold membership inference, train vs held-out: AUC = {_fmt(results['mia_auc'], '.3f')}"
            f"{extra}; 0.5 is chance."
        )
    dcr = results.get("dcr") or {}
    rows = [(space, dcr.get(space)) for space in ("pixel", "embedding") if dcr.get(space)]
    if rows:
        lines += [
            "",
            "Distance to closest training record (DCR); a near-copy is a synthetic image closer to a training image "
            "than the threshold (a low quantile of held-out real images' DCR).",
            "",
            "| space | median DCR synthetic | median DCR held-out | ratio | P(synthetic closer) | threshold | "
            "near-copies | held-out rate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for space, s in rows:
            lines.append(
                f"| {space} ({s.get('metric', 'l2')}) | {_fmt(s['synthetic_median'])} | {_fmt(s['holdout_median'])} | "
                f"{_fmt(s['median_ratio'], '.3f')} | {_fmt(s['closer_auc'], '.3f')} | {_fmt(s['threshold'])} | "
                f"{s['n_near_copies']}/{s['n_synthetic']} ({100 * s['near_copy_fraction']:.1f}%) | "
                f"{100 * s['expected_fraction']:.1f}% |"
            )
        copies = max((int(s.get("holdout_copies") or 0) for _, s in rows), default=0)
        if copies:
            lines += [
                "",
                f"**This audit cannot tell:** {copies} held-out image(s) are exact copies of training images (DCR 0), "
                "so the held-out set is not held out and a threshold of 0 flags no near-copy. Remove the copies "
                "(the same image under two names, or a patient in both sets) before reading it.",
            ]
    if not rows and results.get("mia_auc") is None:
        lines.append("- No privacy audit was run.")
    return "\n".join(lines) + "\n"
