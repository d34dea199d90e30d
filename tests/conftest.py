"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from scripts.tooling.study import PRESETS, build_data


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores (its child processes too): torch's default of one
    thread per core in every worker oversubscribes the machine and slows every test."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
