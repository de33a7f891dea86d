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
"""What ``inference.json`` needs around MONAI's evaluator: the records whose z condition the samples, and a folder
without the samples of an earlier run."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from monai_condflow.utils.checks import ConfigValueError, check_positive_int

__all__ = ["SAMPLE_NAME", "clear_earlier_samples", "inference_records"]

logger = logging.getLogger(__name__)

# the names MONAI's SaveImaged gives the samples (no source metadata: "<index>_synthetic.png", index from 0)
SAMPLE_NAME = re.compile(r"^\d+_synthetic\.png$")


def inference_records(records: Sequence[dict], num_samples: object, name: str = "num_samples") -> list[dict]:
    """The first ``num_samples`` records (their z condition one sample each).

    Args:
        records: the preprocessed records of the split (``@records#val``).
        num_samples: how many samples to draw.
        name: the config id of ``num_samples``, for the message.

    Raises:
        ConfigValueError: ``num_samples`` not an integer >= 1, or above the number of records (which gave fewer
            samples than asked, without a word).
    """
    n = check_positive_int(name, num_samples)
    if n > len(records):
        raise ConfigValueError(
            f"config id '{name}' is {n}, but the validation split has {len(records)} slices and each sample takes "
            f"the z of one: pass --{name} {len(records)} or fewer (or a larger val_list)."
        )
    return list(records[:n])


def clear_earlier_samples(folder: str | os.PathLike) -> bool:
    """Delete the samples an earlier run wrote into ``folder`` (files named ``<index>_synthetic.png`` only; nothing
    else is touched), so that the folder holds this run's samples alone (a run with fewer samples left the earlier
    run's higher indices beside its own).

    Returns:
        ``True`` (bundle configs chain it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return True
    earlier = [p for p in folder.iterdir() if p.is_file() and SAMPLE_NAME.match(p.name)]
    for path in earlier:
        path.unlink()
    if earlier:
        logger.info("removed %d samples of an earlier run from %s", len(earlier), folder)
    return True
