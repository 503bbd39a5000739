"""Shared fixtures: an isolated workspace per test, and the real data in ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSNAREC_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads stall on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $SSNAREC_HOME for one test."""
    root = tmp_path / "home"
    monkeypatch.setenv("SSNAREC_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: the real datasets are never copied into the repo."""
    if not (SHARED_DATA / "amazon-sci-unisrec").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (CI has it; set SSNAREC_SHARED_DATA to point elsewhere)")
    return SHARED_DATA
