"""Configuration from TOML: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from butterfly.config import ButterflyConfig, load_config
from butterfly.errors import ConfigError


def test_defaults_are_sized_for_tensors_not_for_chat_messages() -> None:
    config = load_config(None)
    assert config.network.max_message_size == 256 * 2**20
    assert config.network.receive_buffer_size == 2**20
    assert config.scheduling.scheduler_type == "fifo"
    assert config.partition.default_strategy == "topology_aware"
    assert config.partition.objective == "throughput"


def test_toml_file_overrides_only_the_keys_it_names(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("[network]\nmax_message_size = 1024\n[api]\nrequest_timeout = 2.5\n")
    config = load_config(path)
    assert config.network.max_message_size == 1024
    assert config.api.request_timeout == 2.5
    assert config.network.send_queue_size == ButterflyConfig().network.send_queue_size


def test_integer_is_accepted_for_a_float_field() -> None:
    assert load_config({"api": {"request_timeout": 3}}).api.request_timeout == 3.0


def test_wrong_type_names_the_key_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"network\.max_message_size: expected int, got 'x'"):
        load_config({"network": {"max_message_size": "x"}})


def test_quoted_number_is_a_type_error() -> None:
    with pytest.raises(ConfigError, match=r"api\.request_timeout: expected float, got '5'"):
        load_config({"api": {"request_timeout": "5"}})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"network\.max_mesage_size: unknown key"):
        load_config({"network": {"max_mesage_size": 5}})


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"netwrok: unknown key"):
        load_config({"netwrok": {}})


def test_out_of_range_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"api\.request_timeout: must be > 0\.0: -1\.0"):
        load_config({"api": {"request_timeout": -1}})


def test_unknown_choice_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"scheduling\.scheduler_type: must be in \['fifo', 'priority'\] \(got 'lifo'\)",
    ):
        load_config({"scheduling": {"scheduler_type": "lifo"}})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[network\n")
    with pytest.raises(ConfigError, match=r"bad.toml' is not valid TOML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_error_from_a_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[coordination]\nheartbeat_interval = 0\n")
    with pytest.raises(
        ConfigError, match=r"c\.toml: .*coordination\.heartbeat_interval: must be > 0\.0"
    ):
        load_config(path)


def test_other_types_are_refused() -> None:
    with pytest.raises(ConfigError, match="got int"):
        load_config(5)  # type: ignore[arg-type]


def test_a_receive_budget_smaller_than_one_message_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"network: max_buffered_bytes \(1000\) must be at least max_message_size \(4096\)",
    ):
        load_config({"network": {"max_message_size": 4096, "max_buffered_bytes": 1000}})
