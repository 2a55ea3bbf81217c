"""Shared fixtures: tiny configs so every test runs in seconds on one core."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests use one CPU device and never preallocate; set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def smoke_config():
    from selfloop.config import load_config

    return load_config(REPO / "configs" / "smoke.toml")
