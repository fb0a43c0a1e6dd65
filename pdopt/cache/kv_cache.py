"""KV pages on the device, in the layout the attention kernels read.

Per layer, one array for K and one for V:

    [K, P, page_size, D]   (KV head, page, slot within the page, head dim)

head-major, so one head's `page_size * D` values in a page are contiguous (see
`pallas_kernels.reference`). Token `t` of a sequence lives in page `page_table[t // page_size]` at slot
`t % page_size`; the engine hands the model a flat slot `page * page_size + slot` per new token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per layer (K pages, V pages), each [K, P, page_size, D].
LayerCache = tuple[jax.Array, jax.Array]


def empty_cache(num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                dtype) -> list[LayerCache]:
  """Zeroed K and V pages for every layer, `[K, num_pages, page_size, D]` each."""
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int, dtype) -> int:
  """Device bytes of the whole cache (K and V, all layers)."""
  return 2 * num_layers * num_kv_heads * head_dim * num_pages * page_size * jnp.dtype(dtype).itemsize


def write_kv(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
  """Scatters new K or V `[T, K, D]` into `pages` `[K, P, page_size, D]` at flat slots `[T]`.

  Padding tokens (negative slots) are dropped. Under `jit` with the pages donated, XLA updates the buffer
  in place: no copy of the pool per step.
  """
  num_kv_heads, num_pages, page_size, head_dim = pages.shape
  flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
  slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
  flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop")
  return flat.reshape(pages.shape)
