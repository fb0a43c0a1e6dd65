"""The public attention entry point and the choice of backend.

`ragged_paged_attention` has the signature of its `jnp` reference in `pallas_kernels.reference` plus a
`backend` argument; `dispatch` makes the same choice between any other kernel and its reference. Backends:

- "reference": the `jnp` reference (any platform).
- "pallas": the Pallas kernel for the default device's platform; raises if there is none.
- "auto" (default): the Pallas kernel where one exists for the platform and accepts the inputs, the
  reference otherwise (a kernel that cannot serve some inputs raises `NotImplementedError` and the
  reference runs instead). On CPU, "auto" is the reference.

The choice is made at trace time from `jax.default_backend()`, so it costs nothing per step.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax

from pallas_kernels import reference


class Backend(enum.Enum):
  AUTO = "auto"
  REFERENCE = "reference"
  PALLAS = "pallas"

  @classmethod
  def parse(cls, name: "str | Backend") -> "Backend":
    if isinstance(name, Backend):
      return name
    try:
      return cls(name)
    except ValueError:
      valid = ", ".join(b.value for b in cls)
      raise ValueError(f"unknown attention backend {name!r}; valid: {valid}") from None


def dispatch(kernel: Callable[[], Callable] | None, ref: Callable, backend: "str | Backend", *args, **kwargs):
  """Calls `kernel()` (a loader, so kernels import only when used) or `ref` with the arguments, by
  `backend` as described above."""
  backend = Backend.parse(backend)
  if backend is Backend.REFERENCE:
    return ref(*args, **kwargs)
  on_gpu = jax.default_backend() == "gpu"
  if backend is Backend.PALLAS:
    if kernel is None or not on_gpu:
      raise NotImplementedError(f"no Pallas kernel for platform {jax.default_backend()!r}")
    return kernel()(*args, **kwargs)
  if kernel is not None and on_gpu:
    try:
      return kernel()(*args, **kwargs)
    except NotImplementedError:
      pass
  return ref(*args, **kwargs)


def _mixed_kernel() -> Callable:
  from pallas_kernels.mixed_batch import mixed_batch_attention  # pylint: disable=import-outside-toplevel
  return mixed_batch_attention


def ragged_paged_attention(*args, backend: "str | Backend" = "auto", **kwargs) -> jax.Array:
  """Attention for a mixed ragged batch (prompt chunks and decode tokens); see the reference.

  On GPU the decode tokens go to the split-K decode kernel and the prompt chunks to the flash prefill
  kernel, in one call (`pallas_kernels.mixed_batch`); the model's attention layers call this.
  """
  return dispatch(_mixed_kernel, reference.ragged_paged_attention, backend, *args, **kwargs)
