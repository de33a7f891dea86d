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
"""The value checks of ``monai_condflow.utils.checks`` name the config id they refuse."""

from __future__ import annotations

import pytest

from monai_condflow.utils.checks import ConfigValueError, check_flag, check_fractions


def test_check_fractions_keeps_a_list_of_finite_numbers_as_floats():
    assert check_fractions([0, 0.5, 1], "f") == [0.0, 0.5, 1.0]
    assert check_fractions((2.0,), "f") == [2.0]  # above 1 over-samples beyond balance


@pytest.mark.parametrize("value", [0.5, "0.5", [], [0.5, -0.25], [float("nan")], [float("inf")], [True], [None]])
def test_check_fractions_refuses_by_name(value):
    with pytest.raises(ConfigValueError, match="config id 'augmentation_fractions'"):
        check_fractions(value, "augmentation_fractions")


def test_check_flag_takes_booleans_only():
    assert check_flag(True, "f") is True and check_flag(False, "f") is False
    for value in ("false", "False", 0, 1, None, [True]):
        with pytest.raises(ConfigValueError, match="config id 'train_augmentation' must be true or false"):
            check_flag(value, "train_augmentation")


def test_check_flag_says_what_to_write_for_the_text_true_or_false():
    """``python -m monai.bundle run --fresh false`` passes the text "false" (its command line reads only True /
    False as switches): the refusal says to write ``--fresh False``; other values get no such hint."""
    for text, word in (("false", "False"), ("TRUE", "True"), (" true ", "True")):
        with pytest.raises(ConfigValueError, match=f"write --fresh {word}; it reads lowercase") as refused:
            check_flag(text, "fresh")
        assert f"got {text!r}" in str(refused.value)
    for value in ("yes", 0, None):
        with pytest.raises(ConfigValueError) as refused:
            check_flag(value, "fresh")
        assert "command line" not in str(refused.value)


def test_check_flags_names_the_first_bad_switch():
    from monai_condflow.engines.config_checks import check_flags

    assert check_flags({"a": True, "b": False}) is True and check_flags({}) is True
    with pytest.raises(ConfigValueError, match="config id 'b' must be true or false, got 'false'"):
        check_flags({"a": True, "b": "false", "c": "no"})
