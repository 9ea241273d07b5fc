"""Where the repository and the tests are, for test modules at any depth of tests/ (they sit in rooms that
mirror the packages: tests/invdyn/, tests/pipeline/<sub-package>/, tests/project/)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py, helpers/, fixtures/
REPO = TESTS.parent
