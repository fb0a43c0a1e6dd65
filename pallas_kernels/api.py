"""The public attention entry point and the choice of backend.

`ragged_paged_attention` has the signature of its `jnp` reference in `pallas_kernels.reference` plus a
`backend` argument; `dispatch` makes the same choice between any other kernel and its reference. Backends:

- "reference": the `jnp` reference (any platform).
- "pallas": the Pallas kernel for the platform (`kernel_platform`); raises if there is none.
- "auto" (default): the Pallas kernel where one exists for the platform and accepts the inputs, the
  reference otherwise (a kernel that cannot serve some inputs raises `NotImplementedError` and the
  reference runs instead). On CPU, "auto" is the reference.

Kernels per platform: on GPU a mixed batch goes to the decode and prefill kernels (`mixed_batch`), on TPU to
one ragged paged attention kernel (`ragged_paged`), which under a mesh (`jax.set_mesh`) that splits the heads
runs on each device's heads (`sharded`). Under `tpu_interpret_mode` the platform is "tpu" whatever
the device, and the TPU kernels run in JAX's TPU interpreter: the engine's TPU path, tested on a CPU.

The choice is made at trace time, so it costs nothing per step.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from typing import Callable, Iterator, Mapping

import jax

from pallas_kernels import reference

# A kernel loader returns the kernel function, so kernels import only when used.
Loader = Callable[[], Callable]


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


_simulated = threading.local()  # .platform: "tpu" inside `tpu_interpret_mode` (per thread, as JAX's config)


@contextlib.contextmanager
def tpu_interpret_mode(params=None) -> Iterator[None]:
  """Within this context the api chooses the TPU kernels and they run in TPU interpret mode, on any device.

  It enters `jax.experimental.pallas.tpu.force_tpu_interpret_mode(params)`, under which every `pallas_call`
  traced runs in JAX's TPU interpreter (simulated VMEM, DMAs and semaphores on the CPU). That setting is part
  of jit's cache key, so programs traced inside the context never share a compilation with programs traced
  outside it, and the api's choice of kernels (made at trace time) always matches the program it is in.
  Like JAX's setting, it holds for the calling thread.

  Args:
    params: `pltpu.InterpretParams` (e.g. `detect_races=True`); None takes the defaults.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  previous = getattr(_simulated, "platform", None)
  with pltpu.force_tpu_interpret_mode(params if params is not None else pltpu.InterpretParams()):
    _simulated.platform = "tpu"
    try:
      yield
    finally:
      _simulated.platform = previous


def kernel_platform() -> str:
  """The platform whose kernels "auto" and "pallas" choose: "tpu" inside `tpu_interpret_mode`, else
  `jax.default_backend()` ("gpu", "tpu", "cpu")."""
  return getattr(_simulated, "platform", None) or jax.default_backend()


def dispatch(kernels: Mapping[str, Loader] | Loader | None, ref: Callable, backend: "str | Backend", *args,
             **kwargs):
  """Calls the kernel for the platform or `ref` with the arguments, by `backend` as described above.

  Args:
    kernels: loaders by platform ({"gpu": ..., "tpu": ...}); a bare loader is a GPU kernel's; None: no kernel.
    ref: the `jnp` reference.
    backend: "auto", "reference" or "pallas".
    *args, **kwargs: the arguments of both.

  Returns:
    What the kernel or the reference returns.
  """
  backend = Backend.parse(backend)
  if backend is Backend.REFERENCE:
    return ref(*args, **kwargs)
  if callable(kernels):
    kernels = {"gpu": kernels}
  platform = kernel_platform()
  loader = (kernels or {}).get(platform)
  if backend is Backend.PALLAS:
    if loader is None:
      raise NotImplementedError(f"no Pallas kernel for platform {platform!r}")
    return loader()(*args, **kwargs)
  if loader is not None:
    try:
      return loader()(*args, **kwargs)
    except NotImplementedError:
      pass
  return ref(*args, **kwargs)


def _mixed_kernel() -> Callable:
  from pallas_kernels.mixed_batch import mixed_batch_attention  # pylint: disable=import-outside-toplevel
  return mixed_batch_attention


def _tpu_kernel() -> Callable:
  # pylint: disable=import-outside-toplevel
  from pallas_kernels import ragged_paged
  from pallas_kernels.sharded import per_device_heads
  return per_device_heads(ragged_paged.ragged_paged_attention)


ATTENTION_KERNELS: Mapping[str, Loader] = {"gpu": _mixed_kernel, "tpu": _tpu_kernel}


def ragged_paged_attention(*args, backend: "str | Backend" = "auto", **kwargs) -> jax.Array:
  """Attention for a mixed ragged batch (prompt chunks and decode tokens); see the reference.

  On GPU the decode tokens go to the split-K decode kernel and the prompt chunks to the flash prefill
  kernel, in one call (`pallas_kernels.mixed_batch`); on TPU both go to one ragged paged attention kernel
  (`pallas_kernels.ragged_paged`). The model's attention layers call this.
  """
  return dispatch(ATTENTION_KERNELS, reference.ragged_paged_attention, backend, *args, **kwargs)
