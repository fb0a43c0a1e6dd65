"""Split-K paged decode attention for GPU, and the quantization of KV pages.

`paged_decode` has the semantics of `pallas_kernels.reference.paged_decode_attention` (Q >= 1 new query
tokens per sequence); `ragged_decode` serves a ragged batch in which every sequence has one query token, at
row s. Both take keyword-only tuning arguments. Two Pallas implementations, which split a sequence's keys
and merge the splits the same way (`common`):

- "mosaic" (`pallas_mgpu`): Mosaic GPU, TMA page copies and warp-specialized consumers; Hopper (sm_90)
  only, bfloat16 or float16 queries, pages in q's dtype at head_dim 64 or 128 or int8 with per-token
  scales at head_dim 128, Q * G <= 64.
- "triton" (`pallas_triton`): Triton lowering; float32, bfloat16 or float16 queries, pages in those dtypes
  or int8 / float8_e4m3fn with per-token or per-head scales, and the Pallas interpreter (CPU tests).

`implementation=None` picks "mosaic" on an sm_90 GPU at head_dim 128 for the pages it serves, when no
Triton argument was given, "triton" otherwise. Neither has a sliding window. `quant` quantizes K/V for the
cache.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.gpu_info import on_hopper
from pallas_kernels.paged_decode import common
from pallas_kernels.paged_decode import pallas_mgpu
from pallas_kernels.paged_decode import pallas_triton
from pallas_kernels.paged_decode.quant import dequantize_kv, quantize_kv, storage_dtype

_IMPLEMENTATIONS = ("mosaic", "triton")


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "num_splits", "pages_per_block", "num_warps",
                     "num_stages", "int8_upcast", "interpret", "implementation", "mosaic_config"))
def paged_decode(
    q: jax.Array,  # [S, Q, H, D]
    k_pages: jax.Array,  # [K, P, page_size, D]
    v_pages: jax.Array,  # [K, P, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, Pmax] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    v_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    num_splits: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    int8_upcast: Literal["bits", "convert"] = "bits",
    interpret: bool = False,
    implementation: Literal["mosaic", "triton"] | None = None,
    mosaic_config: pallas_mgpu.DecodeConfig | None = None,
) -> jax.Array:
  """Paged decode attention; the semantics of `reference.paged_decode_attention`.

  Args:
    q: Q new query tokens of each of S sequences; float32, bfloat16 or float16.
    k_pages, v_pages: the layer's pages `[K, P, page_size, D]`, in q's dtype, or int8 / float8_e4m3fn
      with scales.
    kv_lens: KV length of each sequence including its Q new tokens; 0 marks a padding sequence.
    page_table: page ids of each sequence in order.
    sm_scale: softmax scale.
    sliding_window: unsupported (raises NotImplementedError so the api falls back to the reference).
    k_scales, v_scales: float32 dequantization scales, per (head, token) `[K, P, page_size]` or per head
      `[K]`; None for unquantized pages.
    num_splits: programs per (sequence, KV head); default from the SM count (`common.choose_num_splits`).
    pages_per_block: pages gathered per loop step of the Triton kernel; default
      `pallas_triton.default_block_tokens` tokens' worth.
    num_warps, num_stages: Triton launch parameters (default 4 warps, 3 stages).
    int8_upcast: how the Triton kernel turns int8 pages into float16: "bits" (integer arithmetic) or
      "convert" (`astype`, the conversion unit); kept to measure one against the other.
    interpret: run the Triton kernel in the Pallas interpreter (CPU tests).
    implementation: "mosaic" (`pallas_mgpu`, sm_90 only), "triton", or None: "mosaic" on an sm_90 GPU at
      head_dim 128 for the pages it serves (bf16/f16, int8 with per-token scales), when no Triton argument
      (pages_per_block, num_warps, num_stages, int8_upcast, interpret) was given.
    mosaic_config: launch parameters of the Mosaic GPU kernel.

  Returns:
    [S, Q, H, D] in q's dtype; zeros for sequences with kv_lens == 0.

  Raises:
    NotImplementedError: for inputs the kernels do not serve (sliding window, head_dim or page_size not
      a power of two, Q * G > 128, mismatched shapes), or that the Mosaic GPU kernel does not serve when
      it is asked for.
    ValueError: an unknown implementation or int8_upcast, or Triton arguments with "mosaic".
  """
  num_seqs, q_len, num_heads, head_dim = q.shape
  if q.shape[0] != kv_lens.shape[0]:
    raise NotImplementedError(f"q has {q.shape[0]} sequences, kv_lens {kv_lens.shape[0]}")
  # [S, Q, H, D] -> [S, Q * H, D] is free; the kernels gather their rows.
  out = _decode(q.reshape(num_seqs, q_len * num_heads, head_dim), k_pages, v_pages, kv_lens, page_table,
                q_len=q_len, sm_scale=sm_scale, sliding_window=sliding_window, k_scales=k_scales,
                v_scales=v_scales, num_splits=num_splits, pages_per_block=pages_per_block, num_warps=num_warps,
                num_stages=num_stages, int8_upcast=int8_upcast, interpret=interpret, implementation=implementation,
                mosaic_config=mosaic_config)  # [S, Q, H, D]
  return out.astype(q.dtype)


def ragged_decode(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [K, P, page_size, D]
    v_pages: jax.Array,  # [K, P, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, Pmax] int32
    **options,
) -> jax.Array:
  """Decode attention in the layout of a ragged batch where every sequence has one query token.

  Sequence s's query is row s of `q` (a ragged batch whose `cu_q_lens[s] == s`), so the rows go to the
  kernel and come back in place with no gather or scatter: one kernel and one combine, against the
  extra kernels of the mixed path. T may exceed S (padding rows); rows of no sequence return zeros.

  Args:
    q: [T, H, D] query rows.
    k_pages, v_pages, kv_lens, page_table: as in `paged_decode`.
    **options: `paged_decode`'s keyword arguments (`sm_scale` required).

  Returns:
    [T, H, D] in q's dtype.
  """
  num_tokens = q.shape[0]
  num_seqs = kv_lens.shape[0]
  if num_tokens < num_seqs:  # Every program reads its sequence's row.
    q = jnp.pad(q, ((0, num_seqs - num_tokens), (0, 0), (0, 0)))
  out = _decode(q, k_pages, v_pages, kv_lens, page_table, q_len=1, **options)[:, 0]  # [S, H, D]
  if num_tokens > num_seqs:
    out = jnp.pad(out, ((0, num_tokens - num_seqs), (0, 0), (0, 0)))
  return out[:num_tokens].astype(q.dtype)


def _decode(q_flat, k_pages, v_pages, kv_lens, page_table, *, q_len, sm_scale, sliding_window=None, k_scales=None,
            v_scales=None, num_splits=None, pages_per_block=None, num_warps=None, num_stages=None,
            int8_upcast="bits", interpret=False, implementation=None, mosaic_config=None):
  """The checks, the choice of implementation and its kernel: q_flat [S' >= S, Q * H, D] (sequence s's
  queries in row s) -> [S, Q, H, D], float32 (or q's dtype where the kernel ran with one split and wrote the
  output itself)."""
  common.check_inputs(q_flat, k_pages, v_pages, kv_lens, page_table, q_len=q_len, sliding_window=sliding_window)
  if implementation not in (None, *_IMPLEMENTATIONS):
    raise ValueError(f"unknown paged_decode implementation {implementation!r}; valid: mosaic, triton")
  head_dim = q_flat.shape[2]
  group = q_flat.shape[1] // q_len // k_pages.shape[0]
  triton_args = [name for name, value in (("pages_per_block", pages_per_block), ("num_warps", num_warps),
                                           ("num_stages", num_stages), ("interpret", interpret or None),
                                           ("int8_upcast", None if int8_upcast == "bits" else int8_upcast))
                 if value is not None]
  config = mosaic_config or pallas_mgpu.DecodeConfig()
  supported = dict(rows=q_len * group, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales,
                   config=config)
  if implementation is None:
    implementation = "triton"
    # Measured on an H200 (NOTES.md, ## paged_decode): at head_dim 128 the Mosaic kernel matches the Triton
    # one with one XLA kernel less per call, and with int8 pages it is 1.6x faster (B=64, L=4096, page 16:
    # 164 vs 268 us kernel time in one run, before its second TMA warp); at head_dim 64 (twice the softmax
    # work per byte) it is 15-25% slower.
    if not triton_args and head_dim == 128 and on_hopper():
      try:
        pallas_mgpu.check_supported(q_flat.dtype, k_pages, v_pages, **supported)
        implementation = "mosaic"
      except NotImplementedError:
        pass
  elif implementation == "mosaic":
    if triton_args:
      raise ValueError(f"the mosaic implementation takes no Triton arguments; got {triton_args}")
    pallas_mgpu.check_supported(q_flat.dtype, k_pages, v_pages, **supported)
  if implementation == "mosaic":
    return pallas_mgpu.decode(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales, v_scales, q_len=q_len,
                              sm_scale=sm_scale, num_splits=num_splits, config=config)
  return pallas_triton.decode(q_flat, k_pages, v_pages, kv_lens, page_table, q_len=q_len, sm_scale=sm_scale,
                              k_scales=k_scales, v_scales=v_scales, num_splits=num_splits,
                              pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages,
                              int8_upcast=int8_upcast, interpret=interpret)


__all__ = ["dequantize_kv", "paged_decode", "quantize_kv", "ragged_decode", "storage_dtype"]
