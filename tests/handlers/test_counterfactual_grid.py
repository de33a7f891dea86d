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
"""CounterfactualGridHandler: TensorBoard grid of source | counterfactual | difference."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_condflow.handlers import CounterfactualGridHandler, counterfactual_grid
from tests.networks.nets.test_conditional_glow import conditions, images
from tests.networks.nets.test_counterfactual import trained_like


class _Writer:
    def __init__(self) -> None:
        self.images: list[tuple[str, torch.Tensor, int]] = []

    def add_image(self, tag, img, step):
        self.images.append((tag, img, step))

    def flush(self):
        pass


def test_grid_with_own_condition_shows_no_change_and_handler_writes_each_epoch():
    flow = trained_like().float()
    x, z = images(2, 8), conditions(2)
    grid = counterfactual_grid(flow, x, z, z)
    # 2 rows x 3 columns of 8-px tiles with 2-px padding; the difference column is mid-grey
    assert grid.shape == (1, 2 + 2 * 10, 2 + 3 * 10)
    assert torch.allclose(grid[0, 2:10, 22:30], torch.full((8, 8), 128 / 255), atol=1.5 / 255)
    writer = _Writer()
    flow.train()
    engine = Engine(lambda e, b: None)
    CounterfactualGridHandler(flow, x, z, conditions(2), summary_writer=writer, tag="cf").attach(engine)
    engine.run([0], max_epochs=2)
    assert [(t, s) for t, _, s in writer.images] == [("cf", 1), ("cf", 2)]
    assert flow.training  # mode restored


def test_grid_with_masks_changes_only_the_masked_pixels():
    flow = trained_like().float()
    x, z, target = images(2, 8), conditions(2), conditions(2) * -1.0
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0  # the left half of each tile may change
    whole = counterfactual_grid(flow, x, z, target)
    grid = counterfactual_grid(flow, x, z, target, masks=mask)
    # tile (row r, column c) starts at 2 + 10 r, 2 + 10 c; column 1 is the counterfactual, column 0 the source
    for r in range(2):
        src, cf = grid[0, 2 + 10 * r : 10 + 10 * r, 2:10], grid[0, 2 + 10 * r : 10 + 10 * r, 12:20]
        assert torch.equal(cf[:, 4:], src[:, 4:])  # the right half is the source
        assert torch.equal(cf[:, :4], whole[0, 2 + 10 * r : 10 + 10 * r, 12:16])  # the left half is the flow's
    assert not torch.equal(grid, whole)
    for bad in (torch.ones(2, 1, 4, 4), torch.ones(2, 3, 8, 8)):
        with pytest.raises(ValueError, match="masks"):
            CounterfactualGridHandler(flow, x, z, target, summary_writer=_Writer(), masks=bad)
