"""The model and its KV cache on the device, and the compiled programs that run a `StepBatch` on them.

The step program is one forward pass plus on-device sampling; other programs (chained decode steps,
speculative verification, the draft model's pass) are functions `program(model, cache, batch,
attention_backend) -> (outputs, cache)` that `ModelRunner.call` jits once each. The KV cache lives here and
is donated to every program, so XLA updates its pages in place. One jitted function per program serves all
shape buckets; `num_compilations` counts the shapes compiled so far.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.sizes import next_power_of_2
from pdopt import sharding

from pdopt.engine import sampler
from pdopt.engine.batch import SamplingInputs, StepBatch, StepLayout, build
from pdopt.models.transformer import Transformer, empty_cache


class StepStatic:
  """The static half of the runner's split model: the nnx graphdef and the treedef of its state.

  jit hashes its static arguments at every call and compares them with the key it compiled for; hashing or
  comparing a graphdef walks the whole module graph. This holder hashes once, and runners take theirs from
  `step_static`, one holder per model structure in the process, so that the comparison is an identity
  check: a later engine's holder, equal but distinct, cost every step of it a walk of the graph (on the
  Llama-3.2-1B shape, 0.1-0.5 ms of host time per step).
  """

  __slots__ = ("graphdef", "treedef", "_hash")

  def __init__(self, graphdef, treedef):
    self.graphdef, self.treedef = graphdef, treedef
    self._hash = hash((graphdef, treedef))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, StepStatic) and self._hash == other._hash
                             and self.graphdef == other.graphdef and self.treedef == other.treedef)


_HOLDERS: dict[StepStatic, StepStatic] = {}


def step_static(graphdef, treedef) -> StepStatic:
  """The process's one `StepStatic` equal to (graphdef, treedef) (kept for the process's lifetime, as the
  shared jit cache keeps it anyway)."""
  holder = StepStatic(graphdef, treedef)
  return _HOLDERS.setdefault(holder, holder)


def merge(static: StepStatic, leaves) -> Transformer:
  """The model from the runner's split form: `leaves` are the state's arrays in a flat list (flattening a
  flat list per call costs the host next to nothing, an nnx State of nested dicts a sort of its keys at
  every level)."""
  return nnx.merge(static.graphdef, jax.tree_util.tree_unflatten(static.treedef, leaves))


def _step_impl(model: Transformer, cache, batch: StepBatch, attention_backend: str):
  logits, cache = model(batch.token_ids, batch.metadata(), cache, logits_indices=batch.logits_indices,
                        attention_backend=attention_backend)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The sampling inputs ride along (already on the device) for `_sample`, which only sampled steps run.
  return (greedy, logits, batch.sampling), cache


@jax.jit
def _sample(logits, sampling: SamplingInputs):
  """Sampled tokens for a step with requests that sample: a second, small program, so that greedy steps
  (the common case) never sort the vocabulary and need no data-dependent branch, whose predicate the GPU
  runtime would read on the host in the middle of the step."""
  return sampler.sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds,
                        sampling.token_index)


@jax.jit
def _gather_pages(cache, pages):
  # Per layer, every array of the layer cache at `pages` (axis 1): [K, n, page_size(, D)].
  return [tuple(a[:, pages] for a in layer) for layer in cache]


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(cache, pages, data):
  return [tuple(a.at[:, pages].set(d, mode="drop") for a, d in zip(layer, new)) for layer, new in zip(cache, data)]


def _padded(pages, fill: int) -> np.ndarray:
  n = next_power_of_2(len(pages))  # Few compiled shapes.
  out = np.full(n, fill, np.int32)
  out[:len(pages)] = pages
  return out


@dataclasses.dataclass(frozen=True)
class TransferredStep:
  """A `StepBatch` on its way into a program: the packed host leaves (already on the device), the device
  leaves, and the static layout."""
  buffer: jax.Array
  device: tuple[jax.Array, ...]
  layout: StepLayout
  samples: bool  # some sequence samples (`StepBatch.samples`)


def _on_transfer(program):
  """`program(model, cache, batch, backend)` as a function of the runner's split model and a transferred
  batch, the form `jax.jit` compiles."""
  def fn(static, attention_backend, layout, state, cache, buffer, device):
    return program(merge(static, state), cache, StepBatch.from_transfer(buffer, device, layout), attention_backend)
  fn.__name__ = program.__name__
  return fn


# Unsharded runners of the same model and shapes share compilations: one jitted function per program.
_SHARED: dict = {}


def _shared_jit(program):
  if program not in _SHARED:
    _SHARED[program] = jax.jit(_on_transfer(program), static_argnums=(0, 1, 2), donate_argnums=(4,))
  return _SHARED[program]


def num_compilations_of(program) -> int:
  """Shapes compiled so far of the unsharded program `program` (shared by all runners)."""
  return _SHARED[program]._cache_size() if program in _SHARED else 0  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True, eq=False)
class WarmupCall:
  """One program for a warm-up to compile: `runner.run(batch)` (`program` None) or
  `runner.call(program, batch)`."""
  runner: "ModelRunner"
  batch: StepBatch
  program: Callable | None = None


_MAX_COMPILE_THREADS = 16  # each compilation has its own XLA thread pool and autotuning scratch memory


def warm_up(calls: Sequence[WarmupCall]) -> None:
  """Compiles the programs of `calls` in parallel threads (XLA compiles without holding the GIL), then runs
  each once, which finds it compiled (jit keeps what the ahead-of-time compilation made). Warm-ups of tens
  of shape buckets take a fraction of the time one compilation after another takes (pallas_kernels/NOTES.md,
  ## engine). Under profile-guided latency estimation (`jax_enable_pgle`) a call compiles again anyway, so
  the programs then compile one after another in the runs."""
  if not jax.config.jax_enable_pgle:
    lowered = [c.runner.lower(c.batch, c.program) for c in calls]
    threads = max(1, min(len(lowered), len(os.sched_getaffinity(0)), _MAX_COMPILE_THREADS))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for _ in pool.map(lambda program: program.compile(), lowered):
        pass
  for c in calls:
    if c.program is None:
      c.runner.run(c.batch)
    else:
      jax.block_until_ready(c.runner.call(c.program, c.batch, fetch=False))


class ModelRunner:
  """Holds the model state and the KV pages on the device and runs compiled steps."""

  def __init__(self, model: Transformer, num_pages: int, page_size: int, attention_backend: str = "auto",
               mesh: Mesh | None = None, kv_quant: str | None = None, decode_variant: bool | None = None):
    """Args:
      model: the model; with a mesh, its parameters must already be sharded (`pdopt.sharding.shard_model`).
      num_pages, page_size: the KV pool.
      attention_backend: see `pallas_kernels.api`.
      mesh: shard the KV cache by KV head over its `model` axis and compile the step with explicit input
        and output shardings; None runs on the default device.
      kv_quant: None, "int8" or "fp8" (see `pdopt.cache.kv_cache`).
      decode_variant: compile decode-only steps separately (`StepBatch.decode_only`); None: where the
        attention has a kernel that uses it (a GPU and a backend other than "reference"), since elsewhere
        the variant would only add compilations.
    """
    if decode_variant is None:
      decode_variant = jax.default_backend() == "gpu" and attention_backend != "reference"
    self.decode_variant = decode_variant
    self.config = model.config
    self.page_size = page_size
    self.num_pages = num_pages
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    self.graphdef = step_static(graphdef, treedef)
    self.state = leaves
    self.attention_backend = attention_backend
    self.cache = empty_cache(model.config, num_pages, page_size, kv_quant=kv_quant)
    self._batch_sharding = None
    self._mesh = mesh
    self._fn = _shared_jit(_step_impl)
    if mesh is None:
      # One plain placement for state and cache: parameters restored by orbax carry a mesh sharding, and a
      # step whose input shardings change between calls would compile again after warm-up.
      device = jax.local_devices()[0]
      self.state = jax.device_put(self.state, device)
      self.cache = jax.device_put(self.cache, device)
    if mesh is not None:
      replicated = NamedSharding(mesh, PartitionSpec())
      cache_shardings = [tuple(sharding.cache_sharding(mesh, a.ndim) for a in layer) for layer in self.cache]
      self.cache = sharding.put_global(self.cache, cache_shardings)
      state_shardings = [x.sharding for x in self.state]
      self._batch_sharding = replicated
      self._fn = jax.jit(_on_transfer(_step_impl), static_argnums=(0, 1, 2), donate_argnums=(4,),
                         in_shardings=(state_shardings, cache_shardings, replicated, replicated),
                         out_shardings=(replicated, cache_shardings))

  @property
  def num_compilations(self) -> int:
    """Step programs compiled so far (unsharded engines of the same model and shapes share them)."""
    return self._fn._cache_size()  # pylint: disable=protected-access

  def gather_pages(self, pages):
    """Contents of `pages` for every layer, shaped like the cache with the page axis cut to n (padded to
    a power of two): per layer (K `[K, n, page_size, D]`, V, and the scales of a quantized cache)."""
    return _gather_pages(self.cache, jnp.asarray(_padded(pages, 0)))

  def scatter_pages(self, pages, data) -> None:
    """Writes `data` from `gather_pages` (on this runner's devices) into `pages`; padding is dropped."""
    self.cache = _scatter_pages(self.cache, jnp.asarray(_padded(pages, self.num_pages)), data)

  def put(self, batch: StepBatch) -> TransferredStep:
    """Copies a host `StepBatch` to this runner's devices in one transfer. `batch.decode_only` holds only
    where this runner compiles the decode-only variant (`decode_variant`)."""
    if batch.decode_only and not self.decode_variant:
      batch = batch.replace(decode_only=False)
    buffer, device, layout = batch.to_transfer()
    return TransferredStep(jax.device_put(buffer, self._batch_sharding), device, layout, batch.samples)

  def run(self, batch: StepBatch) -> np.ndarray:
    """Runs one step; returns the sampled token of every (padded) sequence as int32 [S]."""
    return np.asarray(self.dispatch(batch))

  def dispatch(self, batch: StepBatch | TransferredStep) -> jax.Array:
    """Enqueues one step without waiting for it; returns the sampled tokens [S] as a device array.

    Steps dispatched back to back run back to back on the device (each takes the cache the previous one
    returns), which is how the engine benchmark measures a step's device time apart from the host's (it
    passes the batch already transferred, `put`).
    """
    step = batch if isinstance(batch, TransferredStep) else self.put(batch)
    fn, args = self._program(step)
    with self._mesh_context():
      (tokens, logits, sampling), self.cache = fn(*args)
    return _sample(logits, sampling) if step.samples else tokens

  def call(self, program, batch: StepBatch, fetch: bool = True):
    """Runs another program on this runner's model and KV cache (chained decode steps, speculative
    verification, the draft model's pass).

    Args:
      program: `program(model, cache, batch, attention_backend) -> (outputs, cache)`, jitted here (once per
        program, shared by every unsharded runner), donating the cache.
      batch: its inputs; device leaves (outputs of an earlier call) never visit the host.
      fetch: wait for the outputs and return them as numpy arrays; False returns the device arrays at
        once (the program may still be running).

    Returns:
      `outputs` (same tree), numpy arrays when `fetch`.
    """
    self._check_variants()
    fn, args = self._program(self.put(batch), program)
    outputs, self.cache = fn(*args)
    return jax.tree_util.tree_map(np.asarray, outputs) if fetch else outputs

  def lower(self, batch: StepBatch, program=None) -> jax.stages.Lowered:
    """The program that `run` (or, with `program`, `call`) would run for `batch`, lowered and not compiled:
    `warm_up` compiles several at once, and the later call with the same shapes finds them compiled."""
    if program is not None:
      self._check_variants()
    fn, args = self._program(self.put(batch), program)
    with self._mesh_context():
      return fn.lower(*args)

  def _check_variants(self) -> None:
    if self._batch_sharding is not None:
      raise NotImplementedError("step variants (speculative decoding, chained decode steps) do not run on a mesh yet")

  def _mesh_context(self):
    """The runner's mesh as the context of its sharded steps (`jax.set_mesh`), so that their attention kernels
    run on each device's heads (`pallas_kernels.sharded`); jit's shardings alone do not tell a traced function
    its mesh, and a Pallas kernel's operands would be gathered onto one device."""
    return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

  def _program(self, step: TransferredStep, program=None):
    """The jitted function and its arguments that run a transferred batch: the step (`program` None) or
    another program. `dispatch`, `call` and `lower` all take them from here, so what `warm_up` compiles is
    what they run."""
    args = (self.graphdef, self.attention_backend, step.layout, self.state, self.cache, step.buffer, step.device)
    return (self._fn if program is None else _shared_jit(program)), args

  @property
  def output_placement(self):
    """Where the step's outputs live (committed): warm-up inputs that stand in for them must be placed
    here, since jit compiles committed and uncommitted inputs separately."""
    return self._batch_sharding or self.cache[0][0].sharding

  def compile_sampler(self, num_seqs: int) -> None:
    """Compiles the sampling program for `num_seqs` sequence slots (part of the engine's warm-up)."""
    sampling = jax.device_put(build([], self.page_size, (1, num_seqs, 1)).sampling, self.output_placement)
    logits = jax.device_put(np.zeros((num_seqs, self.config.vocab_size), np.float32), self.output_placement)
    jax.block_until_ready(_sample(logits, sampling))
