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
"""create_flow_trainer is the bundle's train_flow.json: a change to the config changes the Python trainer."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.handlers import LrScheduleHandler, TensorBoardStatsHandler, ValidationHandler

import monai_condflow.utils.bundle as bundle_module
from monai_condflow.engines.flow import FlowTrainer
from monai_condflow.engines.flow_trainer import FLOW_CONFIGS, create_flow_trainer
from monai_condflow.handlers.sample_grid import SampleGridHandler
from monai_condflow.utils.bundle import BUNDLE_ROOT, read_bundle_config
from monai_condflow.utils.distributed import create_loader

_spec = importlib.util.spec_from_file_location("condflow_dist_worker", Path(__file__).with_name("dist_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _loaders():
    train = create_loader(W.make_flow_data(16, 0), 8, shuffle=True, seed=3)
    val = create_loader(W.make_flow_data(8, 1), 8, shuffle=False, seed=3)
    return train, val


def _attached(engine) -> list:
    """The handler objects attached to ``engine`` (bound methods give their object)."""
    return [getattr(h, "__self__", h) for e in engine._event_handlers for h, _, _ in engine._event_handlers[e]]


def _edited_bundle(tmp_path: Path, edit) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", root / "configs")
    path = root / "configs" / "train_flow.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return root


def test_the_python_trainer_follows_the_bundle_config(tmp_path, monkeypatch):
    """an optimiser swapped in train_flow.json is the optimiser of create_flow_trainer's trainer."""
    train, val = _loaders()
    args = {"device": "cpu", "max_epochs": 1, "warmup_epochs": 0, "seed": 5, "tensorboard": False}
    trainer, _ = create_flow_trainer(W.make_flow(1), None, train, val, output_dir=tmp_path / "a", **args)
    assert type(trainer.optimizer) is torch.optim.AdamW
    trainer.run()

    root = _edited_bundle(tmp_path, lambda c: c["optimizer"].update({"_target_": "torch.optim.Adam"}))
    monkeypatch.setattr(bundle_module, "BUNDLE_ROOT", root)
    trainer, _ = create_flow_trainer(W.make_flow(1), None, train, val, output_dir=tmp_path / "b", **args)
    assert type(trainer.optimizer) is torch.optim.Adam
    assert trainer.optimizer.defaults["betas"] == (0.5, 0.999)  # the argument, set as the config id
    trainer.run()
    assert (tmp_path / "b" / "model.pt").is_file()


def test_arguments_become_config_ids_and_switch_components(tmp_path):
    train, val = _loaders()
    args = {"device": "cpu", "max_epochs": 2, "seed": 5}
    trainer, evaluator = create_flow_trainer(
        W.make_flow(1), None, train, val, output_dir=tmp_path / "full", lr=3e-4, betas=(0.9, 0.99), ema_decay=0.5,
        sample_every=1, tensorboard_dir=tmp_path / "tb", **args,
    )  # fmt: skip
    assert isinstance(trainer, FlowTrainer) and trainer.optimizer.defaults["betas"] == (0.9, 0.99)
    assert trainer.optimizer.defaults["lr"] == pytest.approx(3e-4) and trainer.ema.decay == 0.5
    assert evaluator.network.flow is trainer.ema.module
    kinds = {type(h) for h in _attached(trainer)}
    assert {ValidationHandler, TensorBoardStatsHandler, SampleGridHandler, LrScheduleHandler} <= kinds
    trainer.run()
    assert sorted(p.name for p in (tmp_path / "full" / "samples").iterdir())  # the sample grid handler ran
    assert any((tmp_path / "tb").iterdir())

    # no validation loader, no TensorBoard, no EMA, no grids: those components are off, training still checkpoints
    bare, none = create_flow_trainer(W.make_flow(1), None, train, None, output_dir=tmp_path / "bare", tensorboard=False,
                                     **args)  # fmt: skip
    assert none is None and bare.ema is None
    attached = _attached(bare)
    assert not any(isinstance(h, (ValidationHandler, TensorBoardStatsHandler, SampleGridHandler)) for h in attached)
    assert any(isinstance(h, LrScheduleHandler) for h in attached)
    bare.run()
    bare_dir = tmp_path / "bare"
    assert (bare_dir / "state_checkpoint_epoch=2.pt").is_file() and not (bare_dir / "model.pt").exists()
    assert not (bare_dir / "tensorboard").exists()


def test_read_bundle_config_names_a_missing_file(tmp_path):
    parser = read_bundle_config(FLOW_CONFIGS)
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_bundle_config([*FLOW_CONFIGS, "nope.json"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_bundle_config(FLOW_CONFIGS, bundle_root=tmp_path)


def test_a_config_whose_handlers_changed_shape_is_refused_by_name(tmp_path, monkeypatch):
    """the builder finds handlers by their _target_, not by position; an ambiguous list is an error, not a guess."""
    root = _edited_bundle(tmp_path, lambda c: c["train"]["handlers"].append(dict(c["train"]["handlers"][3])))
    monkeypatch.setattr(bundle_module, "BUNDLE_ROOT", root)
    train, val = _loaders()
    with pytest.raises(KeyError, match="'train#handlers' must hold exactly one TensorBoardStatsHandler, found 2"):
        create_flow_trainer(W.make_flow(1), None, train, val, device="cpu", max_epochs=1, output_dir=tmp_path / "x",
                            tensorboard=False)  # fmt: skip
    assert not (tmp_path / "x" / "tensorboard").exists()


@pytest.mark.parametrize("train_shift", [0, 2])
def test_the_flow_training_set_is_cached_without_copies_and_stays_unchanged(train_shift):
    """train_flow.json caches the training set's deterministic chain (with the shift too: the chain is flattened, so
    the cache does not stop at a nested ``Compose``) with ``copy_cache`` false (MONAI otherwise deep-copies every
    cached item at every draw: ~80 us of the ~250 us an item took on 2 cores, host time a GPU step waits for); the
    random transforms after the cache (the dequantisation, the optional shift) make new tensors, so two epochs leave
    the cache as it was while the batches still differ."""
    import copy

    import numpy as np
    from monai.bundle import ConfigParser

    config = json.loads((BUNDLE_ROOT / "configs" / "train_flow.json").read_text())
    assert config["train"]["dataset"]["copy_cache"] is False
    rng = np.random.default_rng(0)
    records = [{"image": rng.random((32, 32), dtype=np.float32), "label": i % 2} for i in range(8)]
    import monai

    import monai_condflow.transforms

    parser = ConfigParser(
        {"n_bits": 8, "train_shift": train_shift, "train": {"data": records, "dataset": config["train"]["dataset"],
                                                              "preprocessing": config["train"]["preprocessing"]}},
        globals={"monai": monai, "monai_condflow": monai_condflow},
    )  # fmt: skip
    dataset = parser.get_parsed_content("train#dataset")
    for item in dataset._cache:  # the deterministic chain was cached (the random transforms come after it)
        assert type(item["image"]) is torch.Tensor and item["image"].shape == (1, 32, 32)
        assert item["image"].dtype == torch.float32
    cached = copy.deepcopy(dataset._cache)
    loader = create_loader(dataset, 4, shuffle=True, seed=0, drop_last=True)
    epochs = [torch.cat([b["image"] for b in loader]) for _ in range(2)]
    assert len(dataset._cache) == 8 and not torch.equal(epochs[0], epochs[1])
    for item, before in zip(dataset._cache, cached):
        assert item.keys() == before.keys()
        assert torch.equal(torch.as_tensor(item["image"]), torch.as_tensor(before["image"]))


def test_deterministic_false_autotunes_cudnn_and_a_bad_value_is_refused_before_the_folder(tmp_path):
    from monai_condflow.utils.checks import ConfigValueError

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    train, val = _loaders()
    args = {"device": "cpu", "max_epochs": 1, "seed": 5, "tensorboard": False}
    try:
        for deterministic in (False, True):
            trainer, _ = create_flow_trainer(W.make_flow(1), None, train, val, output_dir=tmp_path / str(deterministic),
                                             deterministic=deterministic, **args)  # fmt: skip
            trainer.output_lock.release()
            assert torch.backends.cudnn.deterministic is deterministic
            assert torch.backends.cudnn.benchmark is (not deterministic)
        with pytest.raises(ConfigValueError, match="'deterministic'"):
            create_flow_trainer(W.make_flow(1), None, train, val, output_dir=tmp_path / "bad", deterministic="no",
                                **args)  # fmt: skip
        assert not (tmp_path / "bad").exists()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
