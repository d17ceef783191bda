"""The fuzz tests run against the end-to-end stack: the same fixtures as tests/e2e (re-exported
here, since a conftest only serves its own folder).

A session fixture defined in two conftests is two fixtures, so a full run starts a second stack for
these tests; `bundle` is overridden so that it at least reuses the bundle tests/e2e already trained
in this session instead of training another one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import e2e_dir, services, stack  # noqa: F401  (fixtures, found by name)


@pytest.fixture(scope="session")
def bundle(e2e_dir, tmp_path_factory) -> Path:
    trained = sorted(tmp_path_factory.getbasetemp().glob("e2e*/models/*/manifest.json"))
    if trained:
        return trained[0].parent
    return e2e.bundle.__wrapped__(e2e_dir)
