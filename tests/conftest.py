"""Shared test helpers: where the reference fixtures and corpora live."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with `shared/` beside it.
SHARED = Path(os.environ.get("VAE_JAX_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is absent (set VAE_JAX_SHARED_DIR to shared/)")
    return path
