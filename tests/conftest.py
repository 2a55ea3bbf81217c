"""Shared fixtures: tiny configs so every test runs in seconds on one core."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests use one CPU device and never preallocate; set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

REPO = Path(__file__).resolve().parent.parent


def load_smoke_config(compile_cache: str):
    """configs/smoke.toml, its worker pools on the session's compile cache."""
    from selfloop.config import load_config

    return load_config(REPO / "configs" / "smoke.toml", (f"farm.compile_cache={compile_cache!r}",))


@pytest.fixture
def smoke_config(compile_cache):
    return load_smoke_config(compile_cache)


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> str:
    """One persistent compile cache for the session: the tests' own process and
    every ``run.py`` they start compile the smoke config's programs once, not
    once per test. ``smoke_config`` points its worker pools here too, so the
    tests leave the repository's ``checkpoints/`` untouched."""
    from selfloop.farm.worker import use_compile_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    use_compile_cache(path)
    return path
