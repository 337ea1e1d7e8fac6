"""Shared fixtures. Tests run offline and single-threaded-friendly."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real sample files (../shared/data); tests using them skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (real sample files are not part of the repository)")
    return SHARED_DATA


# evaluation fixtures (tests/eval_fixtures.py): tiny synthetic set + tiny trained model, session-scoped
from eval_fixtures import eval_data, eval_model, eval_prompts  # noqa: E402,F401
