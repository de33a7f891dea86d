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
"""The ``dp`` settings of the trainers (check_dp_settings) and the DP classifier's unused-unlabelled log."""

from __future__ import annotations

import logging
import math

import pytest

from monai_condflow.privacy.dp import check_dp_settings, log_unused_unlabelled


def test_defaults_are_filled_and_numbers_become_floats():
    out = check_dp_settings({"target_epsilon": 4, "target_delta": 1e-5})
    assert out == {"target_epsilon": 4.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"}
    assert all(type(out[k]) is float for k in ("target_epsilon", "target_delta", "max_grad_norm"))
    given = {"target_epsilon": 2.5, "target_delta": 0.5, "max_grad_norm": 3, "accountant": "gdp"}
    assert check_dp_settings(given) == {**given, "max_grad_norm": 3.0}
    assert given["max_grad_norm"] == 3  # the input is not modified


@pytest.mark.parametrize(
    "dp, key",
    [
        ({"target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": 1.0}, "target_delta"),
        ({"target_epsilon": -1, "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": 0, "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": math.nan, "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": math.inf, "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": True, "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": "8", "target_delta": 1e-5}, "target_epsilon"),
        ({"target_epsilon": 8, "target_delta": -1e-5}, "target_delta"),
        ({"target_epsilon": 8, "target_delta": math.nan}, "target_delta"),
        ({"target_epsilon": 8, "target_delta": 1e-5, "max_grad_norm": -0.5}, "max_grad_norm"),
        ({"target_epsilon": 8, "target_delta": 1e-5, "max_grad_norm": False}, "max_grad_norm"),
        ({"target_epsilon": 8, "target_delta": 1e-5, "max_grad_norm": None}, "max_grad_norm"),
    ],
)
def test_bad_or_missing_values_name_the_key(dp, key):
    with pytest.raises(ValueError, match=f"DP setting '{key}' must be a finite number > 0"):
        check_dp_settings(dp)


@pytest.mark.parametrize("delta", [1, 1.0, 2.5])
def test_delta_must_be_below_one(delta):
    with pytest.raises(ValueError, match="'target_delta' must be < 1"):
        check_dp_settings({"target_epsilon": 1.0, "target_delta": delta})


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError, match=r"unknown DP setting\(s\) \['clip', 'noise'\]; expected keys: target_epsilon"):
        check_dp_settings({"target_epsilon": 1.0, "target_delta": 1e-5, "noise": 1.0, "clip": 2})


@pytest.mark.parametrize("accountant", ["moments", "RDP", None])
def test_bad_accountant(accountant):
    with pytest.raises(ValueError, match="'accountant' must be 'prv', 'rdp' or 'gdp'"):
        check_dp_settings({"target_epsilon": 1.0, "target_delta": 1e-5, "accountant": accountant})


@pytest.mark.parametrize("dp", [None, [("target_epsilon", 1.0)], 8.0])
def test_not_a_mapping(dp):
    with pytest.raises(ValueError, match="dp settings must be a mapping"):
        check_dp_settings(dp)


def test_log_unused_unlabelled_returns_the_count(caplog):
    with caplog.at_level(logging.INFO, logger="monai_condflow.privacy.dp"):
        assert log_unused_unlabelled([{"image": "a"}, {"image": "b"}, {"image": "c"}], num_labels=20) == 3
    assert "3 unlabelled images are not used (num_labels=20)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_condflow.privacy.dp"):
        assert log_unused_unlabelled([]) == 0
        assert log_unused_unlabelled(None, num_labels="all") == 0
    assert "unlabelled" not in caplog.text  # nothing to report: no log line
