"""Test setup shared by the suite: CPU only, float32 matmuls exact, GPU tests skipped without a GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("PDOPT_TEST_GPU") is None else "")
# On a GPU, leave memory to the child interpreters some tests start (`run_child`).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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


@pytest.fixture
def run_child():
  """Runs Python `code` in a fresh interpreter (which sets its own XLA_FLAGS, e.g. a virtual device count,
  before JAX starts) and returns its stdout; fails the test with the child's output if it fails."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  def run(code: str, timeout: float) -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
  return run
