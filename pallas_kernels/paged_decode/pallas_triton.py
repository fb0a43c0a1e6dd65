"""Split-K paged decode attention for GPU: Pallas with the Triton lowering.

Decode reads every K/V value of a sequence once per step and does 2 * Q * G FLOPs per value, so it is
memory-bound; the kernel's only job is to keep HBM busy. The package (`paged_decode/__init__`) chooses
between this kernel and the Mosaic GPU one (`pallas_mgpu`); both split a sequence and write split partials
the same way (`common`). Design of this one:

- One program per (sequence, KV head, split). It holds all G = H / K query heads of the group and all
  Q query tokens (speculative verification, Q <= 5) as M = Q * G rows padded to a power of two >= 16
  (Triton's smallest dot), so every K/V byte is read from HBM exactly once per step. The rows are
  gathered from `q` `[S, Q * H, D]` (a free reshape) inside the kernel, so no transpose runs before it.
- The program walks its share of the sequence in blocks of `pages_per_block` pages, reading the page ids
  from the sequence's row of the page table and gathering the pages straight from the cache
  (`[K, P, page_size, D]`, head-major, so one head's page is `page_size * D` contiguous values). The
  kernel sees the cache as `[K, P * page_size, D]` (a reshape, free) and loads a block as one 2-D
  gather `[block_tokens, D]` whose rows are `page_id * page_size + slot`: a plain load feeding the dot,
  which Triton's software pipeliner turns into asynchronous copies `num_stages` blocks ahead. The cache
  is never copied or transposed.
- Splits: the sequence's blocks are divided evenly among `num_splits` programs at run time (from its
  actual length), so short sequences in a long page table do not leave splits idle while others work;
  a split past the end does nothing and reports (m = -inf, l = 0). `num_splits` is chosen from the
  number of SMs so that one sequence with a long context still fills the chip.
- Each split writes float32 partials (acc, m, l) with m in log2 units; `common.combine_splits` merges them
  in jnp.
  With one split the program normalizes its rows itself and writes the output in q's dtype and layout.
- Quantized pages (int8 / float8_e4m3fn) are converted to float16 in registers (exact for both; int8 by
  bit arithmetic, see `_upcast`); per-(token, head) scales multiply the logits (K) and the
  probabilities (V), per-head scales fold into the softmax scale (K) and the final accumulator (V).
- The last block of a sequence is loaded with a mask (other=0), so slots past kv_len are never read:
  they may hold stale data or NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu_info import num_sms
from pallas_kernels.paged_decode.common import choose_num_splits, combine_splits, split_range
from pallas_kernels.sizes import floor_power_of_2, next_power_of_2
from pallas_kernels.triton_util import CompilerParams

_LOG2E = math.log2(math.e)
_MIN_ROWS = 16  # smallest M of a Triton dot


def default_block_tokens(page_dtype, head_dim: int) -> int:
  """Tokens per loop step: 16 KB of K per block (and as much V), between 32 and 128 tokens. Measured on an
  H200 (NOTES.md, ## paged_decode): bf16 at D=128 is best at 64 tokens for small batches (B=8, L=4k:
  64 us against 70 at 128 tokens); int8 pages at 64 tokens (8 KB) lose 25% at B=64, L=4k; and bf16 at
  D=64 (the Llama-3.2-1B decode step) is 2-9% slower at 64 tokens than at 128."""
  return max(32, min(128, 16384 // (head_dim * jnp.dtype(page_dtype).itemsize)))


def _dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int], tuple[int]],
         precision: lax.Precision | None) -> jax.Array:
  """2-D matmul with float32 accumulation (`pl.dot` is gone from JAX 0.12)."""
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _compute_dtype(q_dtype, page_dtype) -> jnp.dtype:
  """Operand dtype of the two dots.

  float32 queries keep float32 (exact tests). Quantized pages compute in float16: int8 and e4m3 values
  are exact there, and both convert to float16 without the slow int-to-float conversion unit (the
  queries must then lie within float16's range, as the activations of any bf16 model do).
  """
  if q_dtype == jnp.float32:
    return jnp.dtype(jnp.float32)
  if page_dtype in (jnp.int8, jnp.float8_e4m3fn):
    return jnp.dtype(jnp.float16)
  return jnp.dtype(q_dtype)


def _upcast(x: jax.Array, dtype, int8_upcast: str = "bits") -> jax.Array:
  """Page values in the dot's dtype; int8 -> float16 by bit arithmetic.

  `astype` would lower to int-to-float conversions, which run at a quarter of the ALU rate on Hopper
  and made int8 pages no faster than bf16. Instead: the float16 with bits 0x6400 + u is 1024 + u for
  0 <= u < 1024, so x + 128 added to those bits gives 1152 + x exactly.
  """
  if x.dtype == jnp.int8 and dtype == jnp.float16 and int8_upcast == "bits":
    bits = x.astype(jnp.int16) + jnp.int16(0x6400 + 128)
    return lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152)
  return x.astype(dtype)


def _decode_kernel(
    kv_len_ref,  # [1] int32
    pages_ref,  # [Pmax] int32: this sequence's row of the page table
    q_ref,  # [Q * H, D]: this sequence's queries, token-major
    k_ref,  # [P * page_size, D]: this KV head's pages, slots flattened (a free reshape)
    v_ref,  # [P * page_size, D]
    k_scale_ref,  # None, [1] (per head) or [P * page_size] (per token) float32
    v_scale_ref,  # None, [1] (per head) or [P * page_size] (per token) float32
    *out_refs,  # one split: o_ref [Q * H, D] in q's dtype, this sequence's output rows; else the split's
    # partials acc_ref [M, D] float32 (unnormalized output), m_ref [M] float32 (running max of the logits,
    # log2 units) and l_ref [M] float32 (softmax denominator)
    q_len: int,
    group: int,
    page_size: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    precision: lax.Precision | None,
    per_token_k: bool,
    per_token_v: bool,
    rows: int,
    num_heads: int,
    int8_upcast: str,
):
  split = pl.program_id(2)
  kv_head = pl.program_id(1)
  head_dim = q_ref.shape[1]
  block_tokens = pages_per_block * page_size
  compute_dtype = _compute_dtype(q_ref.dtype, k_ref.dtype)

  kv_len = kv_len_ref[0]
  length = jnp.where(kv_len > 0, jnp.maximum(kv_len, q_len), 0)
  first, steps = split_range(kv_len, q_len, split, num_splits, block_tokens)
  last = first + steps

  # Row r of the M rows is head kv_head * G + r % G of query token r // G (rows past Q * G are padding);
  # the token sits at position length - q_len + r // G and sees keys up to there.
  row = lax.broadcasted_iota(jnp.int32, (rows,), 0)
  row_token = jnp.minimum(lax.div(row, group), q_len - 1)  # [M]
  q_row = row_token * num_heads + kv_head * group + lax.rem(row, group)
  dim = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  q_mask = jnp.broadcast_to((row < q_len * group)[:, None], (rows, head_dim))
  q = plgpu.load(q_ref.at[q_row[:, None], dim], mask=q_mask, other=0.0)  # [M, D]
  q = q.astype(compute_dtype)
  row_limit = (length - q_len + row_token)[:, None]  # [M, 1]

  qk_scale = sm_scale * _LOG2E
  if k_scale_ref is not None and not per_token_k:
    qk_scale = qk_scale * k_scale_ref[0]
  tok_in_block = lax.broadcasted_iota(jnp.int32, (block_tokens,), 0)
  k_other = 0 if jnp.issubdtype(k_ref.dtype, jnp.integer) else 0.0  # Triton casts no int to fp8
  v_other = 0 if jnp.issubdtype(v_ref.dtype, jnp.integer) else 0.0

  def body(b, carry):
    acc, m_prev, l_prev = carry
    pos = b * block_tokens + tok_in_block  # [bt] key positions
    in_seq = pos < length
    # Each id is read page_size times (from L1); ids past the sequence are not read, so the table's width
    # need not be a multiple of the block's pages.
    page_ids = plgpu.load(pages_ref.at[lax.div(pos, page_size)], mask=in_seq, other=0)  # [bt]
    slot = page_ids * page_size + lax.rem(pos, page_size)  # [bt] rows of k_ref / v_ref
    # A 2-D gather straight into the dot's operand: row t of the block is k_ref[slot[t], :]. Slots past
    # kv_len are masked, so stale or NaN cache entries are never read.
    kv_idx = (slot[:, None], dim)
    kv_mask = jnp.broadcast_to(in_seq[:, None], (block_tokens, head_dim))
    k = plgpu.load(k_ref.at[kv_idx], mask=kv_mask, other=k_other)  # [bt, D]
    v = plgpu.load(v_ref.at[kv_idx], mask=kv_mask, other=v_other)  # [bt, D]
    s = _dot(q, _upcast(k, compute_dtype, int8_upcast), ((1,), (1,)), precision) * qk_scale  # [M, bt]
    if per_token_k:
      s = s * plgpu.load(k_scale_ref.at[slot], mask=in_seq, other=0.0)[None, :]
    s = jnp.where(pos[None, :] <= row_limit, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows that have seen no key yet
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_next = alpha * l_prev + p.sum(axis=-1)
    v = _upcast(v, compute_dtype, int8_upcast)
    if per_token_v:
      # The V scales run along the reduction: fold them into p, divided by the block's largest scale so
      # that p stays in [0, 1] (float16 keeps full precision there), and multiply that back afterwards.
      vs = plgpu.load(v_scale_ref.at[slot], mask=in_seq, other=0.0)  # [bt]
      vs_max = vs.max()
      vs_max = jnp.where(vs_max > 0, vs_max, 1.0)
      pv = _dot((p * (vs / vs_max)[None, :]).astype(compute_dtype), v, ((1,), (0,)), precision) * vs_max
    else:
      pv = _dot(p.astype(compute_dtype), v, ((1,), (0,)), precision)
    acc = acc * alpha[:, None] + pv
    return acc, m_next, l_next

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(first, last, body, init)
  if v_scale_ref is not None and not per_token_v:
    acc = acc * v_scale_ref[0]
  if len(out_refs) == 1:  # one split: the normalized output, in q's rows (no combine after the kernel)
    o_ref, = out_refs
    real = row < q_len * group
    # Padding rows point past the output: the Pallas interpreter implements a masked store as a scatter of
    # (mask ? new : old), where a duplicate of a real row could put back the old value.
    o_row = jnp.where(real, q_row, o_ref.shape[0] + row)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # no key (kv_len 0): acc = 0, l = 0, output 0
    plgpu.store(o_ref.at[o_row[:, None], dim], out.astype(o_ref.dtype),
                mask=jnp.broadcast_to(real[:, None], (rows, head_dim)))
    return
  acc_ref, m_ref, l_ref = out_refs
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _flat_scales(scales: jax.Array | None, num_kv_heads: int, num_pages: int, page_size: int):
  """Scales as the kernel reads them, with their BlockSpec: per head [K], or per token [K, P * ps]."""
  if scales is None:
    return None, None
  if scales.shape == (num_kv_heads,):
    return scales.astype(jnp.float32), pl.BlockSpec((1,), lambda s, h, j: (h,))
  if scales.shape == (num_kv_heads, num_pages, page_size):
    flat = scales.astype(jnp.float32).reshape(num_kv_heads, num_pages * page_size)
    return flat, pl.BlockSpec((None, num_pages * page_size), lambda s, h, j: (h, 0))
  raise NotImplementedError(
      f"scales of shape {scales.shape}; expected [K]={num_kv_heads} or [K, P, page_size]")


def decode(
    q_flat: jax.Array,  # [S' >= S, Q * H, D]
    k_pages: jax.Array,  # [K, P, page_size, D]
    v_pages: jax.Array,  # [K, P, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, Pmax] int32
    *,
    q_len: int,
    sm_scale: float,
    k_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    v_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    num_splits: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    int8_upcast: Literal["bits", "convert"] = "bits",
    interpret: bool = False,
) -> jax.Array:
  """Paged decode attention of the queries `q_flat` (sequence s's Q tokens in row s, token-major), for inputs
  that passed `common.check_inputs`.

  Args:
    q_flat, k_pages, v_pages, kv_lens, page_table, k_scales, v_scales, sm_scale, num_splits: as in
      `paged_decode.paged_decode`; q_len is Q.
    pages_per_block: pages gathered per loop step; default `default_block_tokens` tokens' worth.
    num_warps, num_stages: Triton launch parameters (default 4 warps, 3 stages).
    int8_upcast: how int8 pages become float16: "bits" (integer arithmetic, `_upcast`) or "convert"
      (`astype`, the conversion unit); kept to measure one against the other.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    [S, Q, H, D]: float32 merged from the splits' partials, or in q's dtype where one split wrote the output.

  Raises:
    ValueError: an unknown int8_upcast.
  """
  if int8_upcast not in ("bits", "convert"):
    raise ValueError(f"unknown int8_upcast {int8_upcast!r}; valid: bits, convert")
  num_kv_heads, num_pages, page_size, _ = k_pages.shape
  num_heads = q_flat.shape[1] // q_len
  head_dim = q_flat.shape[2]
  num_seqs = kv_lens.shape[0]
  max_pages = page_table.shape[1]
  group = num_heads // num_kv_heads
  rows = max(_MIN_ROWS, next_power_of_2(q_len * group))
  if pages_per_block is None:
    pages_per_block = max(1, default_block_tokens(k_pages.dtype, head_dim) // page_size)
  # A power of two (Triton block sizes), at most the table width, and at least 16 tokens (dot size).
  pages_per_block = min(floor_power_of_2(pages_per_block), next_power_of_2(max_pages))
  pages_per_block = max(pages_per_block, pl.cdiv(16, page_size))
  max_blocks = pl.cdiv(max_pages, pages_per_block)
  if num_splits is None:
    num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks, num_sms=num_sms())

  precision = lax.Precision.HIGHEST if q_flat.dtype == jnp.float32 else None
  kernel = functools.partial(
      _decode_kernel, q_len=q_len, group=group, page_size=page_size, pages_per_block=pages_per_block,
      num_splits=num_splits, sm_scale=sm_scale, precision=precision,
      per_token_k=k_scales is not None and k_scales.ndim == 3,
      per_token_v=v_scales is not None and v_scales.ndim == 3, rows=rows, num_heads=num_heads,
      int8_upcast=int8_upcast)
  num_slots = num_pages * page_size
  # [K, P, page_size, D] -> [K, P * page_size, D] is a bitcast of the contiguous cache, not a copy.
  k_flat = k_pages.reshape(num_kv_heads, num_slots, head_dim)
  v_flat = v_pages.reshape(num_kv_heads, num_slots, head_dim)
  k_scales, k_scale_spec = _flat_scales(k_scales, num_kv_heads, num_pages, page_size)
  v_scales, v_scale_spec = _flat_scales(v_scales, num_kv_heads, num_pages, page_size)
  grid = (num_seqs, num_kv_heads, num_splits)
  in_specs = [
      pl.BlockSpec((1,), lambda s, h, j: (s,)),  # kv_lens
      pl.BlockSpec((None, max_pages), lambda s, h, j: (s, 0)),  # page_table
      pl.BlockSpec((None, q_len * num_heads, head_dim), lambda s, h, j: (s, 0, 0)),  # q
      pl.BlockSpec((None, num_slots, head_dim), lambda s, h, j: (h, 0, 0)),  # k_pages
      pl.BlockSpec((None, num_slots, head_dim), lambda s, h, j: (h, 0, 0)),  # v_pages
      k_scale_spec,
      v_scale_spec,
  ]
  if num_splits == 1:  # every KV head's program writes its group's rows of the sequence's output
    out_specs = [pl.BlockSpec((None, q_len * num_heads, head_dim), lambda s, h, j: (s, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((num_seqs, q_len * num_heads, head_dim), q_flat.dtype)]
  else:
    part = (num_seqs, num_kv_heads, num_splits, rows)
    out_specs = [
        pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, j: (s, h, j, 0, 0)),  # acc
        pl.BlockSpec((None, None, None, rows), lambda s, h, j: (s, h, j, 0)),  # m
        pl.BlockSpec((None, None, None, rows), lambda s, h, j: (s, h, j, 0)),  # l
    ]
    out_shape = [
        jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
        jax.ShapeDtypeStruct(part, jnp.float32),
        jax.ShapeDtypeStruct(part, jnp.float32),
    ]
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 3),
      interpret=interpret,
      name=f"paged_decode_q{q_len}_g{group}_ppb{pages_per_block}",
  )(kv_lens.astype(jnp.int32), page_table.astype(jnp.int32), q_flat, k_flat, v_flat, k_scales, v_scales)
  if num_splits == 1:
    return out[0].reshape(num_seqs, q_len, num_heads, head_dim)
  return combine_splits(*out, q_len=q_len, group=group)
