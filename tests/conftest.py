"""Shared test setup: every test runs with its own invdyn home, D4RL dir and HOME, never the user's."""

import pytest


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    """Point every place invdyn / pipeline read or write at fresh temp folders (per test)."""
    root = tmp_path_factory.mktemp("env")
    for var, sub in (("INVDYN_HOME", "invdyn-home"), ("D4RL_DATASET_DIR", "d4rl"), ("HOME", "home")):
        (root / sub).mkdir()
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.delenv("INVDYN_OFFLINE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root
