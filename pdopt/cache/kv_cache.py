"""KV pages on the device, in the layout the attention kernels read.

Per layer, one array for K and one for V:

    [K, P, page_size, D]   (KV head, page, slot within the page, head dim)

head-major, so one head's `page_size * D` values in a page are contiguous (see
`pallas_kernels.reference`). Token `t` of a sequence lives in page `page_table[t // page_size]` at slot
`t % page_size`; the engine hands the model a flat slot `page * page_size + slot` per new token.

Quantized caches (`kv_quant="int8"` or `"fp8"`) store int8 or float8 e4m3 values and, per layer, float32
scales for each (KV head, token), `[K, P, page_size]`; a layer's cache is then (K pages, V pages, K scales,
V scales). New K/V are quantized as they are written and dequantized inside attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import quant

# Per layer (K pages, V pages) `[K, P, page_size, D]`, plus (K scales, V scales) `[K, P, page_size]` when
# the cache is quantized.
LayerCache = tuple[jax.Array, ...]

KV_QUANT_KINDS = ("int8", "fp8")


def empty_cache(num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                dtype, kv_quant: str | None = None) -> list[LayerCache]:
  """Zeroed pages (and unit scales when quantized) for every layer.

  Args:
    kv_quant: None stores `dtype`; "int8" or "fp8" store quantized values with per-(head, token) scales.
  """
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  if kv_quant is None:
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]
  if kv_quant not in KV_QUANT_KINDS:
    raise ValueError(f"unknown KV cache quantization {kv_quant!r}; valid: {', '.join(KV_QUANT_KINDS)} or None")
  values = quant.storage_dtype(kv_quant)
  return [(jnp.zeros(shape, values), jnp.zeros(shape, values), jnp.ones(shape[:-1], jnp.float32),
           jnp.ones(shape[:-1], jnp.float32)) for _ in range(num_layers)]


def kv_quant_of(layer: LayerCache) -> str | None:
  """The quantization of a layer's cache ("int8", "fp8") or None."""
  if len(layer) == 2:
    return None
  return "int8" if layer[0].dtype == jnp.int8 else "fp8"


def write_layer(layer: LayerCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> LayerCache:
  """Writes new K and V `[T, K, D]` of a layer at flat slots `[T]`, quantizing them if the cache is."""
  kind = kv_quant_of(layer)
  if kind is None:
    return write_kv(layer[0], k, slot_mapping), write_kv(layer[1], v, slot_mapping)
  kq, ks = quant.quantize_kv(k, kind, "token")
  vq, vs = quant.quantize_kv(v, kind, "token")
  return (write_kv(layer[0], kq, slot_mapping), write_kv(layer[1], vq, slot_mapping),
          write_scales(layer[2], ks, slot_mapping), write_scales(layer[3], vs, slot_mapping))


def write_scales(scales: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
  """Scatters per-(token, head) scales `[T, K]` into `[K, P, page_size]` (padding slots dropped)."""
  num_kv_heads, num_pages, page_size = scales.shape
  flat = scales.reshape(num_kv_heads, num_pages * page_size)
  slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)
  return flat.at[:, slots].set(new.T, mode="drop").reshape(scales.shape)


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
