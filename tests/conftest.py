"""Shared fixtures: tiny models, deterministic threads, the optional shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Thread count changes results in the last digits; tests that compare numbers pin it.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("DTRAK_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture
def cifar_root() -> Path:
    root = shared_data_dir() / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"real CIFAR-10 image folder not found at {root}")
    return root


def pytest_collection_modifyitems(config, items):
    """CUDA-marked tests skip with their reason where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
