"""Load and overload tests: the encoder, ranker and gateway as processes on loopback (so each has
its own RSS), serving the test run's one sample bundle (tests/e2e/conftest.py shared_bundle, or A2V_E2E_BUNDLE). The stack is the one
tests/faults uses too (tests.load.support.shared_stack)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import e2e_dir  # noqa: F401  (fixture, found by name)
from tests.e2e.support import Stack
from tests.fuzz.conftest import bundle  # noqa: F401  (the session's e2e bundle when there is one)
from tests.load.support import shared_stack


def pytest_configure(config):
    config.addinivalue_line("markers", "load: sustained load and overload over real sockets (tests/load)")


@pytest.fixture
def stack(request, tmp_path_factory, bundle) -> Stack:  # noqa: F811
    """The shared stack, with whatever an earlier test left down started again."""
    s = shared_stack(request.config, tmp_path_factory, bundle)
    s.ensure_running()
    return s
