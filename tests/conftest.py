"""Shared fixtures: where the corpus lives, and skip messages when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import CORPUS


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The labelled corpus beside the repo; tests that need it skip cleanly without it."""
    if not (CORPUS / "manifest.csv").is_file():
        pytest.skip(f"corpus not found at {CORPUS} (tests that need ../shared/corpus are skipped)")
    return CORPUS
