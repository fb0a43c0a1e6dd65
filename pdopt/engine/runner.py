"""The compiled step: one forward pass over a packed batch plus on-device sampling.

The KV cache lives here and is donated to every step, so XLA updates its pages in place. One jitted
function serves all shape buckets; `num_compilations` counts the shapes compiled so far.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdopt import sharding

from pdopt.engine import sampler
from pdopt.engine.batch import pack
from pdopt.models.layers import AttentionMetadata
from pdopt.models.transformer import Transformer, empty_cache


class StepStatic:
  """The static half of the runner's split model: the nnx graphdef and the treedef of its state.

  jit hashes its static arguments at every call, and hashing a graphdef walks the whole module graph; this
  holder hashes once. Equal holders (same model structure) share compilations across engines.
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


def merge(static: StepStatic, leaves) -> Transformer:
  """The model from the runner's split form: `leaves` are the state's arrays in a flat list (flattening a
  flat list per call costs the host next to nothing, an nnx State of nested dicts a sort of its keys at
  every level)."""
  return nnx.merge(static.graphdef, jax.tree_util.tree_unflatten(static.treedef, leaves))


def metadata(batch) -> AttentionMetadata:
  """The attention metadata of an unpacked batch (`_on_packed`), with its static `decode_only` flag."""
  return AttentionMetadata(positions=batch["positions"], slot_mapping=batch["slot_mapping"],
                           cu_q_lens=batch["cu_q_lens"], kv_lens=batch["kv_lens"], page_table=batch["page_table"],
                           num_seqs=batch["num_seqs"], decode_only=batch.get("decode_only", False))


def _step_impl(static, attention_backend, state, cache, batch):
  model = merge(static, state)
  logits, cache = model(batch["token_ids"], metadata(batch), cache, logits_indices=batch["logits_indices"],
                        attention_backend=attention_backend)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The sampling inputs ride along (already on the device) for `_sample`, which only sampled steps run.
  return (greedy, logits, {k: batch[k] for k in _SAMPLING_KEYS}), cache


_SAMPLING_KEYS = ("seeds", "temperature", "token_index", "top_k", "top_p")


@jax.jit
def _sample(logits, b):
  """Sampled tokens for a step with requests that sample: a second, small program, so that greedy steps
  (the common case) never sort the vocabulary and need no data-dependent branch, whose predicate the GPU
  runtime would read on the host in the middle of the step."""
  return sampler.sample(logits, b["temperature"], b["top_k"], b["top_p"], b["seeds"], b["token_index"])


@jax.jit
def _gather_pages(cache, pages):
  # Per layer, every array of the layer cache at `pages` (axis 1): [K, n, page_size(, D)].
  return [tuple(a[:, pages] for a in layer) for layer in cache]


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(cache, pages, data):
  return [tuple(a.at[:, pages].set(d, mode="drop") for a, d in zip(layer, new)) for layer, new in zip(cache, data)]


def _padded(pages, fill: int) -> np.ndarray:
  n = max(1, 1 << max(0, len(pages) - 1).bit_length())  # Powers of two: few compiled shapes.
  out = np.full(n, fill, np.int32)
  out[:len(pages)] = pages
  return out


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """The static half of a packed batch (a jit static argument).

  Attributes:
    entries: (key, shape, dtype, offset, size) of each array in the int32 buffer (`pack_arrays`).
    decode_only: every real sequence decodes exactly one token, so sequence s's token is row s: the
      attention runs its decode kernel alone (`AttentionMetadata.decode_only`). A separate compilation.
  """
  entries: tuple[tuple[str, tuple[int, ...], str, int, int], ...]
  decode_only: bool = False


@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """A step's host arrays in one int32 device buffer (`put`): one host-to-device copy per step instead of
  one per array, which cost the host about a millisecond per step. `layout` (static) unpacks it."""
  buffer: jax.Array
  layout: BatchLayout
  sampled: bool  # some row has temperature > 0


def is_decode_only(batch: Mapping[str, np.ndarray]) -> bool:
  """Whether a packed batch (`pack`) has at least one sequence and every real one has one query token."""
  n = int(batch["num_seqs"][0])
  return n > 0 and bool(np.all(np.diff(batch["cu_q_lens"][:n + 1]) == 1))


def pack_arrays(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, tuple]:
  """Concatenates the (4-byte) arrays of `batch` as int32 bits; returns the buffer and its layout."""
  parts, layout, offset = [], [], 0
  for key in sorted(batch):
    a = np.ascontiguousarray(batch[key])
    if a.dtype.itemsize != 4:
      raise TypeError(f"batch[{key!r}] has dtype {a.dtype}; only 4-byte dtypes are packed")
    flat = a.view(np.int32).reshape(-1)
    parts.append(flat)
    layout.append((key, a.shape, a.dtype.name, offset, flat.size))
    offset += flat.size
  return np.concatenate(parts), tuple(layout)


def unpack_arrays(buffer: jax.Array, layout) -> dict[str, jax.Array]:
  """Inverse of `pack_arrays`, on the device (slices and bitcasts: free inside the step)."""
  out = {}
  for key, shape, dtype, offset, size in layout:
    piece = jax.lax.slice(buffer, (offset,), (offset + size,))
    if dtype != "int32":
      piece = jax.lax.bitcast_convert_type(piece, jnp.dtype(dtype))
    out[key] = piece.reshape(shape)
  return out


def _on_packed(impl):
  """`impl(static, backend, state, cache, batch_dict)` as a function of the packed buffer and its layout;
  `extra` (a dict of device arrays, e.g. another program's outputs) joins the batch dict, and so does the
  layout's static `decode_only` (a Python bool)."""
  def fn(static, attention_backend, layout, state, cache, buffer, extra=None):
    batch = {**unpack_arrays(buffer, layout.entries), **(extra or {}), "decode_only": layout.decode_only}
    return impl(static, attention_backend, state, cache, batch)
  fn.__name__ = impl.__name__
  return fn


# Unsharded runners of the same model and shapes share compilations: one jitted function per step variant.
_SHARED: dict = {}


def _shared_jit(impl):
  if impl not in _SHARED:
    _SHARED[impl] = jax.jit(_on_packed(impl), static_argnums=(0, 1, 2), donate_argnums=(4,))
  return _SHARED[impl]


def num_compilations_of(impl) -> int:
  """Shapes compiled so far of the unsharded step variant `impl` (shared by all runners)."""
  return _SHARED[impl]._cache_size() if impl in _SHARED else 0  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True, eq=False)
class WarmupCall:
  """One program for a warm-up to compile: `runner.run(batch, decode_only)` (`impl` None) or
  `runner.call(impl, batch, extra)` (`pdopt.engine.multi_step`, `pdopt.engine.speculative`)."""
  runner: "ModelRunner"
  batch: Mapping[str, np.ndarray]
  impl: Callable | None = None
  extra: Mapping[str, jax.Array] | None = None
  decode_only: bool = False


_MAX_COMPILE_THREADS = 16  # each compilation has its own XLA thread pool and autotuning scratch memory


def warm_up(calls: Sequence[WarmupCall]) -> None:
  """Compiles the programs of `calls` in parallel threads (XLA compiles without holding the GIL), then runs
  each once, which finds it compiled (jit keeps what the ahead-of-time compilation made). Warm-ups of tens
  of shape buckets take a fraction of the time one compilation after another takes (pallas_kernels/NOTES.md,
  ## engine). Under profile-guided latency estimation (`jax_enable_pgle`) a call compiles again anyway, so
  the programs then compile one after another in the runs."""
  if not jax.config.jax_enable_pgle:
    lowered = [c.runner.lower(c.batch, c.decode_only, impl=c.impl, extra=c.extra) for c in calls]
    threads = max(1, min(len(lowered), len(os.sched_getaffinity(0)), _MAX_COMPILE_THREADS))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for _ in pool.map(lambda program: program.compile(), lowered):
        pass
  for c in calls:
    if c.impl is None:
      c.runner.run(c.batch, decode_only=c.decode_only)
    else:
      jax.block_until_ready(c.runner.call(c.impl, c.batch, extra=c.extra, fetch=False))


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
      decode_variant: compile decode-only steps separately (`BatchLayout.decode_only`); None: where the
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
    self.graphdef = StepStatic(graphdef, treedef)
    self.state = leaves
    self.attention_backend = attention_backend
    self.cache = empty_cache(model.config, num_pages, page_size, kv_quant=kv_quant)
    self._batch_sharding = None
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
      self._fn = jax.jit(_on_packed(_step_impl), static_argnums=(0, 1, 2), donate_argnums=(4,),
                         in_shardings=(state_shardings, cache_shardings, replicated),
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

  def run(self, batch: dict[str, np.ndarray], decode_only: bool | None = None) -> np.ndarray:
    """Runs one step; returns the sampled token of every (padded) sequence as int32 [S]."""
    return np.asarray(self.dispatch(self.put(batch, decode_only)))

  def put(self, batch: Mapping[str, np.ndarray], decode_only: bool | None = None) -> PackedBatch:
    """Copies a packed batch's host arrays to this runner's devices in one transfer.

    Args:
      batch: from `pdopt.engine.batch.pack`.
      decode_only: which step variant runs it; None: the decode-only one when the batch is decode-only
        (`is_decode_only`) and this runner compiles that variant. Warm-up passes True to compile it on an
        empty batch. Always False without `decode_variant`.
    """
    buffer, entries = pack_arrays(batch)
    if decode_only is None:
      decode_only = is_decode_only(batch)
    layout = BatchLayout(entries, decode_only=bool(decode_only) and self.decode_variant)
    return PackedBatch(jax.device_put(buffer, self._batch_sharding), layout,
                       sampled=bool(np.any(batch["temperature"] > 0)))

  def _check_variants(self) -> None:
    if self._batch_sharding is not None:
      raise NotImplementedError("step variants (speculative decoding, chained decode steps) do not run on a mesh yet")

  def lower(self, batch: Mapping[str, np.ndarray], decode_only: bool | None = None, impl=None,
            extra: Mapping[str, jax.Array] | None = None) -> jax.stages.Lowered:
    """The program that `run` (or, with `impl`, `call`) would run for `batch`, lowered and not compiled:
    `warm_up` compiles several at once, and the later call with the same shapes finds them compiled."""
    if impl is not None:
      self._check_variants()
    fn, args = self._program(self.put(batch, decode_only if impl is None else False), impl, extra)
    return fn.lower(*args)

  def _program(self, packed: PackedBatch, impl=None, extra: Mapping[str, jax.Array] | None = None):
    """The jitted function and its arguments that run a packed batch: the step (`impl` None) or a variant.
    `dispatch`, `call` and `lower` all take them from here, so what `warm_up` compiles is what they run."""
    head = (self.graphdef, self.attention_backend, packed.layout, self.state, self.cache, packed.buffer)
    if impl is None:
      return self._fn, head
    return _shared_jit(impl), head + (dict(extra or {}),)

  def dispatch(self, batch: Mapping[str, np.ndarray] | PackedBatch) -> jax.Array:
    """Enqueues one step without waiting for it; returns the sampled tokens [S] as a device array.

    Steps dispatched back to back run back to back on the device (each takes the cache the previous one
    returns), which is how the engine benchmark measures a step's device time apart from the host's.
    """
    packed = batch if isinstance(batch, PackedBatch) else self.put(batch)
    fn, args = self._program(packed)
    (tokens, logits, sampling), self.cache = fn(*args)
    return _sample(logits, sampling) if packed.sampled else tokens

  @property
  def output_placement(self):
    """Where the step's outputs live (committed): warm-up inputs that stand in for them must be placed
    here, since jit compiles committed and uncommitted inputs separately."""
    return self._batch_sharding or self.cache[0][0].sharding

  def compile_sampler(self, num_seqs: int) -> None:
    """Compiles the sampling program for `num_seqs` sequence slots (part of the engine's warm-up)."""
    batch = pack([], self.page_size, (1, num_seqs, 1))
    sampling = jax.device_put({k: batch[k] for k in _SAMPLING_KEYS}, self.output_placement)
    logits = jax.device_put(np.zeros((num_seqs, self.config.vocab_size), np.float32), self.output_placement)
    jax.block_until_ready(_sample(logits, sampling))

  def call(self, impl, batch: Mapping[str, np.ndarray], extra: Mapping[str, jax.Array] | None = None,
           fetch: bool = True):
    """Runs a variant of the step on this runner's model and KV cache (speculative decoding's verification
    and draft steps, `pdopt.engine.speculative`).

    Args:
      impl: `impl(static, attention_backend, state, cache, batch) -> (outputs, cache)` where
        `merge(static, state)` is the model and `batch` the dict of device arrays; jitted here (once per
        variant, shared by every unsharded runner), donating the cache.
      batch: host arrays.
      extra: device arrays added to `batch` as they are (e.g. outputs of an earlier call, which then
        never visit the host).
      fetch: wait for the outputs and return them as numpy arrays; False returns the device arrays at
        once (the program may still be running).

    Returns:
      `outputs` (same tree), numpy arrays when `fetch`.
    """
    self._check_variants()
    packed = self.put(batch, decode_only=False)  # One variant per program: warm-up compiles no other.
    fn, args = self._program(packed, impl, extra)
    outputs, self.cache = fn(*args)
    return jax.tree_util.tree_map(np.asarray, outputs) if fetch else outputs
