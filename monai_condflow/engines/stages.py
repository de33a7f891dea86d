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
"""Entry points of the bundle's stages: what ``train_flow.json``, ``generate.json`` and ``evaluate.json`` call.

Stages share one ``output_dir``::

    output_dir/classifier/  model.pt, classifier.json, train_labels.json (semi-supervised), state checkpoints
    output_dir/flow/        model.pt, flow.json, state checkpoints, samples/
    output_dir/tensorboard/ one folder per stage: classifier/ (and classifier/label_propagation/), flow/, projector/
    output_dir/synthetic/   synthetic PNG / NIfTI files and manifest.csv
    output_dir/report.md, output_dir/metrics.json

Each stage checks that the stage before it has run and says which config to run first when it has not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import monai_condflow
from monai_condflow.engines.config_checks import ConfigValueError, check_preset
from monai_condflow.engines.flow import FLOW_STATE_PREFIXES
from monai_condflow.engines.run_folder import SETTINGS_NAME, RunSettingsError, read_run_settings, recorded_difference
from monai_condflow.engines.stage_io import load_weights, read_stage_info, require_file, write_stage_info
from monai_condflow.handlers.checkpoint import _STEP_RE, atomic_torch_save, find_latest_checkpoint, load_checkpoint
from monai_condflow.networks.nets import ConditionalGlow, PEPXNet
from monai_condflow.networks.nets.conditional_glow import PRESETS as GLOW_PRESETS
from monai_condflow.utils.distributed import unwrap_model
from monai_condflow.utils.io import MODEL_FILE

__all__ = [
    "CLASSIFIER_PRESETS",
    "FLOW_PRESETS",
    "check_flow_ids",
    "check_flow_classifier",
    "check_flow_image_size",
    "check_run_images",
    "stage_dp",
    "classifier_fingerprint",
    "load_classifier",
    "build_flow",
    "finish_flow_stage",
    "load_flow",
    "load_flow_folder",
    "model_version",
    "privacy_spent",
    "privacy_noise",
]

logger = logging.getLogger(__name__)

CLASSIFIER_PRESETS: tuple[str, ...] = PEPXNet.preset_names()
"""Classifier presets (``classifier_preset``): the names :meth:`PEPXNet.from_preset` accepts."""
FLOW_PRESETS: tuple[str, ...] = tuple(GLOW_PRESETS)
"""Flow presets (``flow_preset``): the names :meth:`ConditionalGlow.from_preset` accepts."""


def load_classifier(output_dir: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen conditioning classifier of a run (``output_dir/classifier/model.pt``), in eval mode.

    Raises:
        FileNotFoundError: when the classifier stage has not run (the message says to run train_classifier.json).
    """
    folder = Path(output_dir) / "classifier"
    info = read_stage_info(folder, "classifier", "train_classifier.json")
    path = require_file(folder / MODEL_FILE, "classifier checkpoint", "train_classifier.json")
    net = PEPXNet.from_preset(
        info["preset"],
        spatial_dims=2,
        in_channels=1,
        out_channels=int(info["num_classes"]),
        norm=info.get("norm", "batch"),  # DP-SGD classifiers use GroupNorm
    )
    load_weights(net, path)
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def classifier_fingerprint(output_dir: str | os.PathLike) -> str | None:
    """A fingerprint of the run's classifier weights (``output_dir/classifier/model.pt``), or ``None`` before the
    classifier stage has run.

    SHA-256 (first 16 hex digits) over the names, dtypes, shapes and bytes of the checkpoint's weight tensors (its
    ``network`` entry, or the bare state dict), so a re-save of equal weights keeps it and any changed weight changes
    it. The flow stage records it with its settings (``run_settings.json``): a flow folder whose checkpoints were
    trained on another classifier's embeddings is then refused, with the setting ``classifier`` named, instead of
    resumed.
    """
    path = Path(output_dir) / "classifier" / MODEL_FILE
    if not path.is_file():
        return None
    state = load_checkpoint(path)  # weights_only; no network is built (no random draw before the stage's seeding)
    weights = state["network"] if isinstance(state.get("network"), dict) else state
    digest = hashlib.sha256()
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().reshape(-1).contiguous()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_flow(preset: str, image_size: int, overrides: dict | None = None) -> torch.nn.Module:
    """``ConditionalGlow.from_preset(preset, image_size=..., **overrides)`` with the preset name checked."""
    check_preset(preset, FLOW_PRESETS, "flow_preset")
    return ConditionalGlow.from_preset(preset, image_size=image_size, **dict(overrides or {}))


def _selected_epoch(folder: Path) -> tuple[int | None, float, Path] | None:
    """``(epoch, val bits/dim, file)`` of the best validated epoch of this run, when its weights are in ``folder``,
    else ``None``.

    The run's newest state checkpoint (:data:`~monai_condflow.engines.flow.FLOW_STATE_PREFIXES`) holds the
    best-validation saver's bookkeeping (``best_checkpoint``): an entry there means ``model.pt`` was written by this
    run's saver (a fresh start's bookkeeping is empty, so a ``model.pt`` of an earlier run never counts). A run from
    before the one naming scheme, resumed at its end, names its ``best_flow_N.pt`` instead: that file is returned
    when ``model.pt`` is missing. No state checkpoint, no entry (no validation set, DP-SGD, no validation yet) or no
    file: ``None``.
    """
    found = find_latest_checkpoint(folder, FLOW_STATE_PREFIXES)
    saved = [] if found is None else list(found[1].get("best_checkpoint", {}).get("_saved", []))
    if not saved:
        return None
    priority, name = saved[-1]
    source = folder / MODEL_FILE
    if not source.is_file():
        source = folder / Path(str(name)).name  # an older run's best_flow_N.pt
        if source.is_symlink() or not source.is_file():
            return None
    step = _STEP_RE.search(str(name))
    return (None if step is None else int(step.group(1))), -float(priority), source


def finish_flow_stage(
    output_dir: str | os.PathLike, flow: torch.nn.Module, info: dict, sampling_prior: dict | None = None
) -> Path:
    """Settle ``flow/model.pt`` and write ``flow/flow.json``.

    ``model.pt`` is kept when this run's best-validation saver wrote it (lowest validation bits/dim; the EMA weights
    when EMA is on); otherwise (no validation set, DP-SGD, no validation run, the file deleted, or a ``model.pt`` of
    an earlier run) ``flow``'s weights (the last epoch) are written there atomically as ``{"network": state_dict}``
    (a run from before the one naming scheme that ended without ``model.pt``: its named ``best_flow_N.pt``).
    ``flow.json`` records ``info``, ``selected`` (``"best validation epoch N"`` or ``"last epoch"``) with
    ``selected_epoch`` and ``best_val_bpd`` for a selected epoch, and ``dp`` with the epsilon spent when
    ``privacy.json`` shows a DP-SGD run.

    With ``sampling_prior`` (``{"dataset", "prepare_batch", "shrinkage", "seed"}``, from ``train_flow.json``'s
    ``sampling_prior_shrinkage``) the settled model's sampling prior is then fitted on the training set
    (:func:`fit_sampling_prior_file`) and ``flow.json`` records the fit under ``sampling_prior``; never for a DP-SGD
    run (the fit would see the private images without noise) or with ``shrinkage`` ``None``.
    """
    folder = Path(output_dir)
    target = folder / MODEL_FILE
    privacy_file = folder / "privacy.json"
    if privacy_file.is_file():
        info = {**info, "dp": json.loads(privacy_file.read_text(encoding="utf-8"))}
    selected = _selected_epoch(folder)
    if selected is not None:
        epoch, val_bpd, source_file = selected
        if source_file != target:
            state = load_checkpoint(source_file)
            atomic_torch_save({"network": state.get("flow", state)}, target)
        source = f"best validation epoch {epoch}"
        info = {**info, "selected_epoch": epoch, "best_val_bpd": val_bpd}
    else:
        atomic_torch_save({"network": unwrap_model(flow).state_dict()}, target)
        source = "last epoch"
    if sampling_prior is not None:
        shrinkage = sampling_prior.get("shrinkage")
        if "dp" in info:
            info = {**info, "sampling_prior": {"fitted": False, "reason": "DP-SGD run: the fit is not private"}}
            logger.info("flow stage: no fitted sampling prior (DP-SGD run)")
        elif shrinkage is not None:
            try:
                fit = fit_sampling_prior_file(
                    target, flow, sampling_prior["dataset"], sampling_prior["prepare_batch"], float(shrinkage),
                    seed=int(sampling_prior.get("seed", 0)),
                )  # fmt: skip
                info = {**info, "sampling_prior": {"fitted": True, **fit}}
            except (ValueError, RuntimeError) as err:  # model.pt stays as trained: sampling uses the standard prior
                logger.warning(
                    "flow stage: the sampling prior could not be fitted (%s); model.pt keeps N(0, T^2 I)", err
                )
                info = {**info, "sampling_prior": {"fitted": False, "reason": f"fit failed: {err}"}}
    write_stage_info(folder, "flow", {**info, "selected": source, "package_version": monai_condflow.__version__})
    logger.info("flow stage: %s -> %s", source, target)
    return target


def fit_sampling_prior_file(
    model_file: Path,
    flow: torch.nn.Module,
    dataset: Any,
    prepare_batch: Any,
    shrinkage: float,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Fit the sampling prior of the flow in ``model_file`` on ``dataset`` and save the file again (atomically).

    Args:
        model_file: a ``{"network": state_dict}`` checkpoint of ``flow``'s architecture.
        flow: the stage's flow (its architecture; a copy on the CPU is loaded with the file's weights).
        dataset: the flow's training dataset (dicts with an image), read in order.
        prepare_batch: the stage's ``ConditionPrepareBatch`` (the conditioning classifier's z).
        shrinkage: covariance shrinkage in ``(0, 1]`` (:meth:`ConditionalGlow.fit_sampling_prior`).
        seed: seed of the training-noise draws.
        batch_size: images per encoding pass.

    Returns:
        The fit's summary plus ``seconds``.
    """
    import copy
    import time

    from monai.data import DataLoader

    t0 = time.perf_counter()
    net = copy.deepcopy(unwrap_model(flow)).cpu().eval()
    state = load_checkpoint(model_file)
    net.load_state_dict(state["network"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)

    def batches() -> Any:
        for batch in loader:
            images, _, args, _ = prepare_batch(batch, torch.device("cpu"))
            yield images, args[0] if args else None

    generator = torch.Generator().manual_seed(seed)
    fit = net.fit_sampling_prior(batches(), shrinkage=shrinkage, noise_generator=generator)
    atomic_torch_save({**state, "network": net.state_dict()}, model_file)
    fit["seconds"] = round(time.perf_counter() - t0, 1)
    logger.info(
        "flow stage: sampling prior fitted on %d training slices (shrinkage %.3g, %.1f s) -> %s",
        int(fit["count"]), shrinkage, fit["seconds"], model_file,
    )  # fmt: skip
    return fit


def _check_trained_flow_ids(output_dir: str | os.PathLike, given: dict[str, Any]) -> bool:
    """``given`` ids (``flow_preset``, ``image_size``, ``flow_overrides``) against those the flow stage trained with
    (``output_dir/flow/flow.json``); True also when the flow stage has not run (its loader names the missing file).

    Raises:
        ConfigValueError: naming the first id that differs, both values and what to pass.
    """
    path = Path(output_dir) / "flow" / "flow.json"
    if not path.is_file():
        return True
    info = read_stage_info(path.parent, "flow", "train_flow.json")
    trained = {"flow_preset": info.get("preset"), "image_size": info.get("image_size"),
               "flow_overrides": dict(info.get("overrides") or {})}  # fmt: skip
    for key, value in given.items():
        if trained[key] is not None and value != trained[key]:
            raise ConfigValueError(
                f"config id '{key}' is {value!r} but the flow in {path.parent} was trained with {trained[key]!r} "
                f"({path.name}): pass --{key} {trained[key]!r}."
            )
    return True


def check_flow_ids(output_dir: str | os.PathLike, preset: object, image_size: object, overrides: object) -> bool:
    """For configs that build the flow from their own ids (``inference.json``: the bundle's ``network_def``): the ids
    ``flow_preset``, ``image_size`` and ``flow_overrides`` must be those the flow stage trained with
    (``output_dir/flow/flow.json``), or the checkpoint cannot be loaded into the network. Returns True (also when
    the flow stage has not run: the checkpoint loader names the missing file).

    Raises:
        ConfigValueError: naming the first id that differs, both values and what to pass.
    """
    # the overrides as flow.json holds them (JSON: tuples become lists)
    overrides = json.loads(json.dumps(dict(overrides or {}), default=str))
    given = {"flow_preset": preset, "image_size": image_size, "flow_overrides": overrides}
    return _check_trained_flow_ids(output_dir, given)


def check_flow_image_size(output_dir: str | os.PathLike, image_size: object) -> bool:
    """For configs that read images for the trained flow (generation, evaluation, counterfactuals, novelty): their
    ``image_size`` must be the flow's, or the classifier embeds images of another size than the flow makes (its
    conditions and the real-vs-synthetic comparisons would no longer match). Returns True, also when the flow stage
    has not run (its loader names the missing file).

    Raises:
        ConfigValueError: naming ``image_size``, both values and what to pass.
    """
    return _check_trained_flow_ids(output_dir, {"image_size": image_size})


def check_run_images(output_dir: str | os.PathLike, stages: Sequence[str] = ("classifier", "flow"), **ids: Any) -> bool:
    """The ids that make a run's images (``image_size``, ``intensity``, ``hu_window``, ``crop``) must be those its
    trained stages recorded (``<stage>/run_settings.json``): a flow trained on images windowed otherwise than its
    frozen classifier's, or synthetic images conditioned on embeddings of differently made images, are wrong without
    an error. Returns True (also for a stage that has not run, or that recorded none of them).

    Args:
        output_dir: the run's folder.
        stages: the stage folders to compare with.
        ids: the config's values, by id.

    Raises:
        ConfigValueError: naming the first id that differs, the stage, both values and what to pass.
        RunSettingsError: a stage's settings file cannot be read.
    """
    found = recorded_difference(output_dir, stages, ids)
    if found is not None:
        stage, folder, key, value, recorded = found
        shown = json.dumps(recorded[key])
        hint = f'"{shown}"' if isinstance(recorded[key], list) else str(recorded[key])
        raise ConfigValueError(
            f"config id '{key}' is {value!r} but the {stage} in {folder} was trained on images made with "
            f"{shown} ({SETTINGS_NAME}); every stage of a run must read its images alike: pass --{key} {hint}, "
            f"or train the {stage} again."
        )
    return True


def check_flow_classifier(output_dir: str | os.PathLike) -> bool:
    """The run's classifier must be the one its flow was trained on: the flow's conditions are that classifier's
    embeddings, so with another classifier its images would not keep their class. Compares the fingerprint the flow
    stage recorded (``flow/run_settings.json``, setting ``classifier``) with :func:`classifier_fingerprint` of
    ``classifier/model.pt``. Returns True, also when there is nothing to compare (no recorded fingerprint: a flow
    folder from before the fingerprint was recorded, or a stage not run yet, whose loader names the missing file).

    Raises:
        RunSettingsError: the classifier was replaced (e.g. trained again) after the flow was trained; the message
            names both folders and what to do.
    """
    flow_dir = Path(output_dir) / "flow"
    path = flow_dir / SETTINGS_NAME
    recorded = read_run_settings(flow_dir, "stage").get("classifier")
    if recorded is None:
        return True
    current = classifier_fingerprint(output_dir)
    if current is not None and current != recorded:
        raise RunSettingsError(
            f"the classifier in {Path(output_dir) / 'classifier'} (weights {current}) is not the one the flow in "
            f"{flow_dir} was trained on (weights {recorded}, setting 'classifier' of {path.name}): the flow is "
            "conditioned on that classifier's embeddings, so its images would not keep their class. Train the flow "
            "again on this classifier (train_flow.json with --fresh True), or put back the classifier it was "
            "trained on."
        )
    return True


def load_flow(
    output_dir: str | os.PathLike, device: str | torch.device = "cpu", check_classifier: bool = True
) -> torch.nn.Module:
    """The trained flow of a run (``output_dir/flow/model.pt``), in eval mode.

    Args:
        output_dir: the run's folder.
        device: where the flow goes.
        check_classifier: refuse a flow trained on another classifier than the run's
            (:func:`check_flow_classifier`).

    Raises:
        FileNotFoundError: when the flow stage has not run (the message says to run train_flow.json).
        RunSettingsError: the run's classifier is not the one the flow was trained on.
    """
    if check_classifier:
        check_flow_classifier(output_dir)
    return load_flow_folder(Path(output_dir) / "flow", device)


def load_flow_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained flow of a flow-stage folder (``model.pt`` and ``flow.json``, e.g. a background flow trained with
    ``train_flow.json`` and ``flow_dir`` set to another folder), in eval mode.

    Raises:
        FileNotFoundError: the folder holds no finished flow stage (the message names the missing file).
    """
    folder = Path(folder)
    info = read_stage_info(folder, "flow", "train_flow.json")
    path = require_file(folder / MODEL_FILE, "flow checkpoint", "train_flow.json")
    flow = build_flow(info["preset"], int(info["image_size"]), info.get("overrides"))
    state = load_checkpoint(path)
    flow.load_state_dict(state["network"])
    return flow.to(device).eval()


def model_version(output_dir: str | os.PathLike) -> str:
    """``monai_condflow <version> / flow <preset> / <checkpoint selected>``: what the manifest records."""
    info = read_stage_info(Path(output_dir) / "flow", "flow", "train_flow.json")
    return f"monai_condflow {monai_condflow.__version__} / flow {info['preset']} / {info.get('selected', '?')}"


def stage_dp(output_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The DP-SGD record (``dp``) of ``<stage>/<stage>.json``; ``None`` when the stage trained without DP-SGD or has
    not run."""
    path = Path(output_dir) / stage / f"{stage}.json"
    return (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}).get("dp")


def privacy_spent(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The DP-SGD privacy a run spent, from ``classifier/classifier.json`` and ``flow/flow.json``.

    The two stages read the same private training set, so their epsilons (and deltas) add up under basic
    composition: ``epsilon = classifier + flow``. A stage trained without DP-SGD makes the total unbounded; a
    classifier trained on public data only (:func:`monai_condflow.privacy.public.install_public_classifier`) spends 0.

    Returns:
        ``None`` when neither stage used DP-SGD, else ``{"epsilon", "delta", "classifier", "flow", "covers",
        "label"}``; when only one stage did, ``epsilon`` is ``None`` (no finite guarantee for the released model)
        and ``covers`` / ``label`` say which stage is private. ``label`` is the short text of the manifest.
    """
    spent: dict[str, Any] = {stage: stage_dp(output_dir, stage) for stage in ("classifier", "flow")}
    if spent["classifier"] is None and spent["flow"] is None:
        return None
    private = [s for s in ("classifier", "flow") if spent[s] is not None]
    if len(private) == 2:
        eps = float(spent["classifier"]["epsilon"]) + float(spent["flow"]["epsilon"])
        delta = float(spent["classifier"]["delta"]) + float(spent["flow"]["delta"])
        covers = "classifier and flow trained with DP-SGD; epsilons and deltas added (basic composition)"
        if spent["classifier"].get("public"):
            covers = "flow trained with DP-SGD; the conditioning classifier was trained on public data only (epsilon 0)"
    else:
        eps = None
        delta = float(spent[private[0]]["delta"])
        other = "flow" if private[0] == "classifier" else "conditioning classifier"
        covers = (
            f"only the {private[0]} was trained with DP-SGD (epsilon {float(spent[private[0]]['epsilon']):.4g}); "
            f"the {other} was not, so the released generator has no finite guarantee on this data"
        )
    label = f"{eps:.4g}" if eps is not None else f"{private[0]} only: {float(spent[private[0]]['epsilon']):.4g}"
    return {
        "epsilon": eps,
        "delta": delta,
        "classifier": spent["classifier"],
        "flow": spent["flow"],
        "covers": covers,
        "label": label,
    }


def warn_non_private_classifier(output_dir: str | os.PathLike) -> bool:
    """Before a DP-SGD flow trains: warn when the frozen conditioning classifier (``classifier/classifier.json``) was
    trained on the private data without DP-SGD, so that the released pair has no finite guarantee (the warning
    ``privacy.json`` / ``metrics.json`` give after the run, said before it spends the training time). A classifier
    trained with DP-SGD, or on public data only, passes silently.

    Returns:
        ``True`` (bundle configs chain it).
    """
    path = Path(output_dir) / "classifier" / "classifier.json"
    if stage_dp(output_dir, "classifier") is None:
        logger.warning(
            "the conditioning classifier in %s was trained without DP-SGD: every z it computes leaks the private "
            "images, so the DP-SGD flow trained now is released with no finite privacy guarantee on this data "
            "(privacy_spent: epsilon None). Train the classifier with train_classifier_dp.json (or on public data: "
            "public_classifier.json) first; docs/privacy.md, 'What the (epsilon, delta) covers'.",
            path.parent,
        )
    return True


def privacy_noise(output_dir: str | os.PathLike) -> str | None:
    """Where the DP-SGD noise of a run's private stages came from, for the manifest's ``dp_noise`` column.

    Returns:
        ``None`` when no stage used DP-SGD; else the ``noise`` key of the stages' ``dp`` records (``"os_entropy"``,
        ``"secure_mode"``, ``"caller_generator"``; ``"unknown"`` for a stage trained before it was recorded), one
        value when the private stages agree, else ``"classifier: ...; flow: ..."``.
    """
    spent = privacy_spent(output_dir)
    if spent is None:
        return None
    noise = {
        stage: str(spent[stage].get("noise", "unknown"))
        for stage in ("classifier", "flow")
        if spent[stage] is not None and not spent[stage].get("public")
    }
    if len(set(noise.values())) == 1:
        return next(iter(noise.values()))
    return "; ".join(f"{stage}: {value}" for stage, value in noise.items())
