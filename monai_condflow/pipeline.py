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
"""The main job: the whole pipeline, every stage run through ``python -m monai.bundle run``.

Usage::

    python -m monai_condflow.pipeline [DATASET_DIR] [--output-dir runs/main] [--num-labels 50]

With no ``DATASET_DIR`` the embedded phantom dataset is generated first (``OUTPUT_DIR/data``).
``DATASET_DIR`` is a COVIDx-CT-format folder: ``images/`` (or the folder the annotation files name
paths relative to) plus ``train.txt``, ``val.txt`` and ``test.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from monai_condflow.utils.bundle import BUNDLE_ROOT, COMMON_CONFIG, closest_ids, config_file_ids, top_level_id

__all__ = [
    "BUNDLE_ROOT",
    "DESCRIPTION",
    "build_parser",
    "COMMON_CONFIG",
    "CPU_BUDGET",
    "MULTI_PROCESS_CONFIGS",
    "PREFLIGHT_ID",
    "PUBLIC_DIR",
    "STAGE_KEYS",
    "Stage",
    "cli_value",
    "default_stages",
    "parse_stage_overrides",
    "run_pipeline",
    "run_stage_process",
    "config_ids",
    "stage_error_cause",
    "main",
    "num_labels_arg",
]


class Stage:
    """One stage of the pipeline: a ``monai.bundle run`` over one or more config files.

    Args:
        name: short name used in the progress output.
        config_files: config file names under ``BUNDLE_ROOT/configs`` (later files override earlier ones).
        overrides: extra ``--id value`` pairs for this stage only.
        public: the stage trains on the public phantom in ``OUTPUT_DIR/public`` (public pretraining of a DP run):
            its ``dataset_dir``, ``output_dir`` and ``num_labels`` are fixed to that folder, the generated phantom
            and ``"all"``, whatever the common overrides say.
        nproc: processes of the stage. Above 1 the stage runs under ``torch.distributed.run --standalone
            --nproc_per_node nproc`` with :data:`MULTI_PROCESS_CONFIGS`' overlay of its first config file stacked
            last (data parallel: the global ``batch_size`` is split over the ranks; gloo on CPU, NCCL on GPUs), and
            each process gets ``OMP_NUM_THREADS`` / ``nproc`` threads.
    """

    def __init__(
        self,
        name: str,
        config_files: Sequence[str],
        overrides: dict[str, object] | None = None,
        public: bool = False,
        nproc: int = 1,
    ) -> None:
        self.name = name
        self.config_files = list(config_files)
        self.overrides = dict(overrides or {})
        self.public = public
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"Stage '{name}': nproc must be an integer >= 1, got {nproc!r}.")
        if nproc > 1 and self.config_files[0] not in MULTI_PROCESS_CONFIGS:
            raise ValueError(
                f"Stage '{name}': {self.config_files[0]} has no multi-process overlay (those that have one: "
                f"{sorted(MULTI_PROCESS_CONFIGS)})."
            )
        self.nproc = nproc

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """The environment of the stage's process(es): ``base`` with the threads split over ``nproc`` processes."""
        env = dict(base)
        if self.nproc > 1:
            given = env.get("OMP_NUM_THREADS", "")
            threads = int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = str(max(1, threads // self.nproc))
        return env

    def command(
        self, bundle_root: Path, common: dict[str, object], optional: Sequence[str] = (), run_id: str | None = None
    ) -> list[str]:
        """The command line of this stage: the bundle's :data:`COMMON_CONFIG` (when it has one) stacked first.

        Args:
            bundle_root: the bundle.
            common: ``--id value`` pairs of every stage.
            optional: ids of ``common`` passed only when the stage's configs define them (``--set``: the bundle
                refuses an id that none of its configs has).
            run_id: run this expression list of the configs instead of the stage (``initialize``, ``run`` and
                ``finalize`` are skipped): e.g. ``"preflight"`` of ``evaluate.json``, the pipeline's pre-flight.
        """
        names = list(self.config_files)
        if (bundle_root / "configs" / COMMON_CONFIG).is_file() and COMMON_CONFIG not in names:
            names.insert(0, COMMON_CONFIG)
        launcher = [sys.executable]
        if self.nproc > 1 and run_id is None:
            names.append(MULTI_PROCESS_CONFIGS[self.config_files[0]])
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.nproc)]
        files = [str(bundle_root / "configs" / f) for f in names]
        config_arg = files[0] if len(files) == 1 else json.dumps(files)
        cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", config_arg]
        if run_id is not None:  # ids no config has: MONAI then skips the stage's initialize / finalize
            cmd += ["--run_id", run_id, "--init_id", f"{run_id}_no_initialize", "--final_id", f"{run_id}_no_finalize"]
        cmd += ["--bundle_root", str(bundle_root), "--logging_file", str(bundle_root / "configs" / "logging.conf")]
        known = config_ids(bundle_root, names) if optional else None
        # a --set id that this stage's configs do not have is not passed to it (the bundle would refuse it as unknown)
        shared = {k: v for k, v in common.items() if k not in optional or known is None or top_level_id(k) in known}
        values = {**self.overrides, **shared}
        if self.public:
            public_dir = Path(str(common["output_dir"])) / PUBLIC_DIR
            values |= {"dataset_dir": str(public_dir / "data"), "output_dir": str(public_dir), "num_labels": "all"}
        for key, value in values.items():
            cmd += [f"--{key}", cli_value(value)]
        return cmd


def config_ids(bundle_root: Path, names: Sequence[str]) -> set[str] | None:
    """The top-level ids of the bundle configs ``names`` (``bundle_root/configs/<name>``), or ``None`` when one of
    them cannot be read (the stage then reports it itself)."""
    return config_file_ids([Path(bundle_root) / "configs" / name for name in names])


# Processes of the main job's flow stage (--flow-processes).
DEFAULT_FLOW_PROCESSES = 1

# The data-parallel overlay of each training config that has one (stacked last by ``Stage(nproc > 1)``).
MULTI_PROCESS_CONFIGS = {"train_flow.json": "multi_gpu_train_flow.json"}

PUBLIC_DIR = "public"  # sub-folder of a DP run holding the public (phantom) pretraining
PUBLIC_FLOW_CHECKPOINT = f"$os.path.join(@output_dir, '{PUBLIC_DIR}', 'flow', 'model.pt')"  # bundle expression
PUBLIC_PHANTOM_SEED_OFFSET = 1_000_003  # public phantom seed = run seed + this, when the private data is the phantom


def cli_value(value: object) -> str:
    """``value`` as ``monai.bundle``'s command line (python-fire) reads it back.

    Fire evaluates Python literals, so booleans and ``None`` must be spelled ``True`` / ``False`` / ``None``:
    JSON's ``false`` would arrive as the (truthy) string ``"false"``. Strings pass through unchanged.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, list, tuple, dict)) or value is None:
        return repr(value)
    raise TypeError(f"cannot pass a {type(value).__name__} on the bundle command line: {value!r}")


# Per-stage overrides of the main job: none. Its budget (the whole pipeline in about 15 minutes on 2 CPU cores) is
# the bundle configs' own defaults, so a stage run by hand with `python -m monai.bundle run` trains exactly as the main
# job does; `--stage-set stage.key=value` adds overrides on top.
CPU_BUDGET: dict[str, dict[str, object]] = {
    "classifier": {},
    "flow": {},
    "generation": {},
    "acgan": {},
    "evaluation": {},
}

PREFLIGHT_ID = "preflight"  # the expression list the pipeline runs before its first stage (evaluate.json has one)
STAGE_KEYS = ("classifier", "flow", "generation", "acgan", "evaluation")


def default_stages(
    num_labels: object,
    budget: dict[str, dict[str, object]] | None = None,
    baseline: bool = False,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    public_pretrain: bool = False,
    flow_processes: int = 1,
) -> list[Stage]:
    """The stages of the main job, in order.

    Args:
        num_labels: labelled images (``"all"`` skips the semi-supervised overlay).
        budget: per-stage overrides keyed by :data:`STAGE_KEYS` (default :data:`CPU_BUDGET`).
        baseline: add the ACGAN baseline stage (``train_acgan.json``) before the evaluation, which then reports it
            under ``baseline``.
        dp_epsilon: train the classifier and the flow with DP-SGD (``train_classifier_dp.json``,
            ``train_flow_dp.json``) so that the released pair spends ``(dp_epsilon, dp_delta)`` in all: each stage
            gets half of both (basic composition). The DP classifier trains on the labelled images only (label
            propagation is not private).
        dp_delta: total delta of a DP run.
        public_pretrain: first train a classifier and a flow on the embedded phantom (public by construction, in
            ``OUTPUT_DIR/public``); the private flow then starts from the phantom flow (``pretrained_checkpoint``)
            instead of from scratch. With ``dp_epsilon`` (all labels only) the phantom classifier also becomes the
            frozen conditioning classifier (``public_classifier.json``: no private data, epsilon 0) and the phantom
            flow is fine-tuned with DP-SGD, which then gets the whole ``(dp_epsilon, dp_delta)``.
        flow_processes: processes of the flow stage(s) (``Stage.nproc``: ``torch.distributed.run`` with
            ``multi_gpu_train_flow.json`` when above 1), for machines with several GPUs or many cores: on 2 CPU
            cores two single-thread ranks are no faster than one process with two threads (docs/distributed.md).

    Raises:
        ValueError: a bad epsilon / delta, ``public_pretrain`` with ``dp_epsilon`` and partial labels, or
            ``flow_processes`` above 1 with ``dp_epsilon`` (the DP-SGD flow stage runs in one process).
    """
    budget = CPU_BUDGET if budget is None else budget
    if dp_epsilon is not None and flow_processes != 1:
        raise ValueError(f"--flow-processes {flow_processes}: the DP-SGD flow stage runs in one process; use 1.")
    semi = num_labels != "all"
    classifier_files = ["train_classifier.json", "train_semisupervised.json"] if semi else ["train_classifier.json"]
    classifier_overrides = dict(budget.get("classifier") or {})
    flow_files, flow_overrides = ["train_flow.json"], dict(budget.get("flow") or {})
    name = "classifier (semi-supervised)" if semi else "classifier"
    if dp_epsilon is not None:
        if not (0 < dp_epsilon < float("inf")) or not 0 < dp_delta < 1:
            raise ValueError(
                f"dp_epsilon must be a finite number > 0 and dp_delta in (0, 1), got {dp_epsilon} and {dp_delta}."
            )
        half = {"target_epsilon": dp_epsilon / 2, "target_delta": dp_delta / 2}
        classifier_files = ["train_classifier.json", "train_classifier_dp.json"]
        classifier_overrides = {k: v for k, v in classifier_overrides.items() if k in ("max_epochs",)} | half
        flow_files = ["train_flow.json", "train_flow_dp.json"]
        flow_overrides |= half
        name = f"classifier (DP-SGD, epsilon {dp_epsilon / 2:g})"
    flow_name = "flow" if dp_epsilon is None else f"flow (DP-SGD, epsilon {dp_epsilon / 2:g})"
    public_stages: list[Stage] = []
    if public_pretrain:
        public_stages = _public_stages(budget, flow_processes)
        if dp_epsilon is None:
            flow_overrides["pretrained_checkpoint"] = PUBLIC_FLOW_CHECKPOINT
        else:  # frozen public classifier (epsilon 0); the DP fine-tuning of the public flow gets the whole budget
            if semi:
                raise ValueError(
                    "public pretraining with DP-SGD needs --num-labels all: the frozen public classifier does no "
                    "label propagation."
                )
            name = "classifier (public, frozen: epsilon 0)"
            classifier_files, classifier_overrides = ["public_classifier.json"], {}
            flow_overrides = dict(budget.get("flow") or {}) | {
                "target_epsilon": dp_epsilon,
                "target_delta": dp_delta,
                "public_checkpoint": PUBLIC_FLOW_CHECKPOINT,
            }
            flow_name = f"flow (DP-SGD fine-tuning, epsilon {dp_epsilon:g})"
    stages = public_stages + [
        Stage(name, classifier_files, classifier_overrides),
        Stage(flow_name, flow_files, flow_overrides, nproc=flow_processes),
        Stage("generation", ["generate.json"], budget.get("generation")),
    ]
    if baseline:
        stages.append(Stage("baseline (ACGAN)", ["train_acgan.json"], budget.get("acgan")))
    stages.append(Stage("evaluation", ["evaluate.json"], budget.get("evaluation")))
    return stages


def _public_stages(budget: dict[str, dict[str, object]], flow_processes: int = 1) -> list[Stage]:
    """Classifier and flow trained on the public phantom in ``OUTPUT_DIR/public`` (no DP: nothing private)."""
    classifier = {k: v for k, v in (budget.get("classifier") or {}).items() if k == "max_epochs"}
    # the phantom has no members to audit
    public_flow = {k: v for k, v in (budget.get("flow") or {}).items() if k != "audit_holdout"}
    return [
        Stage("public classifier (phantom)", ["train_classifier.json"], classifier, public=True),
        Stage("public flow (phantom)", ["train_flow.json"], public_flow, public=True, nproc=flow_processes),
    ]


def parse_stage_overrides(items: Sequence[str], budget: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Apply ``STAGE.ID=VALUE`` items (e.g. ``evaluation.max_epochs=30``) to a copy of ``budget``.

    Values are parsed as JSON when they can be (numbers, ``true``, lists), else kept as strings.

    Raises:
        ValueError: for an item without ``=`` or ``.``, or an unknown stage name (the message lists the stages).
    """
    out = {k: dict(v) for k, v in budget.items()}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"expected STAGE.ID=VALUE (e.g. evaluation.max_epochs=30), got {item!r}")
        if stage not in STAGE_KEYS:
            raise ValueError(f"unknown stage {stage!r} in {item!r}; stages: {', '.join(STAGE_KEYS)}")
        try:
            parsed: object = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(stage, {})[name] = parsed
    return out


_PHANTOM_FILES = re.compile(
    r"^(train\.txt|val\.txt|test\.txt|dataset\.json|README\.md|images|images/phantom_p\d+_s\d+\.png|(.*/)?\..*\.tmp)$"
)


def _foreign_files(data_dir: Path) -> list[str]:
    """Entries of ``data_dir`` that a phantom dataset written by the pipeline does not have (relative paths)."""
    if not data_dir.exists():
        return []
    if not data_dir.is_dir():
        return [data_dir.name]
    found = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir).as_posix()
        if not _PHANTOM_FILES.match(rel) or (rel == "images" and not path.is_dir()):
            found.append(rel)
    return found


def _prepare_default_dataset(output_dir: Path, num_images: int, seed: int, progress: bool = True) -> Path:
    """The phantom dataset in ``output_dir/data``: reused when it matches, (re)generated when absent or when it is a
    phantom with other settings. A folder that holds anything else (the user's own data) is refused, never
    overwritten.

    Raises:
        FileExistsError: ``output_dir/data`` holds files the pipeline did not write (the message names them).
    """
    from monai_condflow.data.phantom import generate_phantom_dataset

    data_dir = output_dir / "data"
    info = data_dir / "dataset.json"
    foreign = _foreign_files(data_dir)
    meta: dict = {}
    if info.is_file():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    phantom = isinstance(meta, dict) and meta.get("name") == "monai_condflow phantom chest CT"
    if foreign or (data_dir.is_dir() and any(data_dir.iterdir()) and not phantom):
        shown = foreign or ["dataset.json (not a phantom written by the pipeline)"]
        raise FileExistsError(
            f"{data_dir} holds files the pipeline did not create ({', '.join(shown[:5])}"
            f"{', ...' if len(shown) > 5 else ''}); without --dataset-dir the pipeline writes its phantom dataset "
            "there and would overwrite them. Pass --dataset-dir to train on that data, or choose another output "
            "folder."
        )
    if phantom:
        if meta.get("seed") == seed and meta.get("num_images") == num_images:
            print(f"[pipeline] reusing the phantom dataset in {data_dir}", flush=True)
            return data_dir
    t0 = time.perf_counter()
    generate_phantom_dataset(
        data_dir, num_images=num_images, seed=seed, overwrite=True, num_workers=2, progress=progress
    )
    print(
        f"[pipeline] generated {num_images} phantom slices in {data_dir} ({time.perf_counter() - t0:.1f} s)", flush=True
    )
    return data_dir


def run_pipeline(
    dataset_dir: Path | None,
    output_dir: Path,
    num_labels: object = 50,
    overrides: dict[str, object] | None = None,
    stages: Sequence[Stage] | None = None,
    bundle_root: Path = BUNDLE_ROOT,
    num_images: int = 600,
    seed: int = 0,
) -> dict[str, float]:
    """Run every stage in order; returns the wall time of each stage in seconds.

    Raises:
        FileNotFoundError: when ``dataset_dir`` or one of its annotation files is missing.
        FileExistsError: when ``output_dir/data`` holds the user's files and no dataset is given.
        ValueError: when ``output_dir`` is a file or read-only (the message names it).
        RuntimeError: when a stage fails (its name and exit code are in the message).
    """
    from monai_condflow.engines.config_checks import check_output_dir

    bundle_root = Path(bundle_root).resolve()
    if not (bundle_root / "configs").is_dir():
        raise FileNotFoundError(f"bundle not found: {bundle_root} has no configs/ folder (see --bundle-root)")
    output_dir = check_output_dir(Path(output_dir).resolve(), "output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = list(stages) if stages is not None else default_stages(num_labels)
    private_is_phantom = dataset_dir is None
    progress = (overrides or {}).get("progress", True) not in (False, "false", "False", 0)
    if dataset_dir is None:
        dataset_dir = _prepare_default_dataset(output_dir, num_images, seed, progress)
    dataset_dir = Path(dataset_dir).resolve()
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir}")
    for key, default in (("train_list", "train.txt"), ("val_list", "val.txt"), ("test_list", "test.txt")):
        split = str((overrides or {}).get(key, default))
        if not (dataset_dir / split).is_file():
            raise FileNotFoundError(
                f"annotation file missing: {dataset_dir / split} (a COVIDx-CT-format folder needs it)"
            )
    if any(stage.public for stage in stages):
        # the public phantom must not be the private one: when the private data is the phantom too, draw other patients
        public_seed = seed + PUBLIC_PHANTOM_SEED_OFFSET if private_is_phantom else seed
        _prepare_default_dataset(output_dir / PUBLIC_DIR, num_images, public_seed, progress)
    common: dict[str, object] = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "num_labels": num_labels,
    }
    common.update(overrides or {})
    _check_set_ids(overrides or {}, stages, bundle_root)
    times: dict[str, float] = {}
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    _preflight(stages, bundle_root, common, list(overrides or {}), env)
    for i, stage in enumerate(stages, start=1):
        cmd = stage.command(bundle_root, common, optional=list(overrides or {}))
        print(f"[pipeline] stage {i}: {stage.name}\n[pipeline]   {shlex.join(cmd)}", flush=True)
        times[stage.name] = _run_or_raise(cmd, stage.env(env), f"stage '{stage.name}'")
        print(f"[pipeline] stage {i}: {stage.name} done in {times[stage.name]:.0f} s", flush=True)
    return times


def _run_or_raise(cmd: Sequence[str], env: dict[str, str], what: str) -> float:
    """Run a stage's command (:func:`run_stage_process`); returns its wall time in seconds.

    Raises:
        RuntimeError: naming ``what``, the exit code, the error behind it and the command.
    """
    t0 = time.perf_counter()
    returncode, cause = run_stage_process(cmd, env)
    if returncode != 0:
        raise RuntimeError(
            f"{what} failed with exit code {returncode}"
            + (f": {cause}" if cause else "")
            + f"\n[pipeline]   command: {shlex.join(cmd)}"
        )
    return time.perf_counter() - t0


def _preflight(
    stages: Sequence[Stage], bundle_root: Path, common: dict[str, object], optional: Sequence[str], env: dict[str, str]
) -> None:
    """Before the first stage, run the ``preflight`` list of the last stage that has one (``evaluate.json``: the
    splits read, preprocessed and checked as the evaluation will need them; the preprocessed slices are cached for
    the stages), so that a dataset the evaluation cannot use is refused before the training stages run."""
    for stage in reversed(stages):
        ids = config_ids(bundle_root, [COMMON_CONFIG, *stage.config_files])
        if ids is None or PREFLIGHT_ID not in ids:
            continue
        cmd = stage.command(bundle_root, common, optional=optional, run_id=PREFLIGHT_ID)
        print(f"[pipeline] pre-flight ({stage.name}'s data checks)\n[pipeline]   {shlex.join(cmd)}", flush=True)
        seconds = _run_or_raise(cmd, env, f"pre-flight of stage '{stage.name}' (nothing was trained)")
        print(f"[pipeline] pre-flight done in {seconds:.0f} s", flush=True)
        return


def _check_set_ids(overrides: dict[str, object], stages: Sequence[Stage], bundle_root: Path) -> None:
    """Refuse a ``--set`` id that no stage's configs define (it would reach no stage; a typo such as
    ``max_epoch``), naming the closest ids."""
    if not stages:
        return
    known: set[str] = set()
    for stage in stages:
        ids = config_ids(bundle_root, [COMMON_CONFIG, *stage.config_files])
        if ids is None:
            return
        known |= ids
    for key in overrides:
        if top_level_id(key) not in known:
            raise ValueError(f"--set {key}=...: no stage of this run has a config id {key!r}{closest_ids(key, known)}")


# the last line of a Python traceback: "[module.]Name(Error|Exception|...): message"
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Iteration): \S")
# what MONAI's config parser (and our own re-raise of a stage) wrap the real error in
_WRAPPERS = ("RuntimeError: Failed to evaluate", "RuntimeError: stage '")


def stage_error_cause(stderr_lines: Sequence[str]) -> str | None:
    """The error that stopped a stage, from the end of its standard error: the first exception line of its last
    traceback (Python prints a chain of exceptions cause first) that is not a wrapper such as MONAI's
    ``RuntimeError: Failed to evaluate ConfigExpression``; ``None`` when there is no traceback.

    Args:
        stderr_lines: the stage's standard error, line by line (its last few hundred lines suffice).
    """
    lines = [line.rstrip("\n") for line in stderr_lines]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    # the last chain: a traceback not joined to the one before it by Python's chaining text starts a new chain
    chain_start = starts[0]
    for previous, current in zip(starts, starts[1:]):
        if not any(line.startswith(("The above exception", "During handling")) for line in lines[previous:current]):
            chain_start = current
    found = [line for line in lines[chain_start:] if _EXCEPTION_LINE.match(line) and not line.startswith("  ")]
    real = [line for line in found if not line.startswith(_WRAPPERS)]
    cause = (real or found or [None])[0]
    return None if cause is None else (cause if len(cause) <= 600 else cause[:600] + " ...")


def run_stage_process(cmd: Sequence[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run one stage's command, its output passing through as it comes; returns ``(exit code, the error that stopped
    it)`` (:func:`stage_error_cause` of its standard error, ``None`` on success or without a traceback)."""
    tail: deque[str] = deque(maxlen=400)
    with subprocess.Popen(list(cmd), env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
        returncode = proc.wait()
    return returncode, (stage_error_cause(list(tail)) if returncode != 0 else None)


def _summary(output_dir: Path, times: dict[str, float]) -> list[str]:
    lines = ["", "[pipeline] finished. Outputs:"]
    for label, rel in (
        ("report", "report.md"),
        ("metrics", "metrics.json"),
        ("synthetic images + manifest", "synthetic/manifest.csv"),
        ("TensorBoard logs", "tensorboard"),
        ("checkpoints", "classifier / flow"),
    ):
        lines.append(f"  {label:<28} {output_dir / rel}")
    lines.append(f"  view the logs with: tensorboard --logdir {output_dir / 'tensorboard'}")
    metrics_file = output_dir / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        trtr, tstr = m.get("trtr", {}), m.get("tstr", {})
        lines.append(
            f"  TRTR accuracy {trtr.get('accuracy', float('nan')):.3f} | TSTR accuracy "
            f"{tstr.get('accuracy', float('nan')):.3f} | embedding FID {m.get('fid', float('nan')):.4f}"
        )
        agree, ratio = m.get("class_agreement"), m.get("fid_ratio")
        if isinstance(agree, (int, float)) and isinstance(ratio, (int, float)):
            judged = [v for v in m.get("class_agreement_per_judge") or [] if isinstance(v, (int, float))]
            spread = f" ({len(judged)} evaluation classifiers: {min(judged):.3f} to {max(judged):.3f})"
            lattice, real = m.get("lattice_peak"), m.get("lattice_peak_real")
            lines.append(
                f"  class agreement {agree:.3f}{spread if len(judged) > 1 else ''} | FID / floor {ratio:.3g}"
                + (
                    f" | squeeze lattice {lattice:.3g} (real {real:.3g})"
                    if isinstance(lattice, (int, float)) and isinstance(real, (int, float))
                    else ""
                )
            )
        if isinstance(m.get("privacy"), dict):
            p = m["privacy"]
            eps = p.get("epsilon")
            lines.append(
                f"  privacy: epsilon {'not DP' if eps is None else format(eps, '.3g')} | membership-inference AUC "
                f"{p.get('mia_auc', float('nan')):.3f} (vs {p.get('holdout', '?')})"
            )
        checks = [c for c in m.get("checks") or [] if isinstance(c, dict)]
        if checks:
            failed = [c.get("name", "?") for c in checks if c.get("holds") is False]
            lines.append(
                f"  checks: {sum(c.get('holds') is True for c in checks)} of {len(checks)} hold"
                + (f"; failing: {', '.join(failed)}" if failed else "")
                + ("; not judged (real classifier at chance): class, TSTR" if any(c.get("at_chance") for c in checks)
                   else "")
                + " (report.md, 'Checks')"
            )
        if isinstance(m.get("baseline"), dict):
            b = m["baseline"]
            lines.append(
                f"  ACGAN baseline: TSTR accuracy {b.get('tstr', {}).get('accuracy', float('nan')):.3f} | "
                f"embedding FID {b.get('fid', float('nan')):.4f}"
            )
    lines.append(
        "  wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f" (total {sum(times.values()):.0f} s)"
    )
    return lines


def num_labels_arg(text: str) -> object:
    """``--num-labels`` as the bundle's ``num_labels`` id: ``"all"``, a count or a fraction.

    The value is read by :func:`monai_condflow.data.datalists.parse_num_labels`, the one parser the bundle uses too
    (``"1"`` is one label; ``"1.0"`` is every label, passed on as ``"all"``).

    Raises:
        argparse.ArgumentTypeError: for a value ``parse_num_labels`` refuses.
    """
    from monai_condflow.data.datalists import parse_num_labels

    try:
        value = parse_num_labels(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--num-labels: {err}") from None
    return "all" if value is None else value


DESCRIPTION = (
    "The main job of monai_condflow: classifier (semi-supervised when labels are few) -> conditional Glow flow -> "
    "synthetic images -> evaluation (TRTR vs TSTR, embedding FID, report), every stage a MONAI bundle run. Without "
    "DATASET_DIR the embedded phantom dataset is generated first in OUTPUT_DIR/data."
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (every option's default is shown by ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_condflow.pipeline",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "dataset_dir",
        nargs="?",
        type=Path,
        default=None,
        help="COVIDx-CT-format folder (images plus train.txt, val.txt, test.txt); omitted: the generated phantom",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/main"), help="where every output goes")
    parser.add_argument(
        "--num-labels",
        type=num_labels_arg,
        default=50,
        help="labelled training images: a count such as 20 or 50, a fraction such as 0.05, or all (no "
        "semi-supervised step)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=600,
        help="phantom slices to generate when no DATASET_DIR is given (ignored with a DATASET_DIR)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every stage (bundle id seed) and of the generated phantom dataset",
    )
    parser.add_argument(
        "--bundle-root",
        type=Path,
        default=BUNDLE_ROOT,
        help="the MONAI bundle whose configs/ the stages run (default: the bundle installed with the package)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="extra bundle override for every stage, e.g. --set max_epochs=2 (repeatable)",
    )
    parser.add_argument(
        "--stage-set",
        action="append",
        default=[],
        metavar="STAGE.ID=VALUE",
        help="override for one stage only, e.g. --stage-set evaluation.max_epochs=30 (repeatable; "
        f"stages: {', '.join(STAGE_KEYS)})",
    )
    parser.add_argument("--baseline", action="store_true", help="also train the ACGAN baseline and compare")
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="train classifier and flow with DP-SGD, epsilon in all (half each); see docs/privacy.md",
    )
    parser.add_argument("--dp-delta", type=float, default=1e-5, help="total delta of a DP run (half each stage)")
    parser.add_argument(
        "--public-pretrain",
        action="store_true",
        help="start the flow from one trained on the generated (public) phantom; with --dp-epsilon also a frozen "
        "public classifier (epsilon 0) and DP fine-tuning of the flow",
    )
    parser.add_argument(
        "--audit-holdout",
        type=float,
        default=None,
        help="fraction of the training images the flow never sees, as non-members for the privacy audit",
    )
    parser.add_argument(
        "--flow-processes",
        type=int,
        default=DEFAULT_FLOW_PROCESSES,
        help="processes of the flow stage (torch.distributed.run, data parallel, OMP_NUM_THREADS split over them); "
        "1: one process. Not with --dp-epsilon",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress lines (counts and ETA) from the long loops; same as --set progress=false",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.audit_holdout is not None:
        args.stage_set.append(f"flow.audit_holdout={args.audit_holdout}")
    try:
        budget = parse_stage_overrides(args.stage_set, CPU_BUDGET)
        default_stages(
            args.num_labels,
            budget,
            dp_epsilon=args.dp_epsilon,
            dp_delta=args.dp_delta,
            public_pretrain=args.public_pretrain,
            flow_processes=args.flow_processes,
        )
    except ValueError as e:
        parser.error(str(e))
    overrides: dict[str, object] = {"seed": args.seed}
    if args.no_progress:
        overrides["progress"] = False
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects ID=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    t0 = time.perf_counter()
    try:
        times = run_pipeline(
            args.dataset_dir,
            args.output_dir,
            args.num_labels,
            overrides,
            stages=default_stages(
                args.num_labels,
                budget,
                baseline=args.baseline,
                dp_epsilon=args.dp_epsilon,
                dp_delta=args.dp_delta,
                public_pretrain=args.public_pretrain,
                flow_processes=args.flow_processes,
            ),
            bundle_root=args.bundle_root,
            num_images=args.num_images,
            seed=args.seed,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"[pipeline] error: {e}", file=sys.stderr)
        return 1
    for line in _summary(Path(args.output_dir).resolve(), times):
        print(line)
    print(f"[pipeline] total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
