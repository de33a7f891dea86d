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
"""Issue 16: export as docs/export.md shows it. ``monai.bundle ckpt_export`` of the classifier checkpoint
(TorchScript), ``verify_net_in_out`` of both networks (the flow's condition through ``extra_forward_args``), and the
flow's ``sample`` / ``log_prob`` from the bundle config through ``torch.export``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser, verify_net_in_out

from monai_condflow.pipeline import BUNDLE_ROOT

CONFIGS = BUNDLE_ROOT / "configs"
META = CONFIGS / "metadata_classifier.json"  # the classifier's network_data_format (metadata.json: the flow's)


def _stack(config: str) -> str:
    """The config list a stage runs with: ``common.json`` first."""
    return json.dumps([str(CONFIGS / "common.json"), str(CONFIGS / config)])


def _parsed(config: str, net_id: str, **overrides) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.json"), str(CONFIGS / config)])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content(net_id)


def test_ckpt_export_of_the_classifier_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    net = _parsed("train_classifier.json", "network_def").eval()
    torch.save({"network": net.state_dict()}, tmp_path / "model.pt")  # the stage's checkpoint layout
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
           "--ckpt_file", str(tmp_path / "model.pt"), "--key_in_ckpt", "network", "--meta_file", str(META),
           "--config_file", _stack("train_classifier.json"), "--bundle_root", str(BUNDLE_ROOT)]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
    assert json.loads(extra["metadata.json"])["version"] == json.loads(META.read_text())["version"]


def test_verify_net_in_out_for_the_classifier_python_api():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "train_classifier.json")],
        device="cpu",
        bundle_root=str(BUNDLE_ROOT),
    )


def test_flow_config_ids_export_with_torch_export():
    small = {"image_size": 32, "flow_overrides": {"num_steps": 2, "num_blocks": 1, "hidden_channels": 8}}
    sampler = _parsed("train_flow.json", "decoder_def", **small).eval()
    log_prob = _parsed("train_flow.json", "log_prob_def", **small).eval()
    z = torch.nn.functional.normalize(torch.randn(1, 32), dim=1)
    exported = torch.export.export(sampler, (torch.randn(1, 1, 32, 32), z)).module()
    with torch.no_grad():
        out = exported(torch.randn(1, 1, 32, 32), z)
        assert out.shape == (1, 1, 32, 32) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        x = torch.rand(1, 1, 32, 32)
        lp = torch.export.export(log_prob, (x, z)).module()
        torch.testing.assert_close(lp(x, z), log_prob(x, z), rtol=1e-5, atol=1e-3)
