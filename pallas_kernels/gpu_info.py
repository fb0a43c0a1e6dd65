"""What the kernels ask of the GPU they will run on."""

from __future__ import annotations

import jax

_DEFAULT_NUM_SMS = 132  # H100 SXM, H200


def num_sms() -> int:
  """Streaming multiprocessors of the first GPU; 132 (H100 SXM, H200) where JAX has none (lowering on a CPU)."""
  try:
    return int(jax.devices("gpu")[0].core_count or _DEFAULT_NUM_SMS)
  except RuntimeError:
    return _DEFAULT_NUM_SMS


def on_hopper() -> bool:
  """Whether the default device is an sm_90 GPU (the Mosaic GPU kernels' target)."""
  if jax.default_backend() != "gpu":
    return False
  return getattr(jax.devices()[0], "compute_capability", "") == "9.0"
