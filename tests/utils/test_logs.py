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
"""Tests for raised_log_level: what passes inside the block, what the logger's level is afterwards."""

from __future__ import annotations

import logging

import pytest

from monai_condflow.utils.logs import raised_log_level


def test_only_records_at_the_level_pass_and_the_level_comes_back_also_after_an_error(caplog):
    logger = logging.getLogger("condflow_test_logs")
    logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="condflow_test_logs"):
            with pytest.raises(RuntimeError), raised_log_level("condflow_test_logs", logging.WARNING):
                logger.info("routine")
                logger.warning("worth seeing")
                raise RuntimeError("boom")
            assert logger.level == logging.DEBUG
            logger.info("after")
        assert [r.getMessage() for r in caplog.records] == ["worth seeing", "after"]
    finally:
        logger.setLevel(logging.NOTSET)


def test_a_logger_set_higher_is_not_lowered():
    logger = logging.getLogger("condflow_test_logs_quiet")
    logger.setLevel(logging.CRITICAL)
    try:
        with raised_log_level("condflow_test_logs_quiet", logging.WARNING):
            assert logger.level == logging.CRITICAL
        assert logger.level == logging.CRITICAL
    finally:
        logger.setLevel(logging.NOTSET)
