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
"""benchmarks/novelty_ratio.py: the flow cache and the early-epoch snapshots used as a background model."""

from __future__ import annotations

import pytest
import torch

from monai_condflow.networks.nets import ConditionalGlow
from tests.benchmarks.script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("novelty_ratio")


def _tiny(seed: int = 0) -> ConditionalGlow:
    torch.manual_seed(seed)
    return ConditionalGlow.from_preset(
        "small", image_size=16, condition_dim=0, num_levels=2, num_steps=1, num_blocks=(1, 1), hidden_channels=4
    )


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(64, 1, 16, 16, generator=g) * 255).round() / 255


def test_cached_flow_saves_the_final_and_early_weights_and_reuses_them(bench, tmp_path):
    flow = _tiny()
    bpd = bench._cached_flow(flow, _images(), 2, 0, tmp_path, "main", bench.EARLY_EPOCHS, 1)
    final, early = tmp_path / "main_s0_e2.pt", tmp_path / "main_s0_e2_at1.pt"
    assert final.is_file() and early.is_file()
    saved_final = torch.load(final, weights_only=True)
    saved_early = torch.load(early, weights_only=True)
    assert saved_final["train_bpd"] == pytest.approx(bpd)
    assert any(not torch.equal(saved_final["network"][k], v) for k, v in saved_early["network"].items())
    for k, v in flow.state_dict().items():
        assert torch.equal(saved_final["network"][k], v)
    # a second call loads instead of training: another initialisation ends with the cached weights, no training
    again = _tiny(seed=5)
    calls = []
    real = bench.train_flow
    bench.train_flow = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert bench._cached_flow(again, _images(), 2, 0, tmp_path, "main", bench.EARLY_EPOCHS, 1) == pytest.approx(bpd)
    finally:
        bench.train_flow = real
    assert not calls
    for k, v in again.state_dict().items():
        assert torch.equal(saved_final["network"][k], v)


def test_early_background_needs_a_cache(bench):
    with pytest.raises(ValueError, match="--cache"):
        bench._cached_flow(_tiny(), _images(), 2, 0, None, "main", need=1)


def test_heat_figures_against_maps_with_a_known_answer(bench, monkeypatch, tmp_path):
    """Paired slices whose findings are a known 16 x 16 block: a map that is exactly the findings puts all its
    extra bits and all its top pixels there (enrichment = 1 / area); a map that ignores the image puts its share at
    about the block's area."""
    import counterfactual_paired  # benchmarks/ is on sys.path once the benchmark is loaded

    without = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    with_f = without.clone()
    with_f[..., 8:24, 8:24] += 0.3
    pairs = {"with": with_f, "without": without, "mask": torch.ones_like(with_f, dtype=torch.bool)}
    monkeypatch.setattr(counterfactual_paired, "paired_slices", lambda n, seed, image_size: pairs)
    reference = torch.zeros(5, 1, 32, 32)
    monkeypatch.setattr(bench, "novelty_map", lambda main, x, c, bg: (x - without[: len(x)])[:, 0].double()
                        if len(x) == 40 else torch.zeros(len(x), 32, 32, dtype=torch.float64))  # fmt: skip
    figure = tmp_path / "heat.png"
    got = bench.heat_figures(None, None, reference, figure)
    assert got["finding_area"] == pytest.approx(0.25)
    assert got["paired_share"] == pytest.approx(1.0) and got["top200_share"] == pytest.approx(1.0)
    assert got["paired_enrichment"] == pytest.approx(4.0)
    assert figure.is_file()
    noise = torch.rand(40, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    monkeypatch.setattr(bench, "novelty_map", lambda main, x, c, bg: noise[: len(x)] if len(x) == 40 else
                        torch.zeros(len(x), 32, 32, dtype=torch.float64))  # fmt: skip
    blind = bench.heat_figures(None, None, reference)
    assert blind["paired_share"] == pytest.approx(0.0)  # the same map with and without findings: no extra bits
    assert abs(blind["top200_share"] - 0.25) < 0.05


def test_npz_splits_are_patient_disjoint_with_the_novel_class_in_test(bench, tmp_path):
    import numpy as np

    # class 0: patients a, b; class 1 (the novel one): patient c; class 2: patients d, e
    patients = np.array(["a"] * 8 + ["b"] * 4 + ["c"] * 5 + ["d"] * 8 + ["e"] * 3)
    labels = np.array([0] * 12 + [1] * 5 + [2] * 11)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=labels, patient_ids=patients)
    for fold, held in ((0, {"a", "d"}), (1, {"b", "e"})):
        splits = bench.load_npz_splits(tmp_path / "set.npz", novel_class=1, fold=fold)
        index = {k: (v[0][:, 0, 0, 0] * 255).round().long().tolist() for k, v in splits.items()}
        kept = {k: {patients[i] for i in idx} for k, idx in index.items()}
        train_val = kept["train"] | kept["val"]
        assert train_val == {"a", "b", "d", "e"} - held  # the held-out patients never train nor serve as reference
        test_known = {patients[i] for i, y in zip(index["test"], splits["test"][1].tolist()) if y < 2}
        assert test_known == held
        novel = [i for i, y in zip(index["test"], splits["test"][1].tolist()) if y == 2]
        assert sorted(novel) == list(range(12, 17))  # every slice of the novel class, labelled 2
        # known classes relabelled 0 (class 0) and 1 (class 2); every 4th training slice is the reference
        both = sorted(index["train"] + index["val"])
        assert len(index["val"]) == len(both[::4]) and not set(index["val"]) & set(index["train"])
        assert all(labels[i] == (0 if y == 0 else 2) for i, y in zip(index["train"], splits["train"][1].tolist()))
    with pytest.raises(ValueError, match="two known classes"):
        bench.load_npz_splits(tmp_path / "set.npz", novel_class=7, fold=0)


def test_max_softmax_score_by_hand(bench):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.log(x.flatten(1)[:, :2])  # softmax = the first two pixels, normalised

    x = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.3, 0.7]]).reshape(3, 1, 1, 2)
    expected = torch.tensor([0.1, 0.5, 0.3], dtype=torch.float64)
    assert torch.allclose(bench.max_softmax_score(Fixed(), x), expected, atol=1e-6)


def test_perturbed_background_training_sees_replaced_pixels(bench, monkeypatch):
    """With ``perturb`` the flow is fed images in which about that share of pixels was replaced by noise; without
    it, the dequantised originals (every value within 1/256 of the image's)."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, x, z):
            seen.append(x.detach().clone())
            return self.flow.log_prob(x, z).neg() / x[0].numel()

    monkeypatch.setattr(bench, "FlowBitsPerDim", Spy)
    images = torch.full((64, 1, 16, 16), 0.5)
    for perturb in (0.0, 0.3):
        seen.clear()
        bench.train_flow(_tiny(), images, 1, 0, perturb=perturb)
        x = torch.cat(seen)
        moved = ((x - 0.5).abs() > 1 / 256 + 1e-6).float().mean()
        if perturb == 0:
            assert float(moved) == 0.0
        else:  # a replaced value lands within 1/256 of 0.5 with probability about 2/256
            assert abs(float(moved) - perturb * (1 - 2 / 256)) < 0.02


def test_background_options_are_checked(bench, capsys):
    for argv in (["run", "--bg-perturb", "1.5"], ["run", "--bg-perturb", "0.2", "--bg-early", "10"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert "--bg-perturb" in capsys.readouterr().err
