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
Distributed helpers, and two-process gloo runs on CPU.

One ``torchrun --nproc_per_node=2 --max-restarts=1`` launch (module fixture) runs every scenario of
``dist_worker.py``; the single-process references run the same functions in this process. Tolerances:

- float64 flow: 2 processes == 1 process within 1e-9 (weights, losses, validation bits/dim);
- float32 flow: within 5e-3 on weights (Adam's first steps, ~lr * sign(g), amplify rounding differences of the
  all-reduce; measured ~7e-4) and 1e-4 relative on losses; the two ranks are bit-identical;
- classifier (PEPXNet without batch norm): within 1e-5 on weights (measured ~1e-6).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from monai_condflow.utils import distributed as D
from tests.engines.state_diff import max_state_diff

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
HAS_CLASSIFIER = importlib.util.find_spec("monai_condflow.engines.classifier") is not None
SCENARIOS = ["flow", "flow64", "flow_compiled", "nan", *(["classifier"] if HAS_CLASSIFIER else []), "crash"]


def _max_abs_diff(a: dict, b: dict) -> float:
    return max_state_diff(a, b, floats_only=False)  # integer buffers must match too


def _load_worker():
    spec = importlib.util.spec_from_file_location("condflow_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(out: Path) -> tuple[int, str]:
    """One ``torchrun`` launch of every scenario into ``out``: ``(return code, log)``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
        "--monitor-interval=0.2",
        str(WORKER), "--scenarios", ",".join(SCENARIOS), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=300)  # a DDP hang would end here, not block the suite
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"two-process run timed out (hang?):\n{log[-4000:]}")
    (out / "log.txt").write_text(log)
    return proc.returncode, log


def failure_summary(log: str, limit: int = 6000) -> str:
    """What a failed launch's log says about each failure: every rank's exception lines (the last line of each
    ``[rankN]:`` traceback and any ``Error``) and torchrun's failure report, not only the log's tail (where the
    survivor's collective error hides the failing rank's own traceback)."""
    keep = []
    for line in log.splitlines():
        text = line.strip()
        if ("Error" in text or "Exception" in text or "exitcode" in text or "Signal" in text) and len(text) < 400:
            keep.append(text)
    return "\n".join(keep)[-limit:]


@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_process")
    code, log = _launch(out)
    if code != 0:
        # a failed launch is relaunched once into a fresh folder, the first failure reported loudly; a second failure
        # fails the tests with both reports. (Seen in CI: rank 1 exited with code 1 while rank 0 waited in an
        # all-gather. One such log, kept in 2026-12, showed the cause: rank 1 read the run folder that rank 0 was
        # creating as a checkpoint file; fixed in flow_trainer._resume_checkpoint, tested in test_flow_crash.py.)
        first = failure_summary(log)
        out = tmp_path_factory.mktemp("two_process_retry")
        code, log = _launch(out)
        assert code == 0, f"two launches failed.\nfirst:\n{first}\nsecond:\n{failure_summary(log)}\n{log[-3000:]}"
        warnings.warn(f"the first two-process launch failed, the relaunch passed; first failure:\n{first}")
    return out


@pytest.fixture(scope="module")
def worker():
    return _load_worker()


def _single(worker, name: str, tmp_path: Path, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if name == "classifier":
            return worker.run_classifier(tmp_path / name, **kwargs)
        return worker.run_flow(tmp_path / name, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _ranks(out: Path, name: str) -> tuple[dict, dict]:
    return (
        torch.load(out / f"{name}_rank0.pt", weights_only=True),
        torch.load(out / f"{name}_rank1.pt", weights_only=True),
    )


# ---------------------------------------------------------------- single-process behaviour of the helpers
def test_helpers_without_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() is False
    assert not D.is_distributed()
    assert (D.get_rank(), D.get_world_size()) == (0, 1)
    assert D.any_across_ranks(True) and not D.any_across_ranks(False)
    assert D.any_across_ranks([True, False]) == [True, False] and D.any_across_ranks((False,)) == [False]
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model, "cpu") is model and D.unwrap_model(model) is model
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(D.all_gather_tensors(x), x)
    D.barrier()
    D.broadcast_module(model)
    D.cleanup_distributed()


def test_create_loader_is_seeded_and_uses_the_global_batch():
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": i} for i in range(10)]

    def order(loader, epoch):
        loader.sampler.set_epoch(epoch)
        return [int(v) for b in loader for v in b["label"]]

    a, b = D.create_loader(data, 4, shuffle=True, seed=7), D.create_loader(data, 4, shuffle=True, seed=7)
    assert a.batch_size == 4 and len(a) == 3
    assert order(a, 1) == order(b, 1) and sorted(order(a, 1)) == list(range(10))
    assert order(a, 1) != order(a, 2)
    assert order(D.create_loader(data, 4, shuffle=False, seed=7), 1) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        D.create_loader(data, 0, shuffle=True, seed=0)


def test_refresh_sampler_sizes_a_distributed_sampler_for_a_dataset_that_changed_length():
    """The semi-supervised rounds change the training set's length (``set_data``); a ``DistributedSampler`` keeps
    the length it was built with and fails (``Number of indices (48) does not match total_size (8)``), or with
    drop_last samples the old length only, unless refreshed: afterwards it samples as one built on the new data
    does, on each of 2 ranks, with and without drop_last."""
    from monai.data import CacheDataset
    from torch.utils.data import DataLoader, DistributedSampler

    for drop_last in (False, True):
        dataset = CacheDataset([{"label": i} for i in range(8)], transform=None, progress=False)
        loaders = [DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, r, shuffle=True, seed=3,
                                                                                 drop_last=drop_last))
                   for r in range(2)]  # fmt: skip
        dataset.set_data([{"label": i} for i in range(13)])
        if drop_last:  # silently the first 8 of the 13 records' permutation only
            assert len(list(loaders[0].sampler)) == 4
        else:
            with pytest.raises(AssertionError, match="does not match total_size"):
                list(loaders[0].sampler)
        fresh = [DistributedSampler(list(range(13)), 2, r, shuffle=True, seed=3, drop_last=drop_last) for r in range(2)]
        for loader, expected in zip(loaders, fresh):
            D.refresh_sampler(loader)
            assert list(loader.sampler) == list(expected) and len(loader) == -(-len(expected) // 2)
        seen = [i for loader in loaders for i in loader.sampler]
        assert len(seen) == (12 if drop_last else 14) and set(seen) <= set(range(13))
    plain = DataLoader(list(range(5)), batch_size=2, shuffle=True)
    D.refresh_sampler(plain)  # another sampler: left alone
    assert len(plain) == 3
    x = torch.arange(4.0)
    assert D.broadcast_tensor(x) is x  # a single process: the tensor itself


def test_batch_size_above_the_training_set_is_a_clear_error():
    data = [{"image": torch.zeros(1, 2, 2), "label": i} for i in range(5)]
    with pytest.raises(ValueError, match=r"batch_size 8 is larger than the training set \(5 items\).*'batch_size'"):
        D.create_loader(data, 8, shuffle=True, seed=0, drop_last=True)
    assert len(D.create_loader(data, 5, shuffle=True, seed=0, drop_last=True)) == 1
    assert len(D.create_loader(data, 8, shuffle=True, seed=0)) == 1  # without drop_last the short batch is kept
    # a loader set by another id (the adversarial phase's) names that id
    with pytest.raises(ValueError, match=r"adversarial_batch_size 8 is larger .*'adversarial_batch_size' to at most 5"):
        D.create_loader(data, 8, shuffle=True, seed=0, drop_last=True, config_key="adversarial_batch_size")


def test_process_group_timeout_is_short_and_configurable(monkeypatch):
    """A stopped (not dead) rank makes the others fail after the timeout (default 600 s), not PyTorch's 30 min."""
    seen = {}
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(D, "is_distributed", lambda: bool(seen))
    monkeypatch.setattr(D, "get_rank", lambda: 0)
    monkeypatch.setattr(D, "get_world_size", lambda: 2)
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.init_distributed("gloo") and seen["timeout"].total_seconds() == 600
    seen.clear()
    monkeypatch.setenv(D.TIMEOUT_ENV, "45")
    assert D.init_distributed("gloo") and seen["timeout"].total_seconds() == 45
    seen.clear()
    assert D.init_distributed("gloo", timeout_s=7) and seen["timeout"].total_seconds() == 7
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
        D.process_group_timeout()


# ---------------------------------------------------------------- two gloo processes
def test_flow_two_processes_equal_one_process_float64(two_process_dir, worker, tmp_path):
    r0, r1 = _ranks(two_process_dir, "flow64")
    ref = _single(worker, "flow64", tmp_path, dtype=torch.float64)
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0
    assert _max_abs_diff(ref["state"], r0["state"]) < 1e-9
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal halves of the global batch
    assert len(global_losses) == len(ref["losses"]) == 4
    assert global_losses == pytest.approx(ref["losses"], abs=1e-9)
    assert r0["grad_norms"] == pytest.approx(ref["grad_norms"], abs=1e-9)  # norm of the all-reduced gradient
    assert r0["val_bpd"] == pytest.approx(ref["val_bpd"], abs=1e-9)  # BitsPerDim summed over both ranks


def test_flow_two_processes_equal_one_process_float32(two_process_dir, worker, tmp_path):
    r0, r1 = _ranks(two_process_dir, "flow")
    ref = _single(worker, "flow", tmp_path)
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0
    assert _max_abs_diff(ref["state"], r0["state"]) < 5e-3
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert global_losses == pytest.approx(ref["losses"], rel=1e-4)
    assert r0["val_bpd"] == pytest.approx(ref["val_bpd"], rel=1e-4)
    assert r0["skipped"] == r1["skipped"] == 0


def test_flow_with_compiled_steps_two_processes_equal_one_eager_process(two_process_dir, worker, tmp_path):
    # the bundle id ``compile`` under DDP: each rank trains through compiled flow steps (aot_eager: AOT autograd's
    # functions, no generated code; inductor under DDP was checked by hand, docs/performance.md)
    r0, r1 = _ranks(two_process_dir, "flow_compiled")
    ref = _single(worker, "flow", tmp_path)
    assert r0["compiled_calls"] > 0 and r1["compiled_calls"] > 0 and ref["compiled_calls"] == 0
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0
    assert _max_abs_diff(ref["state"], r0["state"]) < 5e-3
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert global_losses == pytest.approx(ref["losses"], rel=1e-4)
    assert r0["val_bpd"] == pytest.approx(ref["val_bpd"], rel=1e-4)


def test_nan_loss_on_one_rank_skips_the_step_on_both(two_process_dir):
    r0, r1 = _ranks(two_process_dir, "nan")
    assert torch.isnan(torch.tensor(r1["losses"][1])) and all(torch.isfinite(torch.tensor(r0["losses"])))
    assert r0["skipped"] == r1["skipped"] == 1  # rank 0's own loss was finite: the all-reduce made it skip
    assert r0["epoch"] == r1["epoch"] == 2  # no hang: both finished
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0  # had only rank 1 skipped, the replicas would differ
    flow = _ranks(two_process_dir, "flow")[0]
    assert _max_abs_diff(flow["state"], r0["state"]) > 1e-6  # the skipped step changed the trajectory


@pytest.mark.skipif(not HAS_CLASSIFIER, reason="monai_condflow.engines.classifier is not there yet")
def test_classifier_two_processes_equal_one_process(two_process_dir, worker, tmp_path):
    r0, r1 = _ranks(two_process_dir, "classifier")
    ref = _single(worker, "classifier", tmp_path)
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0
    assert _max_abs_diff(ref["state"], r0["state"]) < 1e-5
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert global_losses == pytest.approx(ref["losses"], rel=1e-5)


def test_torchrun_restart_after_crash_resumes_from_checkpoint(two_process_dir, worker, tmp_path):
    r0, r1 = _ranks(two_process_dir, "crash")
    log = (two_process_dir / "log.txt").read_text()
    # the one restart was spent on the injected crash, not on another failure of the first attempt
    assert "injected crash after epoch 2" in log, failure_summary(log)
    assert r0["restart_count"] == r1["restart_count"] == 1  # the first attempt crashed after epoch 2
    assert r0["epoch"] == 3 and len(r0["losses"]) == 2, failure_summary(log)  # the restart trained epoch 3 only
    ref = _single(worker, "crash_ref", tmp_path, max_epochs=3, dtype=torch.float64)  # uninterrupted, 1 process
    assert _max_abs_diff(ref["state"], r0["state"]) < 1e-9
    assert _max_abs_diff(r0["state"], r1["state"]) == 0.0


def test_failure_summary_keeps_the_failing_ranks_error_not_only_the_tail():
    log = "\n".join(
        ["[rank1]: Traceback (most recent call last):", "[rank1]:   File 'x.py', line 3", "[rank1]: KeyError: 'flow'"]
        + [f"[rank0]:   frame {i}" for i in range(400)]
        + ["[rank0]: RuntimeError: Connection closed by peer", "    exitcode  : 1 (pid: 7)"]
    )
    summary = failure_summary(log)
    assert "[rank1]: KeyError: 'flow'" in summary  # 400 frames later, the tail alone would have lost it
    assert "Connection closed by peer" in summary and "exitcode  : 1" in summary
    assert "frame" not in summary
