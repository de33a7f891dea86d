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
"""Bundle smoke tests: every config runs through MONAI's ConfigWorkflow on a tiny phantom dataset, the metadata and
the network verify, the multi-GPU overlays run under torchrun with 2 gloo processes, bad values stop with the id."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from monai_condflow.data.phantom import generate_phantom_dataset
from monai_condflow.engines.config_checks import ConfigValueError
from monai_condflow.evaluation.report import read_tensorboard_scalars

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
TINY = {
    "image_size": 32,
    "batch_size": 16,
    "max_epochs": 1,
    "num_workers": 0,
    "device": "cpu",
}
TINY_FLOW = {
    "flow_overrides": {"num_levels": 2, "num_steps": 2, "num_blocks": 1, "hidden_channels": 8},
    "adversarial_steps": 2,
    "sample_every": 1,
}


def _workflow(files: list[str], workflow_type: str | None = None, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ["common.json", *files]],
        meta_file=META,
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    return wf


def _run(files: list[str], **overrides) -> ConfigWorkflow:
    wf = _workflow(files, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _refusal(wf: ConfigWorkflow, error: type, run: bool = False) -> BaseException:
    """The ``error`` behind the failure of ``wf.initialize()`` (and ``wf.run()`` with ``run``): MONAI wraps what a
    config expression raises in ``RuntimeError``."""
    with pytest.raises(Exception) as info:
        wf.initialize()
        if run:
            wf.run()
    cause = _root_cause(info.value)
    assert isinstance(cause, error), repr(cause)
    return cause


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(root, num_images=240, seed=3, image_size=128, slices_per_patient=6, overwrite=True)
    return root


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory) -> Path:
    """Classifier (semi-supervised, 20 labels) -> flow -> generation -> evaluation through the bundle configs."""
    out = tmp_path_factory.mktemp("run")
    common = {**TINY, "dataset_dir": str(dataset), "output_dir": str(out)}
    train = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ("common.json", "train_classifier.json", "train_semisupervised.json")],
        meta_file=META,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        **common,
        num_labels=20,
        max_rounds=1,
    )
    train.initialize()
    assert train.check_properties() == []
    train.run()
    train.finalize()
    # a fitted sampling prior (off by default) belongs to the likelihood weights: no adversarial phase here
    _run(["train_flow.json"], **common, **{**TINY_FLOW, "adversarial_steps": 0}, sampling_prior_shrinkage=0.3)
    _run(["generate.json"], **common, formats=["png"])
    _run(["train_acgan.json"], **common)
    _run(["evaluate.json"], **common, n_bootstrap=5, n_synthetic_sets=1, augmentation=False)
    return out


def test_stages_write_their_outputs(trained_run: Path):
    cls = json.loads((trained_run / "classifier" / "classifier.json").read_text())
    assert cls["semisupervised"] and cls["num_classes"] == 2 and len(cls["rounds"]) >= 1
    labels = json.loads((trained_run / "classifier" / "train_labels.json").read_text())
    assert sum(not e["presumptive"] for e in labels) == 20
    projector = list((trained_run / "tensorboard" / "projector").rglob("projector_config.pbtxt"))
    assert projector and "z_unlabelled" in projector[0].read_text()
    assert (trained_run / "flow" / "model.pt").is_file()
    flow_info = json.loads((trained_run / "flow" / "flow.json").read_text())
    assert flow_info["preset"] == "small"
    assert flow_info["sampling_prior"]["fitted"] and flow_info["sampling_prior"]["shrinkage"] == 0.3
    assert flow_info["sampling_prior"]["count"] == len(
        json.loads((trained_run / "classifier" / "train_labels.json").read_text())
    )  # every flow-training slice
    assert list((trained_run / "flow" / "samples").glob("*.png"))
    manifest = (trained_run / "synthetic" / "manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("index,file,class,class_name,") and len(manifest) == len(labels) + 1
    # the class map's names (binary: non-COVID / COVID-19) beside each id
    rows = list(csv.DictReader(io.StringIO("\n".join(manifest))))
    names = ["non-COVID", "COVID-19"]
    assert {(r["class"], r["class_name"]) for r in rows} == {(str(e["label"]), names[e["label"]]) for e in labels}
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("trtr", "tstr"):
        assert set(metrics[key]) >= {"accuracy", "f1", "precision", "recall"}
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0
    assert metrics["fid"] >= 0.0
    assert set(metrics["baseline"]) >= {"trtr", "tstr", "fid"}
    assert set(metrics["baseline"]["tstr"]) >= {"accuracy", "f1", "precision", "recall"}
    assert (trained_run / "report.md").read_text().count("TSTR") >= 1
    # pre-clamp overflow counts from the generation and evaluation stages; issue 14: headline, presumptive labels
    generation = json.loads((trained_run / "synthetic" / "generation.json").read_text())
    assert generation["samples"]["n_images"] == len(labels) and generation["samples"]["range"] == [-0.25, 1.25]
    assert metrics["samples"]["n_images"] == len(labels) and metrics["samples"]["counted_on"] == "flow"
    assert metrics["samples"]["sampling_prior"] == {"kind": "fitted", "shrinkage": pytest.approx(0.3)}
    assert 0 <= metrics["samples"]["images_with_overflow"] <= len(labels)
    assert metrics["presumptive_labels"]["n_compared"] == len(labels) - 20
    assert 0.0 <= metrics["presumptive_accuracy"] <= 1.0
    assert metrics["headline"]["presumptive_accuracy"] == metrics["presumptive_accuracy"]
    assert (trained_run / "report.md").read_text().startswith("# monai_condflow evaluation\n\n## Headline")
    # how the flow was trained is in metrics.json and the report (this fixture: no adversarial phase)
    assert metrics["flow_training"] == {
        "selected": flow_info["selected"], "stopped_epoch": 1, "max_epochs": 1, "adversarial_steps": 0
    }
    assert f"| flow training | likelihood epochs: 1 of 1; model: {flow_info['selected']} |" in (
        trained_run / "report.md"
    ).read_text()
    # nothing next to the synthetic images names a source file or patient
    for path in (trained_run / "synthetic").iterdir():
        assert "phantom_p" not in path.name
    assert "phantom_p" not in (trained_run / "synthetic" / "manifest.csv").read_text()


def test_flow_train_workflow_properties(dataset, trained_run):
    wf = _workflow(
        ["train_flow.json"],
        workflow_type="train",
        dataset_dir=str(dataset),
        output_dir=str(trained_run),
        **TINY,
        **{**TINY_FLOW, "adversarial_steps": 0},  # the settings the trained run recorded
    )
    wf.initialize()
    assert wf.check_properties() == []


def test_train_shift_moves_flow_training_images_by_whole_pixels(dataset, trained_run):
    """``train_shift`` 0 leaves the flow's training chain as it was; N > 0 (default 1, thirty-sixth session) appends
    a random translation of up to N whole pixels (nearest neighbour: no interpolation blur, edges replicated) on 80 %
    of reads; the value is one of the run's recorded settings."""
    from monai.transforms import RandAffined

    common = {**TINY, "dataset_dir": str(dataset), "output_dir": str(trained_run), **TINY_FLOW}
    parser = _workflow(["train_flow.json"], **common, train_shift=0).parser
    assert parser.get_parsed_content("train#dataset").transform is parser.get_parsed_content("train#preprocessing")
    assert parser.get_parsed_content("run_settings")["train_shift"] == 0
    image = torch.arange(24 * 24, dtype=torch.float32).reshape(1, 24, 24) / 576
    for value in (None, 2):  # None: the default, 1
        limit = value or 1
        parser = _workflow(["train_flow.json"], **common, **({} if value is None else {"train_shift": value})).parser
        assert parser.get_parsed_content("run_settings")["train_shift"] == limit
        shift = parser.get_parsed_content("train#dataset").transform.transforms[-1]
        assert isinstance(shift, RandAffined) and shift.prob == pytest.approx(0.8)
        seen = set()
        for seed in range(12):
            shift.set_random_state(seed=seed)
            out = torch.as_tensor(shift({"image": image.clone()})["image"])
            inner = out[:, 4:-4, 4:-4]
            moved = [(dy, dx) for dy in range(-limit, limit + 1) for dx in range(-limit, limit + 1)
                     if torch.equal(inner, torch.roll(image, (dy, dx), dims=(1, 2))[:, 4:-4, 4:-4])]  # fmt: skip
            assert len(moved) == 1, f"seed {seed}: not a whole-pixel shift of at most {limit}"
            seen.add(moved[0])
        assert len(seen) > 2 and (0, 0) in seen  # several shifts, and some reads unshifted
        assert max(max(abs(dy), abs(dx)) for dy, dx in seen) == limit  # the largest shift is reached


def test_the_adversarial_phase_reads_batches_of_its_own_size(dataset, trained_run):
    common = {**TINY, "dataset_dir": str(dataset), "output_dir": str(trained_run), **TINY_FLOW}
    parser = _workflow(["train_flow.json"], **common, adversarial_batch_size=4).parser
    loader = parser.get_parsed_content("adversarial#dataloader")
    assert loader.batch_size == 4 and parser.get_parsed_content("train#dataloader").batch_size == TINY["batch_size"]
    assert next(iter(loader))["image"].shape[0] == 4
    parser = _workflow(["train_flow.json"], **{**common, "batch_size": 8}).parser  # default: 16, not the epochs'
    assert parser.get_parsed_content("adversarial#dataloader").batch_size == 16
    assert parser.get_parsed_content("train#dataloader").batch_size == 8
    # the critic: the high-pass channel and lr 4e-4 by default (docs/results.md, nineteenth session); the ids give
    # the plain critic of the twelfth session
    assert parser.get_parsed_content("adversarial#discriminator").high_pass is True
    assert parser.get_parsed_content("adversarial#discriminator").features[0].in_channels == 2
    assert parser.get_parsed_content("adversarial#d_optimizer").param_groups[0]["lr"] == pytest.approx(4e-4)
    parser = _workflow(["train_flow.json"], **common, discriminator_high_pass=False, discriminator_lr=2e-4).parser
    assert parser.get_parsed_content("adversarial#discriminator").high_pass is False
    assert parser.get_parsed_content("adversarial#discriminator").features[0].in_channels == 1
    assert parser.get_parsed_content("adversarial#d_optimizer").param_groups[0]["lr"] == pytest.approx(2e-4)
    # the likelihood term on every k-th step of the phase (default: every second step)
    phase = {**common, "adversarial_steps": 2}
    parser = _workflow(["train_flow.json"], **phase).parser
    assert parser.get_parsed_content("adversarial#trainer").likelihood_every == 2
    parser = _workflow(["train_flow.json"], **phase, adversarial_likelihood_every=1).parser
    assert parser.get_parsed_content("adversarial#trainer").likelihood_every == 1
    # the spectral term: weight 1 by default (thirty-fifth session); the id reaches the trainer and the settings
    assert parser.get_parsed_content("adversarial#trainer").spectral_weight == 1.0
    parser = _workflow(["train_flow.json"], **phase, spectral_weight=2.0).parser
    assert parser.get_parsed_content("adversarial#trainer").spectral_weight == 2.0
    assert parser.get_parsed_content("run_settings")["spectral_weight"] == 2.0
    parser = _workflow(["train_flow.json"], **{**common, "adversarial_steps": 0}).parser
    assert parser.get_parsed_content("adversarial#dataloader") is None
    parser = _workflow(["train_flow.json"], **common, adversarial_batch_size=100_000).parser
    with pytest.raises(Exception) as info:  # the config parser wraps the loader's ValueError
        parser.get_parsed_content("adversarial#dataloader")
    assert "'adversarial_batch_size' to at most" in str(info.value) + str(info.value.__cause__)


def test_inference_config_samples_images_from_a_trained_run(trained_run: Path, dataset: Path):
    """``inference.json`` through ``monai.bundle run``: the trained flow (``network_def``) writes PNG samples."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps([str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")]),
           "--meta_file", META, "--bundle_root", str(BUNDLE), "--dataset_dir", str(dataset),
           "--output_dir", str(trained_run), "--image_size", str(TINY["image_size"]), "--device", "cpu",
           "--num_samples", "5", "--batch_size", "2",
           "--flow_overrides", repr(TINY_FLOW["flow_overrides"])]  # fmt: skip
    # an earlier run's samples (a higher index than this run writes) go; the user's other files stay
    (trained_run / "inference").mkdir(exist_ok=True)
    (trained_run / "inference" / "7_synthetic.png").write_bytes(b"earlier run")
    (trained_run / "inference" / "notes_synthetic.png").write_bytes(b"the user's")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed 1 samples of an earlier run" in proc.stdout + proc.stderr
    assert (trained_run / "inference" / "notes_synthetic.png").read_bytes() == b"the user's"
    (trained_run / "inference" / "notes_synthetic.png").unlink()
    images = sorted((trained_run / "inference").glob("*.png"))
    assert len(images) == 5 and not (trained_run / "inference" / "7_synthetic.png").exists()
    from PIL import Image

    with Image.open(images[0]) as img:
        assert img.size == (TINY["image_size"], TINY["image_size"])
    assert not any("phantom_p" in p.name for p in images)  # no source file or patient in the names
    # the PNGs are the samples as they are (MONAI's PNG writer swapped rows and columns: bodies lay on their side)
    wf = _workflow(["inference.json"], **{**TINY, "batch_size": 2}, dataset_dir=str(dataset),
                   output_dir=str(trained_run), flow_overrides=TINY_FLOW["flow_overrides"], num_samples=2)  # fmt: skip
    wf.initialize()
    wf.run()
    for i, item in enumerate(wf.parser.get_parsed_content("evaluator").state.output):  # written 0_, 1_ (no meta)
        pred = np.asarray(item["pred"])[0]
        with Image.open(trained_run / "inference" / f"{i}_synthetic.png") as img:
            written = np.asarray(img, dtype=np.float64) / 255
        assert np.abs(written - pred).max() <= 1 / 255 + 1e-6
        assert np.abs(written - pred.T).max() > 0.05  # not its transpose
    wf.finalize()
    # more samples than validation slices (each takes the z of one) is refused by name, not cut short silently
    n_val = len(wf.parser.get_parsed_content("records#val"))
    big = _workflow(["inference.json"], **{**TINY, "batch_size": 2}, dataset_dir=str(dataset),
                    output_dir=str(trained_run), flow_overrides=TINY_FLOW["flow_overrides"], num_samples=n_val + 1)
    cause = _refusal(big, ConfigValueError)  # fmt: skip
    assert f"'num_samples' is {n_val + 1}, but the validation split has {n_val} slices" in str(cause)
    assert len(list((trained_run / "inference").glob("*.png"))) == 2  # the last run's; a refused run removes nothing


@pytest.mark.parametrize("key, value", [("flow_preset", "paper"), ("image_size", 64), ("flow_overrides", {})])
def test_inference_config_names_a_network_id_that_differs_from_the_trained_flow(trained_run, dataset, key, value):
    """``inference.json`` builds its network from its ids: one that differs from the flow stage's (``flow.json``) is
    named with the value to pass, instead of a raw state-dict error from the checkpoint loader."""
    ids = {**TINY, "flow_overrides": TINY_FLOW["flow_overrides"], key: value}
    cause = _refusal(_workflow(["inference.json"], dataset_dir=str(dataset), output_dir=str(trained_run), **ids),
                     ConfigValueError)  # fmt: skip
    assert f"config id '{key}' is {value!r}" in str(cause)
    assert f"pass --{key} " in str(cause)
    # the ids of the trained flow pass the check (tuples in the overrides compare as flow.json's lists)
    wf = _workflow(["inference.json"], dataset_dir=str(dataset), output_dir=str(trained_run),
                   **{**TINY, "flow_overrides": {**TINY_FLOW["flow_overrides"]}})  # fmt: skip
    wf.initialize()


def test_classifier_inference_config_scores_the_test_split(trained_run: Path, dataset: Path):
    """``inference_classifier.json``: the trained classifier (``network_def``) on the test split, metrics written."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps([str(CONFIGS / "common.json"), str(CONFIGS / "inference_classifier.json")]),
           "--meta_file", str(CONFIGS / "metadata_classifier.json"), "--bundle_root", str(BUNDLE),
           "--dataset_dir", str(dataset), "--output_dir", str(trained_run),
           "--image_size", str(TINY["image_size"]), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((trained_run / "classifier" / "test_metrics.json").read_text())
    assert set(scores) == {"test_accuracy", "test_macro_f1"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_every_stage_logs_under_tensorboard_and_the_report_draws_the_flow_curves(trained_run: Path):
    """The flow stage writes beside the classifier under ``OUTPUT_DIR/tensorboard/<stage>``, where the report looks."""
    runs = read_tensorboard_scalars(trained_run / "tensorboard")
    assert {"classifier", "classifier/label_propagation", "flow"} <= set(runs)
    assert "val_bpd" in runs["flow"] and "val_macro_f1" in runs["classifier"]
    assert not (trained_run / "flow" / "tensorboard").exists()
    report = (trained_run / "report.md").read_text()
    assert "figures/curve_flow_val_bpd.png" in report and (trained_run / "figures" / "curve_flow_val_bpd.png").is_file()


@pytest.mark.parametrize(
    "meta_file, config_file",
    [
        (META, "inference.json"),
        (str(CONFIGS / "metadata_classifier.json"), "train_classifier.json"),
        (str(CONFIGS / "metadata_classifier.json"), "inference_classifier.json"),
    ],
)
def test_verify_metadata_and_network(meta_file: str, config_file: str):
    """One network per metadata file: the flow sampler of inference.json, the classifier of train_classifier.json.
    MONAI's ``verify_metadata`` / ``verify_net_in_out`` (what ``python -m monai.bundle verify_...`` calls) raise on
    a metadata file the schema refuses or a network whose input / output shapes differ from its metadata."""
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=meta_file, filepath=str(BUNDLE / "docs" / "metadata_schema.json"))
    verify_net_in_out("network_def", meta_file=meta_file, bundle_root=str(BUNDLE), device="cpu",
                      config_file=[str(CONFIGS / "common.json"), str(CONFIGS / config_file)])  # fmt: skip


@pytest.mark.parametrize("overrides, expected", [({}, "onecycle"), ({"schedule": "exponential"}, "exponential")])
def test_evaluation_classifiers_train_with_the_configs_schedule(trained_run, dataset, monkeypatch, overrides, expected):
    """``evaluate.json``'s ``schedule`` (default one-cycle) and ``lr`` reach every evaluation classifier's training."""
    import monai_condflow.evaluation.report as report

    seen = {}
    monkeypatch.setattr(report, "run_evaluation", lambda *args, **kwargs: seen.update(kwargs))
    _run(["evaluate.json"], **TINY, dataset_dir=str(dataset), output_dir=str(trained_run), lr=0.004, **overrides)
    assert seen["train_kwargs"] == {
        "max_epochs": 1, "lr": 0.004, "batch_size": 16, "schedule": expected, "transform": None
    }  # fmt: skip


def test_train_augmentation_gives_every_evaluation_classifier_the_classifier_stages_augmentation(
    trained_run, dataset, monkeypatch
):
    """``train_augmentation True`` hands the config's ``classifier_augmentation`` chain (random affine, intensity
    scale and shift: the classifier stage's) to the evaluation classifiers' training; it changes a training image."""
    from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

    import monai_condflow.evaluation.report as report

    seen = {}
    monkeypatch.setattr(report, "run_evaluation", lambda *args, **kwargs: seen.update(kwargs))
    _run(["evaluate.json"], **TINY, dataset_dir=str(dataset), output_dir=str(trained_run), train_augmentation=True)
    chain = seen["train_kwargs"]["transform"]
    assert isinstance(chain, Compose)
    assert [type(t) for t in chain.transforms] == [RandAffined, RandScaleIntensityd, RandShiftIntensityd]
    chain.set_random_state(seed=0)
    image = torch.rand(1, 16, 16)
    out = chain({"image": image.clone(), "label": 1})
    assert out["label"] == 1 and tuple(out["image"].shape) == (1, 16, 16)
    assert not torch.allclose(torch.as_tensor(out["image"]), image)


@pytest.mark.parametrize("overrides, expected", [({}, [0.0, 0.5, 1.0]), ({"augmentation_fractions": [0, 1]}, [0, 1])])
def test_augmentation_fractions_reach_the_evaluation(trained_run, dataset, monkeypatch, overrides, expected):
    """``evaluate.json``'s ``augmentation_fractions`` (default 0, 0.5, 1: one training fewer than the library's
    0 / 0.25 / 0.5 / 1) is what the augmentation study gets."""
    import monai_condflow.evaluation.report as report

    seen = {}
    monkeypatch.setattr(report, "run_evaluation", lambda *args, **kwargs: seen.update(kwargs))
    _run(["evaluate.json"], **TINY, dataset_dir=str(dataset), output_dir=str(trained_run), **overrides)
    assert list(seen["augmentation_fractions"]) == expected


@pytest.mark.parametrize(
    "files, overrides, error, text",
    [
        (["train_classifier.json"], {"max_epochs": -1}, ConfigValueError, "'max_epochs'"),
        (["train_classifier.json"], {"max_epochs": 0}, ConfigValueError, "'max_epochs'"),
        (["train_classifier.json"], {"image_size": 60}, ConfigValueError, "'image_size'"),
        (["train_flow.json"], {"flow_preset": "huge"}, ConfigValueError, "'flow_preset'"),
        (["train_flow.json"], {"sampling_prior_shrinkage": 1.5}, ConfigValueError, "'sampling_prior_shrinkage'"),
        (["train_flow.json"], {"adversarial_batch_size": 0}, ConfigValueError, "'adversarial_batch_size'"),
        (["train_flow.json"], {"discriminator_high_pass": "no"}, ConfigValueError, "'discriminator_high_pass'"),
        (["train_flow.json"], {"adversarial_likelihood_every": 0}, ConfigValueError, "'adversarial_likelihood_every'"),
        (["train_flow.json"], {"spectral_weight": -1.0}, ConfigValueError, "'spectral_weight'"),
        (["train_flow.json"], {"train_shift": -1}, ConfigValueError, "'train_shift'"),
        (["train_flow.json"], {"train_shift": 1.5}, ConfigValueError, "'train_shift'"),
        (["generate.json"], {"temperature": 0.0}, ConfigValueError, "'temperature'"),
        (["counterfactual.json"], {"counterfactual_limit": 0}, ConfigValueError, "'counterfactual_limit'"),
        (["inference.json"], {"num_samples": 0}, ConfigValueError, "'num_samples'"),
        (["train_classifier.json"], {"hu_window": [-600, 0]}, ConfigValueError, "'hu_window'"),
        (["train_flow.json"], {"intensity": "png"}, ConfigValueError, "'intensity'"),
        (["generate.json"], {"crop": "lungs"}, ConfigValueError, "'crop'"),
        (["generate.json"], {"n_per_class": 3}, ConfigValueError, "'n_per_class' is 3 but 'mode' is 'same_z'"),
        (["generate.json"], {"mode": "n_per_class"}, ConfigValueError, "'n_per_class' must be an integer >= 1"),
        (["evaluate.json"], {"schedule": "cosine"}, ConfigValueError, "'schedule'"),
        (["evaluate.json"], {"augmentation_fractions": [0.5, -0.25]}, ConfigValueError, "'augmentation_fractions'"),
        (["evaluate.json"], {"augmentation_fractions": []}, ConfigValueError, "'augmentation_fractions'"),
        (["evaluate.json"], {"augmentation_fractions": 0.5}, ConfigValueError, "'augmentation_fractions'"),
        (["evaluate.json"], {"train_augmentation": "false"}, ConfigValueError, "'train_augmentation'"),
        (["evaluate.json"], {"n_judges": 0}, ConfigValueError, "'n_judges'"),
        (["evaluate.json"], {"n_judges": 1.5}, ConfigValueError, "'n_judges'"),
        (["evaluate.json"], {"n_synthetic_sets": 0}, ConfigValueError, "'n_synthetic_sets'"),
        (["train_flow.json"], {"deterministic": "false"}, ConfigValueError, "'deterministic'"),
        (["generate.json"], {"deterministic": 0}, ConfigValueError, "'deterministic'"),
        # the text "false" of `python -m monai.bundle run --privacy_audit false` read as on before: refused by name
        (["evaluate.json"], {"privacy_audit": "false"}, ConfigValueError, "write --privacy_audit False"),
        (["evaluate.json"], {"augmentation": "false"}, ConfigValueError, "'augmentation'"),
        (["generate.json"], {"progress": "false"}, ConfigValueError, "'progress'"),
        (["train_classifier.json"], {"fresh": "true"}, ConfigValueError, "write --fresh True"),
        (["train_flow.json"], {"cuda_graphs": "false"}, ConfigValueError, "'cuda_graphs'"),
        (["train_acgan.json"], {"deterministic": "false"}, ConfigValueError, "'deterministic'"),
    ],
)
def test_bad_config_values_name_the_id(dataset, tmp_path, files, overrides, error, text):
    wf = _workflow(files, dataset_dir=str(dataset), output_dir=str(tmp_path), **overrides)
    assert text in str(_refusal(wf, error))


def test_the_flow_stage_records_its_classifier_and_refuses_a_flow_folder_of_another_one(trained_run, dataset,
                                                                                       tmp_path):
    """The flow's settings name the classifier whose embeddings it was trained on (a fingerprint of its weights):
    after the classifier is trained again, a flow rerun into the same folder is refused with the setting named,
    instead of resuming checkpoints of the old embeddings. A re-save of the same weights keeps the fingerprint."""
    from monai_condflow.engines.run_folder import RunSettingsError, close_run_folder
    from monai_condflow.engines.stages import classifier_fingerprint
    from monai_condflow.handlers.checkpoint import load_checkpoint

    print_ = classifier_fingerprint(trained_run)
    assert len(print_) == 16 and print_ == classifier_fingerprint(trained_run)
    recorded = json.loads((trained_run / "flow" / "run_settings.json").read_text())
    assert recorded["stage"]["classifier"] == print_
    assert classifier_fingerprint(tmp_path) is None  # no classifier stage yet
    run = tmp_path / "run"
    shutil.copytree(trained_run / "classifier", run / "classifier")
    shutil.copytree(trained_run / "flow", run / "flow")
    state = load_checkpoint(run / "classifier" / "model.pt")
    weights = state.get("network", state)
    torch.save({k: v.clone() for k, v in weights.items()}, run / "classifier" / "model.pt")  # other container
    assert classifier_fingerprint(run) == print_
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name] = weights[name] + 1e-3
    torch.save({"network": weights}, run / "classifier" / "model.pt")
    assert classifier_fingerprint(run) not in (None, print_)
    wf = _workflow(["train_flow.json"], **TINY, **{**TINY_FLOW, "adversarial_steps": 0}, sampling_prior_shrinkage=0.3,
                   dataset_dir=str(dataset), output_dir=str(run))  # fmt: skip
    assert f"'classifier' was '{print_}'" in str(_refusal(wf, RunSettingsError))
    close_run_folder(run / "flow")
    # the stages that condition the trained flow on the classifier refuse it too, naming both fingerprints
    changed = classifier_fingerprint(run)
    for files in (["generate.json"], ["inference.json"]):
        wf = _workflow(files, **TINY, dataset_dir=str(dataset), output_dir=str(run),
                       flow_overrides=TINY_FLOW["flow_overrides"])  # fmt: skip
        text = str(_refusal(wf, RunSettingsError, run=True))
        assert f"(weights {changed}) is not the one the flow" in text and f"(weights {print_}" in text, text
    assert not (run / "synthetic").exists()
    from monai_condflow.engines.stages import check_flow_classifier

    shutil.copy2(trained_run / "classifier" / "model.pt", run / "classifier" / "model.pt")
    assert check_flow_classifier(run)  # its own classifier back: accepted


@pytest.mark.parametrize("config", ["generate.json", "evaluate.json", "counterfactual.json", "novelty.json"])
def test_stages_that_read_images_for_the_flow_refuse_another_image_size(trained_run, config):
    """Generating (or evaluating) with the default 64 px for a flow trained at 32 px conditioned the flow on
    embeddings of 64-px images (generation wrote them without a word; the evaluation failed late on a shape)."""
    wf = _workflow([config], **{**TINY, "image_size": 64}, output_dir=str(trained_run))
    text = str(_refusal(wf, ConfigValueError))
    assert "'image_size' is 64 but the flow in" in text and "pass --image_size 32" in text


def test_the_preprocessing_ids_are_recorded_and_a_flow_rerun_with_another_window_is_refused(trained_run, dataset,
                                                                                             tmp_path):
    """``intensity``, ``hu_window`` and ``crop`` make the images every checkpoint was trained on: recorded with the
    settings of the classifier and the flow, so a rerun with another HU window is refused instead of resumed."""
    from monai_condflow.engines.run_folder import RunSettingsError, close_run_folder

    for stage in ("classifier", "flow"):
        recorded = json.loads((trained_run / stage / "run_settings.json").read_text())["stage"]
        assert (recorded["intensity"], recorded["hu_window"], recorded["crop"]) == ("auto", [-600, 1500], "box_or_auto")
    run = tmp_path / "run"
    shutil.copytree(trained_run / "classifier", run / "classifier")
    shutil.copytree(trained_run / "flow", run / "flow")
    wf = _workflow(["train_flow.json"], **TINY, **TINY_FLOW, dataset_dir=str(dataset), output_dir=str(run),
                   hu_window=[40, 400])  # fmt: skip
    # refused before the flow folder is opened: the frozen classifier's images were made with the other window
    assert "'hu_window' is [40, 400] but the classifier in" in str(_refusal(wf, ConfigValueError))
    # the flow folder's own settings refuse it too (without the classifier comparison)
    from monai_condflow.engines.run_folder import open_run_folder

    recorded = json.loads((run / "flow" / "run_settings.json").read_text())["stage"]
    with pytest.raises(RunSettingsError, match=r"'hu_window' was \[-600, 1500\], now \[40, 400\]"):
        open_run_folder(run / "flow", {**recorded, "hu_window": [40, 400]})
    close_run_folder(run / "flow")


@pytest.mark.parametrize("config", ["train_flow.json", "generate.json", "evaluate.json", "novelty.json"])
def test_stages_after_the_classifier_read_images_as_it_did(trained_run, dataset, tmp_path, config):
    """A flow trained (or a set generated, evaluated) with another HU window than the frozen classifier's ran without
    a word; now refused by name with the value to pass. The recorded values themselves pass."""
    run = tmp_path / "run"
    for stage in ("classifier", "flow"):
        shutil.copytree(trained_run / stage, run / stage)
    if config == "train_flow.json":
        shutil.rmtree(run / "flow")  # a new flow stage on the trained classifier
    extra = {**TINY_FLOW, "adversarial_steps": 0} if config == "train_flow.json" else {}
    wf = _workflow([config], **TINY, **extra, dataset_dir=str(dataset), output_dir=str(run), hu_window=[40, 400])
    text = str(_refusal(wf, ConfigValueError))
    assert "config id 'hu_window' is [40, 400] but the classifier in" in text
    assert 'pass --hu_window "[-600, 1500]"' in text
    from monai_condflow.engines.stages import check_run_images

    assert check_run_images(run, image_size=32, intensity="auto", hu_window=[-600.0, 1500.0], crop="box_or_auto")
    with pytest.raises(ConfigValueError, match="'crop' is 'none' but the classifier .* pass --crop box_or_auto"):
        check_run_images(run, crop="none")


@pytest.mark.parametrize("config, key", [("counterfactual.json", "counterfactual_dir"), ("novelty.json", "novelty_dir"),
                                         ("inference.json", "inference_dir")])  # fmt: skip
def test_stages_writing_their_own_folder_refuse_an_unwritable_one_before_computing(dataset, tmp_path, config, key):
    """They failed with a raw OSError after their work; now the id is named in the initialisation."""
    (tmp_path / "afile").write_text("x")
    ids = {**TINY, "dataset_dir": str(dataset), "output_dir": str(tmp_path), key: str(tmp_path / "afile")}
    text = str(_refusal(_workflow([config], **ids), ConfigValueError))
    assert f"config id '{key}'" in text and "is a file" in text


@pytest.mark.parametrize("key", ["semi_select", "semi_augmentation"])
def test_the_semisupervised_switches_refuse_the_text_false_by_name(dataset, tmp_path, key):
    """Both read as on when given as the text "false" (`monai.bundle run --semi_select false`): refused before any
    training, and the refused run's folder does not bind the corrected rerun (it holds only its settings)."""
    wf = _workflow(["train_classifier.json", "train_semisupervised.json"], dataset_dir=str(dataset),
                   output_dir=str(tmp_path), **{**TINY, "num_labels": 20, key: "false"})  # fmt: skip
    assert f"write --{key} False" in str(_refusal(wf, ConfigValueError, run=True))
    assert not list((tmp_path / "classifier").glob("*.pt"))  # nothing trained
    from monai_condflow.engines.run_folder import close_run_folder

    close_run_folder(tmp_path / "classifier")
    wf = _workflow(["train_classifier.json", "train_semisupervised.json"], dataset_dir=str(dataset),
                   output_dir=str(tmp_path), **{**TINY, "num_labels": 20, "seed": 1, key: False})  # fmt: skip
    wf.initialize()  # another seed than the refused run recorded: not refused
    close_run_folder(tmp_path / "classifier")


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_deterministic_id_chooses_cudnns_algorithms_and_every_seeded_config_reads_it(dataset, tmp_path,
                                                                                        deterministic):
    """``deterministic`` false: the stage's seeding lets cuDNN autotune (``benchmark`` on, ``deterministic`` off);
    true (the default): MONAI's deterministic flags. Every config that seeds goes through the same call."""
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert "set_determinism(" not in text, path.name  # seeding without the id would ignore it
        if "set_run_determinism" in text:
            assert "set_run_determinism(@seed, @deterministic)" in text, path.name
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (not deterministic), deterministic
    try:
        overrides = {} if deterministic else {"deterministic": False}  # the default is true
        wf = _workflow(["train_classifier.json"], dataset_dir=str(dataset), output_dir=str(tmp_path), **overrides)
        wf.initialize()
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_the_evaluation_refuses_a_training_image_copied_into_the_test_split(dataset, tmp_path):
    """The copy has another name, so the split check passes; its pixels give it away before any training."""
    from monai_condflow.data.errors import DataError

    bad = tmp_path / "data"
    (bad / "images").mkdir(parents=True)
    for image in (dataset / "images").iterdir():
        (bad / "images" / image.name).symlink_to(image)
    for split in ("train", "val", "test"):
        (bad / f"{split}.txt").write_text((dataset / f"{split}.txt").read_text())
    first = (dataset / "train.txt").read_text().splitlines()[0].split()
    shutil.copy2(dataset / "images" / first[0], bad / "images" / "renamed_copy.png")
    with open(bad / "test.txt", "a") as handle:
        handle.write(" ".join(["renamed_copy.png", *first[1:]]) + "\n")
    wf = _workflow(["evaluate.json"], **TINY, dataset_dir=str(bad), output_dir=str(tmp_path / "o"))
    cause = _refusal(wf, DataError)
    assert "1 image(s) of one split are pixel for pixel an image of another split" in str(cause)
    assert first[0] in str(cause) and "renamed_copy.png" in str(cause)
    assert not (tmp_path / "o" / "metrics.json").exists() and not (tmp_path / "o" / "report.md").exists()


def test_bundles_refuse_shared_split_images_a_missing_gpu_and_a_file_as_output(dataset, tmp_path):
    """checked in ``initialize``, before any image is read or any training."""
    from monai_condflow.data.errors import DataError

    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "images").symlink_to(dataset / "images")
    for split in ("train", "val"):
        (bad / f"{split}.txt").write_text((dataset / f"{split}.txt").read_text())
    leaked = (dataset / "train.txt").read_text().splitlines()[0]
    (bad / "test.txt").write_text((dataset / "test.txt").read_text() + leaked + "\n")
    wf = _workflow(["train_classifier.json"], dataset_dir=str(bad), output_dir=str(tmp_path / "o"))
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    cause = _root_cause(info.value)
    assert isinstance(cause, DataError) and "both the train and the test split" in str(cause)
    (tmp_path / "afile").write_text("x")
    wf = _workflow(["train_flow.json"], dataset_dir=str(dataset), output_dir=str(tmp_path / "afile"))
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert isinstance(_root_cause(info.value), ConfigValueError) and "'output_dir'" in str(_root_cause(info.value))
    if not torch.cuda.is_available():
        for files in (["train_classifier.json"], ["generate.json"]):
            wf = _workflow(files, dataset_dir=str(dataset), output_dir=str(tmp_path / "o"), device="cuda")
            with pytest.raises(RuntimeError) as info:
                wf.initialize()
            cause = _root_cause(info.value)
            assert isinstance(cause, ConfigValueError) and "'device'" in str(cause) and "CUDA" in str(cause)


def test_missing_dataset_and_missing_classifier(dataset, tmp_path):
    wf = _workflow(["train_classifier.json"], dataset_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert "dataset_dir" in str(_root_cause(info.value)) and "nowhere" in str(_root_cause(info.value))
    wf = _workflow(["train_flow.json"], dataset_dir=str(dataset), output_dir=str(tmp_path / "empty"))
    wf.initialize()
    with pytest.raises(RuntimeError) as info:
        wf.run()
    cause = _root_cause(info.value)
    assert isinstance(cause, FileNotFoundError) and "run train_classifier.json first" in str(cause)


def _torchrun(files: list[str], overrides: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps([str(CONFIGS / f) for f in ["common.json", *files]]),
        "--bundle_root",
        str(BUNDLE),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_multi_gpu_overlays_run_under_torchrun(dataset, trained_run, tmp_path):
    out = tmp_path / "ddp"
    common = {**TINY, "dataset_dir": str(dataset), "output_dir": str(out)}
    cls = _torchrun(["train_classifier.json", "multi_gpu_train_classifier.json"], {**common, "max_epochs": 2})
    assert cls.returncode == 0, cls.stderr[-3000:]
    assert (out / "classifier" / "model.pt").is_file()
    assert "rank 1 of 2" in cls.stderr + cls.stdout
    # the phase's second step skips the likelihood term: the ranks must take that decision together
    flow = _torchrun(["train_flow.json", "multi_gpu_train_flow.json"], {**common, **TINY_FLOW,
                     "adversarial_likelihood_every": 2})  # fmt: skip
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert (out / "flow" / "model.pt").is_file()
    # the adversarial phase ran on both ranks (gradients averaged) after the likelihood epochs
    info = json.loads((out / "flow" / "flow.json").read_text())
    assert info["adversarial"]["steps"] == TINY_FLOW["adversarial_steps"] and info["adversarial"]["skipped_steps"] == 0
    assert info["adversarial"]["likelihood_every"] == 2
    assert info["selected"].endswith(f"+ adversarial fine-tuning ({TINY_FLOW['adversarial_steps']} steps)")
    assert (out / "flow" / "model_likelihood.pt").is_file()


def test_dp_overlays_spend_the_target_and_report_it(dataset, tmp_path):
    """train_classifier_dp.json + train_flow_dp.json -> generate -> evaluate: the epsilons add up in metrics.json."""
    out = tmp_path / "dp"
    common = {**TINY, "dataset_dir": str(dataset), "output_dir": str(out), "max_epochs": 2}
    _run(["train_classifier.json", "train_classifier_dp.json"], **common, target_epsilon=2.0, target_delta=1e-4)
    cls = json.loads((out / "classifier" / "classifier.json").read_text())
    assert cls["norm"] == "group" and cls["selected"] == "last epoch (DP-SGD)"
    assert 1.5 < cls["dp"]["epsilon"] <= 2.0 * 1.01 and cls["dp"]["steps"] > 0
    assert (out / "classifier" / "model.pt").is_file()
    _run(["train_flow.json", "train_flow_dp.json"], **common, **TINY_FLOW, target_epsilon=3.0, target_delta=1e-4,
         audit_holdout=0.2)  # fmt: skip
    flow = json.loads((out / "flow" / "flow.json").read_text())
    assert 2.0 < flow["dp"]["epsilon"] <= 3.0 * 1.01 and flow["selected"] == "last epoch"
    assert "selected_epoch" not in flow  # no epoch chosen on (private) validation data: model.pt is the last one
    assert "adversarial" not in flow  # the adversarial phase is off under DP-SGD (not private)
    assert sorted(p.name for p in (out / "flow").glob("*.pt")) == ["model.pt", "state_checkpoint_epoch=1.pt",
                                                                   "state_checkpoint_epoch=2.pt"]  # fmt: skip
    assert (out / "flow" / "audit_holdout.json").is_file()
    _run(["generate.json"], **common, formats=["png"])
    rows = (out / "synthetic" / "manifest.csv").read_text().splitlines()
    eps_total = cls["dp"]["epsilon"] + flow["dp"]["epsilon"]
    assert rows[0].endswith(",dp_epsilon") and rows[1].endswith(f",{eps_total:.4g}")
    assert rows[0].endswith(",dp_noise,dp_epsilon") and rows[1].endswith(f",os_entropy,{eps_total:.4g}")
    assert cls["dp"]["noise"] == flow["dp"]["noise"] == "os_entropy"
    _run(["evaluate.json"], **common, n_bootstrap=5, n_synthetic_sets=1, augmentation=False)
    privacy = json.loads((out / "metrics.json").read_text())["privacy"]
    assert privacy["epsilon"] == pytest.approx(eps_total) and privacy["delta"] == pytest.approx(2e-4)
    assert privacy["holdout"] == "held-back training images" and 0.0 <= privacy["mia_auc"] <= 1.0
    assert "## Privacy" in (out / "report.md").read_text()


def test_public_pretraining_overlays(dataset, tmp_path):
    """Public classifier + public flow -> public_classifier.json -> DP fine-tuning from the public flow."""
    from monai_condflow.engines.stages import privacy_spent
    from monai_condflow.privacy.public import file_sha256

    out = tmp_path / "run"
    public = {**TINY, **TINY_FLOW, "dataset_dir": str(dataset), "output_dir": str(out / "public"), "max_epochs": 1}
    _run(["train_classifier.json"], **public)
    _run(["train_flow.json"], **public)
    _run(["public_classifier.json"], output_dir=str(out), image_size=32)
    cls = json.loads((out / "classifier" / "classifier.json").read_text())
    assert cls["dp"] == {"epsilon": 0.0, "delta": 0.0, "public": True, "covers": cls["dp"]["covers"]}
    assert cls["public"]["sha256"] == file_sha256(out / "public" / "classifier" / "model.pt")
    _run(["train_flow.json", "train_flow_dp.json"], **{**TINY, **TINY_FLOW}, dataset_dir=str(dataset),
         output_dir=str(out), target_epsilon=3.0, target_delta=1e-4,
         public_checkpoint="$os.path.join(@output_dir, 'public', 'flow', 'model.pt')")  # fmt: skip
    flow = json.loads((out / "flow" / "flow.json").read_text())
    privacy = json.loads((out / "flow" / "privacy.json").read_text())
    # from public weights the default trains the affine subset only: ActNorm + the 1x1 convs' log-diagonal
    assert privacy["covered_parameters"]
    assert all(n.endswith(("log_scale", "bias", "log_abs_s")) for n in privacy["covered_parameters"])
    assert not any("net." in n for n in privacy["covered_parameters"])  # no coupling network weights
    assert flow["pretrained"]["sha256"] == file_sha256(out / "public" / "flow" / "model.pt")
    assert flow["pretrained"]["source"] == str(out / "public" / "flow" / "model.pt")
    spent = privacy_spent(out)
    assert spent["epsilon"] == pytest.approx(flow["dp"]["epsilon"]) and 0 < spent["epsilon"] <= 3.0 * 1.01
    assert "public data only" in spent["covers"]


def test_a_pretrained_flow_under_dp_must_be_declared_public(dataset, tmp_path):
    out = tmp_path / "run"
    common = {**TINY, **TINY_FLOW, "dataset_dir": str(dataset), "output_dir": str(out), "max_epochs": 1}
    _run(["train_classifier.json"], **common)
    _run(["train_flow.json"], **common)  # a flow trained on the (private) data itself
    os.replace(out / "flow" / "model.pt", tmp_path / "flow.pt")
    shutil.rmtree(out / "flow")
    wf = _workflow(["train_flow.json", "train_flow_dp.json"], **common, target_epsilon=3.0,
                   pretrained_checkpoint=str(tmp_path / "flow.pt"))  # fmt: skip
    wf.initialize()
    with pytest.raises(Exception) as info:  # noqa: PT011 - MONAI wraps the error; its cause is checked below
        wf.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("already initialised" in text and "public_init=True" in text for text in chain), chain
    # without DP the same checkpoint is a plain starting point (fine-tuning), recorded with its hash
    from monai_condflow.privacy.public import file_sha256

    shutil.rmtree(out / "flow", ignore_errors=True)
    _run(["train_flow.json"], **common, pretrained_checkpoint=str(tmp_path / "flow.pt"))
    flow = json.loads((out / "flow" / "flow.json").read_text())
    assert flow["pretrained"] == {"source": str(tmp_path / "flow.pt"), "sha256": file_sha256(tmp_path / "flow.pt")}
