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
"""The flow stage's end: model.pt gets the fitted sampling prior (not under DP-SGD, not with shrinkage null)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from monai_condflow.engines.flow_trainer import create_flow_trainer
from monai_condflow.engines.prepare_batch import ConditionPrepareBatch
from monai_condflow.engines.stages import finish_flow_stage
from monai_condflow.handlers.checkpoint import load_checkpoint
from monai_condflow.utils.checks import ConfigValueError, check_shrinkage
from monai_condflow.utils.distributed import create_loader

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    data = W.make_flow_data(16, 0)
    train = create_loader(data, 8, shuffle=True, seed=3)
    args = {"device": "cpu", "max_epochs": 1, "output_dir": out, "warmup_epochs": 1, "lr": 1e-3, "seed": 5,
            "tensorboard": False, "n_saved": 1}  # fmt: skip
    trainer, _ = create_flow_trainer(W.make_flow(1), None, train, None, **args)
    trainer.run()
    finish_flow_stage(out, trainer.network.flow, {"preset": "tiny"})  # no validation: the last epoch's weights
    return out, trainer.network.flow, data


@pytest.mark.parametrize("dp, shrinkage", [(False, 0.2), (True, 0.2), (False, None)])
def test_finish_fits_the_sampling_prior_unless_dp_or_switched_off(trained, tmp_path, dp, shrinkage):
    src, flow, data = trained
    (tmp_path / "model.pt").write_bytes((src / "model.pt").read_bytes())
    if dp:
        (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": 4.0}))
    before = load_checkpoint(tmp_path / "model.pt")["network"]
    spec = {"dataset": data, "prepare_batch": ConditionPrepareBatch(), "shrinkage": shrinkage, "seed": 0}
    finish_flow_stage(tmp_path, flow, {"preset": "tiny"}, sampling_prior=spec)
    info = json.loads((tmp_path / "flow.json").read_text())
    after = load_checkpoint(tmp_path / "model.pt")["network"]
    fitted = after["sampling_prior.scale_tril"].numel() > 0
    if dp or shrinkage is None:
        assert not fitted
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert ("sampling_prior" in info) == dp
        if dp:
            assert info["sampling_prior"] == {"fitted": False, "reason": "DP-SGD run: the fit is not private"}
        return
    assert fitted and info["sampling_prior"]["fitted"] and info["sampling_prior"]["count"] == len(data)
    assert info["sampling_prior"]["shrinkage"] == shrinkage
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("sampling_prior."))
    # the fit is the one of the flow's own method on the same images and conditions
    reference = W.make_flow(1)
    reference.load_state_dict(before)
    batch = [(torch.stack([d["image"] for d in data]), torch.stack([d["condition"] for d in data]))]
    reference.fit_sampling_prior(batch, shrinkage=shrinkage, noise_generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reference.sampling_prior.scale_tril, after["sampling_prior.scale_tril"], atol=1e-4)


def test_shrinkage_config_value_is_checked_by_name():
    assert check_shrinkage(None) is None and check_shrinkage(1) == 1.0 and check_shrinkage(0.1) == 0.1
    for bad in (0, -0.5, 1.01, True, "0.1"):
        with pytest.raises(ConfigValueError, match="config id 'sampling_prior_shrinkage' must be a number in"):
            check_shrinkage(bad)


def test_a_failed_fit_keeps_the_trained_model_and_says_why(trained, tmp_path):
    src, flow, data = trained
    (tmp_path / "model.pt").write_bytes((src / "model.pt").read_bytes())
    before = load_checkpoint(tmp_path / "model.pt")["network"]
    bad = [dict(d) for d in data]
    bad[3]["image"] = torch.full_like(bad[3]["image"], float("nan"))  # a NaN slice: non-finite latents
    spec = {"dataset": bad, "prepare_batch": ConditionPrepareBatch(), "shrinkage": 0.2, "seed": 0}
    finish_flow_stage(tmp_path, flow, {"preset": "tiny"}, sampling_prior=spec)
    info = json.loads((tmp_path / "flow.json").read_text())
    assert info["sampling_prior"]["fitted"] is False and "non-finite" in info["sampling_prior"]["reason"]
    after = load_checkpoint(tmp_path / "model.pt")["network"]
    assert all(torch.equal(before[k], after[k]) for k in before)
