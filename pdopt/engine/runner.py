"""The compiled step: one forward pass over a packed batch plus on-device sampling.

The KV cache lives here and is donated to every step, so XLA updates its pages in place. One jitted
function serves all shape buckets; `num_compilations` counts the shapes compiled so far.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdopt import sharding

from pdopt.engine import sampler
from pdopt.models.layers import AttentionMetadata
from pdopt.models.transformer import Transformer, empty_cache


def _step_impl(graphdef, attention_backend, state, cache, batch):
  model = nnx.merge(graphdef, state)
  meta = AttentionMetadata(positions=batch["positions"], slot_mapping=batch["slot_mapping"],
                           cu_q_lens=batch["cu_q_lens"], kv_lens=batch["kv_lens"], page_table=batch["page_table"],
                           num_seqs=batch["num_seqs"])
  logits, cache = model(batch["token_ids"], meta, cache, logits_indices=batch["logits_indices"],
                        attention_backend=attention_backend)
  tokens = sampler.sample(logits, batch["temperature"], batch["top_k"], batch["top_p"], batch["seeds"],
                          batch["token_index"])
  return tokens, cache


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


# Unsharded engines of the same model and shapes share compilations.
_step = jax.jit(_step_impl, static_argnums=(0, 1), donate_argnums=(3,))


class ModelRunner:
  """Holds the model state and the KV pages on the device and runs compiled steps."""

  def __init__(self, model: Transformer, num_pages: int, page_size: int, attention_backend: str = "auto",
               mesh: Mesh | None = None, kv_quant: str | None = None):
    """Args:
      model: the model; with a mesh, its parameters must already be sharded (`pdopt.sharding.shard_model`).
      num_pages, page_size: the KV pool.
      attention_backend: see `pallas_kernels.api`.
      mesh: shard the KV cache by KV head over its `model` axis and compile the step with explicit input
        and output shardings; None runs on the default device.
      kv_quant: None, "int8" or "fp8" (see `pdopt.cache.kv_cache`).
    """
    self.config = model.config
    self.page_size = page_size
    self.num_pages = num_pages
    self.graphdef, self.state = nnx.split(model)
    self.attention_backend = attention_backend
    self.cache = empty_cache(model.config, num_pages, page_size, kv_quant=kv_quant)
    self._batch_sharding = None
    self._fn = _step
    if mesh is None:
      # One plain placement for state and cache: parameters restored by orbax carry a mesh sharding, and a
      # step whose input shardings change between calls would compile again after warm-up.
      device = jax.devices()[0]
      self.state = jax.device_put(self.state, device)
      self.cache = jax.device_put(self.cache, device)
    if mesh is not None:
      replicated = NamedSharding(mesh, PartitionSpec())
      cache_shardings = [tuple(sharding.cache_sharding(mesh, a.ndim) for a in layer) for layer in self.cache]
      self.cache = jax.device_put(self.cache, cache_shardings)
      state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)
      self._batch_sharding = replicated
      self._fn = jax.jit(_step_impl, static_argnums=(0, 1), donate_argnums=(3,),
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

  def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Runs one step; returns the sampled token of every (padded) sequence as int32 [S]."""
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    if self._batch_sharding is not None:
      arrays = jax.device_put(arrays, self._batch_sharding)
    tokens, self.cache = self._fn(self.graphdef, self.attention_backend, self.state, self.cache, arrays)
    return np.asarray(tokens)

  def call(self, fn, batch: dict[str, np.ndarray]):
    """Runs a variant of the step on this runner's model and KV cache (speculative decoding's verification
    and draft steps, `pdopt.engine.speculative`).

    Args:
      fn: jitted `fn(graphdef, attention_backend, state, cache, batch) -> (outputs, cache)`, static in its
        first two arguments and donating the cache.
      batch: host arrays.

    Returns:
      `outputs` as numpy arrays (same tree).
    """
    if self._batch_sharding is not None:
      raise NotImplementedError("step variants (speculative decoding) do not run on a mesh yet")
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    outputs, self.cache = fn(self.graphdef, self.attention_backend, self.state, self.cache, arrays)
    return jax.tree_util.tree_map(np.asarray, outputs)
