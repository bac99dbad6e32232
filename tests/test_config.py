from pathlib import Path

import pytest

from sorter.config import DEFAULT_DATABASE_URL, Settings


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
