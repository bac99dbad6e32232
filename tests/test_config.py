from pathlib import Path

import pytest

from sorter.config import DEFAULT_DATABASE_URL, Settings
from sorter.errors import ConfigError


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.model is None and settings.broker_url is None
    assert settings.batch_size == 32


def test_environment_then_flags():
    env = {"SORTER_BATCH_SIZE": "8", "SORTER_MODEL": "/m.pt", "SORTER_SETTLE": "0.5", "SORTER_DEVICE": ""}
    settings = Settings.from_env(env, batch_size=None, device="cpu")
    assert settings.batch_size == 8  # a flag left unset keeps the environment's value
    assert settings.model == Path("/m.pt")
    assert settings.settle == 0.5
    assert settings.device == "cpu"
    assert Settings.from_env(env, batch_size=64).batch_size == 64


def test_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="SORTER_BATCH_SIZE='many' is not a valid int"):
        Settings.from_env({"SORTER_BATCH_SIZE": "many"})


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("frames", 0, "SORTER_FRAMES (--frames) must be at least 1, not 0"),
        ("batch_size", -3, "SORTER_BATCH_SIZE (--batch-size) must be at least 1"),
        ("workers", -1, "SORTER_WORKERS (--workers) must be at least 0"),
        ("concurrency", 0, "SORTER_CONCURRENCY (--concurrency) must be at least 1"),
        ("settle", -1.0, "SORTER_SETTLE (--settle) must be at least 0"),
        ("rescan", 0.0, "SORTER_RESCAN (--rescan) must be above 0"),
        ("visibility_timeout", 0.0, "SORTER_VISIBILITY_TIMEOUT (--visibility-timeout) must be above 0"),
        ("metrics_port", 70000, "must be a port from 0 to 65535"),
    ],
)
def test_a_value_no_command_could_use_is_refused_by_name(field, value, words):
    with pytest.raises(ConfigError) as caught:
        Settings(**{field: value})
    assert words in str(caught.value)
    with pytest.raises(ConfigError):  # from the environment too
        Settings.from_env({f"SORTER_{field.upper()}": str(value)})


def test_a_boolean_variable_with_a_typo_is_refused_rather_than_read_as_off():
    assert Settings.from_env({"SORTER_FULL_DECODE": "Yes"}).full_decode is True
    assert Settings.from_env({"SORTER_FULL_DECODE": "off"}).full_decode is False
    with pytest.raises(ConfigError, match="SORTER_FULL_DECODE='ture' is not a valid bool"):
        Settings.from_env({"SORTER_FULL_DECODE": "ture"})
