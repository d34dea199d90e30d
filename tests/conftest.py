"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts.tooling.study import PRESETS, build_data


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's tiny phantom data set (4 subjects, 4.8 mm), built once for the session; the studies
    add their derived datalists and volumes to it."""
    data_dir = tmp_path_factory.mktemp("phantom_smoke")
    build_data(data_dir, PRESETS["smoke"].data, seed=0)
    return data_dir


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty folder. The configs' default paths (``./models``, ``./runs``, ``./demo_data``
    under ``bundle_root`` ".") then never reach what the demo or a user's training left in the repository."""
    monkeypatch.chdir(tmp_path)
