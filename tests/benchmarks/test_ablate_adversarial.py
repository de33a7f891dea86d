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
"""benchmarks/ablate_adversarial.py: arguments, and the fine-tuning through the package's trainer on a tiny flow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.benchmarks.script import load_benchmark

_spec = importlib.util.spec_from_file_location(
    "condflow_dist_worker", Path(__file__).parents[1] / "engines" / "dist_worker.py"
)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ablate_adversarial")


def test_arguments(bench, tmp_path):
    args = bench.parse_args([str(tmp_path), "--flow-runs", "a", "b", "--seeds", "1", "2", "--name", "n", "--out", "o"])
    assert args.seeds == [1, 2] and args.flow_runs == [Path("a"), Path("b")]
    assert (args.adv_weight, args.cls_weight, args.range_weight, args.steps) == (1.0, 1.0, 0.5, 300)
    assert args.priors == ["auto"] and args.fit_shrinkage is None and args.second_judge is False
    assert args.snapshots == []
    with pytest.raises(SystemExit):
        bench.parse_args([str(tmp_path), "--flow-runs", "a", "--seeds", "1", "2", "--name", "n", "--out", "o"])


class _Embed(torch.nn.Module):
    """A frozen stand-in for the conditioning classifier: ``embed`` = a fixed random projection, normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16 * 16, 32)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.proj(x.flatten(1)), dim=1)


def test_fine_tune_runs_the_package_trainer_and_returns_the_ema(bench, tmp_path, capsys):
    args = bench.parse_args(
        [str(tmp_path), "--flow-runs", "a", "--seeds", "0", "--name", "n", "--out", "o", "--steps", "4",
         "--batch", "8", "--log-every", "2", "--snapshots", "1", "3"]
    )  # fmt: skip
    data = W.make_flow_data(16, 0)
    images = torch.stack([d["image"] for d in data])
    classifier = _Embed()
    flow = W.make_flow(1)
    flow.initialize(images[:8], classifier.embed(images[:8]).detach())
    start = {k: v.clone() for k, v in flow.state_dict().items()}
    snapshots = {}

    def _snapshot(step, module):
        snapshots[step] = {k: v.clone() for k, v in module.state_dict().items()}

    ema, log = bench.fine_tune(flow, classifier, images, args, seed=0, snapshot=_snapshot)
    assert log["step"] == [2, 4] and len(log["d_loss"]) == 2 and log["seconds"] > 0
    assert "seed 0 step 4" in capsys.readouterr().out
    assert not ema.training and ema is not flow
    assert any(not torch.equal(start[k], v) for k, v in ema.state_dict().items())
    # the snapshots are the EMA at steps 1 and 3: different from each other and from the final EMA (step 4)
    assert sorted(snapshots) == [1, 3]
    final = ema.state_dict()
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in final)
    assert any(not torch.equal(snapshots[3][k], v) for k, v in final.items())


def test_run_folder_links_the_base_run_and_copies_the_flow_record(bench, tmp_path):
    base = tmp_path / "base"
    for name in ("data", "classifier"):
        (base / name).mkdir(parents=True)
        (base / name / "marker").write_text(name)
    record = tmp_path / "flow.json"
    record.write_text('{"preset": "small"}')
    folder = bench._run_folder(tmp_path / "out" / "step300", base, record)
    assert (folder / "data").is_symlink() and (folder / "classifier" / "marker").read_text() == "classifier"
    assert (folder / "flow" / "flow.json").read_text() == '{"preset": "small"}'
    record.write_text('{"preset": "paper"}')  # called again (a rerun): links kept, the record copied anew
    bench._run_folder(folder, base, record)
    assert (folder / "flow" / "flow.json").read_text() == '{"preset": "paper"}'
