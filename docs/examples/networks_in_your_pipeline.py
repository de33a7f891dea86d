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
"""Use monai_condflow's networks and transforms inside your own MONAI / Ignite code (run by the test suite).

1. PEPXNet as the network of a plain MONAI SupervisedTrainer; its `embed` gives the 32-d condition z.
2. ConditionalGlow: initialise, train a few steps on bits/dim, round-trip exactly, sample at T = 0.9.
3. The CT preprocessing chain on an in-memory HU slice.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.engines import SupervisedTrainer
from monai.transforms import Compose

from monai_condflow.networks.nets import ConditionalGlow, PEPXNet
from monai_condflow.transforms import get_preprocess_transforms


def main() -> dict[str, float]:
    torch.manual_seed(0)
    images = torch.rand(16, 1, 32, 32)
    labels = torch.randint(0, 2, (16,))
    data = [{"image": images[i], "label": labels[i]} for i in range(16)]

    # 1. a plain MONAI trainer, no plugin code
    net = PEPXNet.from_preset("small", spatial_dims=2, in_channels=1, out_channels=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=8),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.run()
    with torch.no_grad():
        z = net.eval().embed(images)  # [16, 32], unit norm: the flow's condition (frozen classifier)

    # 2. the conditional flow
    flow = ConditionalGlow.from_preset(
        "small", image_size=32, num_levels=2, num_steps=2, num_blocks=1, hidden_channels=16
    )
    flow.initialize(images, z)  # explicit data-dependent ActNorm initialisation
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-3)
    for _ in range(3):
        loss = flow.bits_per_dim(images, z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    nu, _ = flow(images, z)
    x_back, _ = flow.inverse(nu, z)
    samples = flow.sample(z, temperature=0.9)

    # 3. the CT chain on a HU array (any 2-D slice; no lung box -> automatic body crop)
    hu = np.full((128, 128), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:128, :128]
    hu[(yy - 64) ** 2 / 50**2 + (xx - 64) ** 2 / 60**2 < 1] = 40.0
    chain: Compose = get_preprocess_transforms(image_size=64, intensity="hu")
    out = chain({"image": hu[None], "label": 0})
    return {
        "train_loss": float(trainer.state.output[0]["loss"]) if isinstance(trainer.state.output, list) else 0.0,
        "z_norm": float(z.norm(dim=1).mean()),
        "round_trip_error": float((x_back - images).abs().max()),
        "sample_min": float(samples.min()),
        "sample_max": float(samples.max()),
        "chain_shape": tuple(out["image"].shape),
    }


if __name__ == "__main__":
    print(main())
