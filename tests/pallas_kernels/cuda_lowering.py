"""Lowering a Pallas GPU kernel (Mosaic GPU or Triton) for CUDA on any host, for the kernels' CPU tests."""

from __future__ import annotations

import jax
import pytest


def lower_for_cuda(fn, args) -> str:
  """The text of `fn` lowered for CUDA (layouts, TMA shapes and barriers are checked here; PTX is only
  generated on a GPU); skips the calling test where the installed jaxlib cannot lower for CUDA."""
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except (ImportError, RuntimeError) as e:  # pragma: no cover - depends on the installed jaxlib
    pytest.skip(f"this jax cannot lower Pallas GPU kernels for cuda here: {e}")
