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
"""Precision modes: the TF32 switches, the bf16 coupling autocast (what it changes and what it keeps exact), and
the trainer's ``precision`` setting."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.engines.flow import FlowBitsPerDim, FlowTrainer
from monai_condflow.networks.blocks.coupling import ConditionalAffineCoupling, set_coupling_dtype
from monai_condflow.networks.nets.conditional_glow import ConditionalGlow
from monai_condflow.utils.checks import ConfigValueError
from monai_condflow.utils.precision import PRECISIONS, _restore_tf32, check_precision, precision_context, tf32_state

S = 16


def _flow() -> tuple[ConditionalGlow, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    flow = ConditionalGlow.from_preset("small", num_levels=2, image_size=S, num_steps=2, num_blocks=(1, 1),
                                       hidden_channels=16)  # fmt: skip
    x = torch.rand(6, 1, S, S)
    z = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    flow.initialize(x, z)
    with torch.no_grad():  # the coupling nets start as zero maps: give them an output, or bf16 changes nothing
        for name, p in flow.named_parameters():
            if "conv_out" in name:
                p.normal_(0, 0.05)
    return flow.eval(), x, z


def test_check_precision_names_the_config_id():
    assert check_precision("bf16") == "bf16"
    with pytest.raises(ConfigValueError, match="'precision'.*fp16"):
        check_precision("fp16")


def test_precision_context_sets_the_tf32_switches_and_restores_them():
    """Inside the block both forms of PyTorch's TF32 settings read back what the mode sets (code such as
    torch.compile reads the legacy flags; setting only some per-backend values made torch refuse to read them, which
    raised inside every default "tf32" step); after it every per-backend value is as before, also when a user had
    set one of them on its own (the legacy flags then stay unreadable, as they were)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before, root = tf32_state(), torch.backends.fp32_precision
    try:
        with precision_context("tf32"):
            assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
            assert torch.backends.cudnn.allow_tf32 and matmul.allow_tf32
            assert torch.get_float32_matmul_precision() == "high"
            with precision_context("fp32"):
                assert not torch.backends.cudnn.allow_tf32 and not matmul.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
                assert conv.fp32_precision != "tf32" and matmul.fp32_precision == "ieee"
            assert conv.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError, match="restored after an error"), precision_context("bf16"):
            assert conv.fp32_precision != "tf32" and not torch.backends.cudnn.allow_tf32  # the rest in strict fp32
            raise RuntimeError("restored after an error too")
        assert tf32_state() == before
        conv.fp32_precision = "ieee"  # a user's per-backend setting, apart from the legacy flag
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # noqa: B018 - torch refuses to read it now
        user = tf32_state()
        for mode in PRECISIONS:
            with precision_context(mode):
                assert torch.backends.cudnn.allow_tf32 == (mode == "tf32")
            assert tf32_state() == user
        _restore_tf32(before)
        # a user's parent setting of TF32 (the per-backend API) or lowered matmul precision (the legacy one): the
        # strict modes are still strict inside, and the settings come back
        for user_setting in (lambda: setattr(torch.backends, "fp32_precision", "tf32"),
                             lambda: torch.set_float32_matmul_precision("high")):  # fmt: skip
            user_setting()
            user = tf32_state()
            for mode in ("fp32", "bf16"):
                with precision_context(mode):
                    assert conv.fp32_precision != "tf32" and torch.backends.cudnn.rnn.fp32_precision != "tf32"
                    assert matmul.fp32_precision == "ieee" and torch.get_float32_matmul_precision() == "highest"
                assert tf32_state()[2] == user[2]  # every per-backend value as the user left it
            torch.backends.fp32_precision = root  # the test's own parent setting (the block never changes it)
            _restore_tf32(before)
    finally:
        torch.backends.fp32_precision = root
        _restore_tf32(before)
    assert tf32_state() == before


def test_bf16_couplings_change_the_network_not_the_exactness_of_the_bookkeeping():
    flow, x, z = _flow()
    with torch.no_grad():
        nu32, ld32 = flow(x, z)
        assert set_coupling_dtype(flow, torch.bfloat16) == sum(
            isinstance(m, ConditionalAffineCoupling) for m in flow.modules()
        ) > 0
        nu16, ld16 = flow(x, z)
        x_back, ld_inv = flow.inverse(nu16, z)
    assert nu16.dtype == torch.float32 and ld16.dtype == torch.float32  # cast back before the affine transform
    assert (nu16 - nu32).abs().max() > 1e-4  # the coupling nets really ran in bf16
    assert (x_back - x).abs().max() < 1e-2  # the round-trip bound
    assert (ld16 + ld_inv).abs().max() < 0.05 * ld16.abs().max()
    with torch.no_grad():
        bpd16 = flow.bits_per_dim(x, z)
        set_coupling_dtype(flow, None)
        assert torch.equal(flow(x, z)[0], nu32)  # back to full precision exactly
        assert (bpd16 - flow.bits_per_dim(x, z)).abs().max() < 0.01  # within 0.01 bits/dim of fp32


def test_bf16_log_det_matches_the_brute_force_jacobian_of_the_bf16_map():
    """The log-determinant stays that of the map actually computed (in float64 the autocast is inert, so this
    checks the bookkeeping path of ``_net`` with a cast back: ``float64 -> autocast -> float64``)."""
    torch.manual_seed(3)
    layer = ConditionalAffineCoupling(2, 2, 4, 8).double()
    with torch.no_grad():
        layer.net.conv_out.weight.normal_(0, 0.3)
    layer.compute_dtype = torch.bfloat16
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    z = torch.randn(1, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t.view(1, 2, 2, 2), z)[0].reshape(-1), x.reshape(-1))
    _, logdet = layer(x, z)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac)[1].view(1), atol=1e-10)


def _trainer(precision: str, cuda_graphs: bool = False, **kwargs) -> FlowTrainer:
    flow, x, z = _flow()
    loader = [{"image": x, "condition": z}]
    net = FlowBitsPerDim(flow.train(), cuda_graphs=cuda_graphs)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    return FlowTrainer("cpu", 1, loader, net, opt, precision=precision, **kwargs)


def test_trainer_precision_bf16_puts_the_couplings_under_autocast_and_trains():
    trainer = _trainer("bf16")
    couplings = [m for m in trainer.network.flow.modules() if isinstance(m, ConditionalAffineCoupling)]
    assert couplings and all(m.compute_dtype == torch.bfloat16 for m in couplings)
    trainer.run()
    assert trainer.state.iteration == 1 and trainer.state.skipped_steps == 0
    assert torch.isfinite(trainer.state.output["loss"])


def test_trainer_refuses_a_bad_precision_and_bf16_under_dp():
    with pytest.raises(ConfigValueError, match="precision"):
        _trainer("half")
    with pytest.raises(ValueError, match="DP-SGD.*bf16"):
        _trainer("bf16", dp_module=torch.nn.Linear(1, 1))


def test_cuda_graphs_on_the_cpu_warn_and_train_eagerly(caplog):
    trainer = _trainer("tf32", cuda_graphs=True)
    assert "CUDA graphs need a GPU" in caplog.text
    trainer.run()
    assert trainer.network.graphed is None and trainer.state.iteration == 1
    with pytest.raises(ValueError, match="cuda_graphs"):
        FlowBitsPerDim(torch.nn.Identity(), cuda_graphs="yes")
