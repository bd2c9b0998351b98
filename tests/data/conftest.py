"""Fixtures of the data tests."""
import pytest

from data_helpers import build, small_stdlib


@pytest.fixture(scope="session")
def stdlib_source(tmp_path_factory):
    """One small stdlib source, built once for every test that only reads it."""
    return build(small_stdlib(tmp_path_factory.mktemp("stdlib_cache")))
