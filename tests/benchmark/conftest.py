"""Every engine of these tests jits its own step; a session-wide persistent compilation cache lets the fresh
engine of each policy load the shapes the first one compiled instead of compiling them again."""

import pytest

from pdopt import benchmark


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  path = tmp_path_factory.mktemp("jax_cache")
  benchmark.enable_compilation_cache(str(path))
  return path
