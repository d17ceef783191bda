"""Fault tests: the encoder, ranker and gateway as real processes that the tests kill (SIGKILL) and
start again on the same ports and data directories. The stack is the one tests/load uses too
(tests.load.support.shared_stack: its ranker follows the alias and has a store of its own); the
`stack` fixture restarts whatever a test left down. It serves the test run's one sample
bundle (tests/e2e/conftest.py shared_bundle, or A2V_E2E_BUNDLE)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import e2e_dir  # noqa: F401  (fixture, found by name)
from tests.e2e.support import Stack
from tests.fuzz.conftest import bundle  # noqa: F401  (the session's e2e bundle when there is one)
from tests.load.support import shared_stack


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: services killed, restarted or misconfigured (tests/faults)")


@pytest.fixture
def stack(request, tmp_path_factory, bundle) -> Stack:  # noqa: F811
    s = shared_stack(request.config, tmp_path_factory, bundle)
    s.ensure_running()
    return s
