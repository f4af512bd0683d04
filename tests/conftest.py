"""Shared fixtures. Data recorded by others lives in ../shared/data beside the checkout; tests
that need it skip with the reason when it is absent (a user's fresh clone does not have it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOESIM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real traces not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def esft_npz(shared_data) -> dict[str, Path]:
    """The four ESFT DeepSeek-V2-Lite routing files by task name."""
    folder = shared_data / "esft-dsv2lite"
    files = {p.stem.removeprefix("esft_"): p for p in sorted(folder.glob("esft_*.npz"))}
    if not files:
        pytest.skip(f"no ESFT traces in {folder}")
    return files


@pytest.fixture(scope="session")
def phone_trace_dir(shared_data) -> Path:
    folder = shared_data / "edge-qwen3-phone"
    if not (folder / "qwen.route.csv").exists():
        pytest.skip(f"phone trace not available in {folder}")
    return folder
