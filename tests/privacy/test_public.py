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
"""Public pretraining: loading pretrained weights safely and installing a public classifier at epsilon 0."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from monai_condflow.engines.stages import load_classifier, privacy_spent
from monai_condflow.handlers.checkpoint import CheckpointError
from monai_condflow.networks.nets import PEPXNet
from monai_condflow.privacy.public import (
    file_sha256,
    install_public_classifier,
    load_pretrained_weights,
    select_trainable,
)


def _pepx(classes: int, seed: int) -> PEPXNet:
    torch.manual_seed(seed)
    return PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=classes)


def _perturb(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    return net


def test_none_leaves_the_module_unchanged():
    net = _pepx(2, 0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert load_pretrained_weights(net, None) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("wrapped", [True, False])
def test_every_tensor_is_loaded(tmp_path: Path, wrapped: bool):
    source = _perturb(_pepx(2, 0))
    path = tmp_path / "model.pt"
    torch.save({"network": source.state_dict()} if wrapped else source.state_dict(), path)
    target = _pepx(2, 1)
    load_pretrained_weights(target, path)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    x = torch.rand(2, 1, 64, 64)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_a_head_of_another_class_count_keeps_its_fresh_init(tmp_path: Path):
    source = _perturb(_pepx(3, 0))  # e.g. a three-class public classifier
    torch.save({"network": source.state_dict()}, tmp_path / "model.pt")
    target = _pepx(2, 1)
    fresh_head = target.head.weight.clone()
    with pytest.raises(CheckpointError, match=r"shape mismatch: head\.weight, head\.bias"):
        load_pretrained_weights(target, tmp_path / "model.pt")  # not allowed unless named
    load_pretrained_weights(target, tmp_path / "model.pt", fresh_prefixes=("head.",))
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.embedding.weight, source.embedding.weight)
    x = torch.rand(2, 1, 64, 64)
    source.eval(), target.eval()
    assert torch.equal(source.embed(x), target.embed(x))  # the embedding z is the public one


def test_a_checkpoint_of_another_network_names_the_file_and_the_keys(tmp_path: Path):
    state = _pepx(2, 0).state_dict()
    missing = {k: v for k, v in state.items() if k != "embedding.bias"}
    torch.save({"network": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt does not fit the PEPXNet: missing: embedding\.bias"):
        load_pretrained_weights(_pepx(2, 1), tmp_path / "missing.pt")
    torch.save({"network": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected: extra\.weight"):
        load_pretrained_weights(_pepx(2, 1), tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_pretrained_weights(_pepx(2, 1), tmp_path / "absent.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"network": _Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pretrained_weights(_pepx(2, 0), path)


def _public_run(root: Path, classes: int = 2, **info) -> PEPXNet:
    net = _perturb(_pepx(classes, 0))
    folder = root / "classifier"
    folder.mkdir(parents=True)
    torch.save({"network": net.state_dict()}, folder / "model.pt")
    desc = {"preset": "small", "num_classes": classes, "image_size": 64, "class_map": "binary", "num_labels": "all",
            **info}  # fmt: skip
    (folder / "classifier.json").write_text(json.dumps(desc))
    return net


def test_install_public_classifier_copies_it_and_spends_nothing(tmp_path: Path):
    public = tmp_path / "run" / "public"
    net = _public_run(public)
    out = tmp_path / "run"
    (out / "classifier").mkdir(parents=True)
    (out / "classifier" / "train_labels.json").write_text("[]")  # left by an earlier private run in this folder
    target = install_public_classifier(public, out, num_classes=2, image_size=64, class_map="binary")
    source = public / "classifier" / "model.pt"
    assert target.read_bytes() == source.read_bytes()
    assert file_sha256(target) == hashlib.sha256(source.read_bytes()).hexdigest()
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    assert info["public"]["sha256"] == file_sha256(source) and info["public"]["source"] == str(source.resolve())
    assert info["dp"]["epsilon"] == 0.0 and info["dp"]["delta"] == 0.0 and info["dp"]["public"] is True
    assert not (out / "classifier" / "train_labels.json").exists()
    loaded = load_classifier(out)
    x = torch.rand(2, 1, 64, 64)
    net.eval()
    assert torch.equal(loaded.embed(x), net.embed(x))
    # with a DP flow beside it, the run's epsilon is the flow's alone
    (out / "flow").mkdir()
    (out / "flow" / "flow.json").write_text(json.dumps({"dp": {"epsilon": 9.5, "delta": 1e-5}}))
    spent = privacy_spent(out)
    assert spent["epsilon"] == pytest.approx(9.5) and spent["delta"] == pytest.approx(1e-5)
    assert "public data only" in spent["covers"]


def test_install_public_classifier_refuses_what_does_not_fit(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        install_public_classifier(tmp_path / "nothing", tmp_path / "out")
    _public_run(tmp_path / "three", classes=3)
    with pytest.raises(ValueError, match="num_classes=3, the private run needs 2"):
        install_public_classifier(tmp_path / "three", tmp_path / "out", num_classes=2)
    with pytest.raises(ValueError, match="unknown public classifier setting"):
        install_public_classifier(tmp_path / "three", tmp_path / "out", classes=3)
    _public_run(tmp_path / "dp", dp={"epsilon": 3.0, "delta": 1e-5})
    with pytest.raises(ValueError, match="DP-SGD classifier"):
        install_public_classifier(tmp_path / "dp", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def _tiny_flow():
    from monai_condflow.networks.nets import ConditionalGlow

    torch.manual_seed(0)
    return ConditionalGlow.from_preset(
        "small", num_levels=2, image_size=16, num_steps=2, num_blocks=(1, 1), hidden_channels=8
    )


def _by_type(flow) -> tuple[set[str], set[str], set[str]]:
    from monai_condflow.networks.blocks.actnorm import ActNorm
    from monai_condflow.networks.blocks.invertible_conv import InvertibleConv1x1

    act, diag, linear = set(), set(), set()
    for prefix, m in flow.named_modules():
        for n, _ in m.named_parameters(recurse=False):
            full = f"{prefix}.{n}"
            if isinstance(m, ActNorm):
                act.add(full)
            elif isinstance(m, InvertibleConv1x1) and n == "log_abs_s":
                diag.add(full)
            elif isinstance(m, torch.nn.Linear):
                linear.add(full)
    assert act and diag and linear
    return act, diag, linear


@pytest.mark.parametrize("preset", ["all", "affine", "conditioning"])
def test_select_trainable_presets(preset):
    flow = _tiny_flow()
    act, diag, linear = _by_type(flow)
    expected = {
        "all": {n for n, _ in flow.named_parameters()},
        "affine": act | diag,
        "conditioning": act | diag | linear,
    }[preset]
    assert select_trainable(flow, preset) is flow
    assert {n for n, p in flow.named_parameters() if p.requires_grad} == expected
    if preset != "all":
        assert any(not p.requires_grad for p in flow.parameters())


def test_select_trainable_patterns_and_errors():
    flow = _tiny_flow()
    select_trainable(flow, ["*.log_scale", "*cond_proj.bias"])
    chosen = {n for n, p in flow.named_parameters() if p.requires_grad}
    assert chosen and all(n.endswith(("log_scale", "cond_proj.bias")) for n in chosen)
    select_trainable(flow, "all")  # unfreezes again
    assert all(p.requires_grad for p in flow.parameters())
    with pytest.raises(ValueError, match="one of"):
        select_trainable(flow, "everything")
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(flow, ["nothing.*"])
