"""Test setup shared by the suite: CPU only, float32 matmuls exact, GPU tests skipped without a GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("PDOPT_TEST_GPU") is None else "")

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
