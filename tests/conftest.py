"""Fixtures shared by the server's tests."""

import pytest

from livestyle.models.demo import load_demo
from livestyle.stream.engine import Engine


@pytest.fixture(scope="module")
def engine():
    """The demo model on an engine, one per test module (a module may define its own)."""
    with Engine(load_demo) as engine:
        yield engine
