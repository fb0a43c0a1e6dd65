"""Split-K paged decode attention for GPU: Pallas with the Triton lowering.

Decode reads every K/V value of a sequence once per step and does 2 * Q * G FLOPs per value, so it is
memory-bound; the kernel's only job is to keep HBM busy. `paged_decode` and `ragged_decode` (the entry
points) run the Mosaic GPU kernel of `pallas_mgpu` instead on an sm_90 GPU at head_dim 128 for bf16/f16
pages and for int8 pages of 16 or a multiple of 32 tokens (it also serves head_dim 64 when asked,
`implementation="mosaic"`); both kernels write the same split partials. Design of this one:

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
- Each split writes float32 partials (acc, m, l) with m in log2 units; `combine_splits` merges them in jnp.
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

from pallas_kernels.gpu_info import num_sms, on_hopper
from pallas_kernels.paged_decode import pallas_mgpu
from pallas_kernels.sizes import floor_power_of_2, is_power_of_2, next_power_of_2
from pallas_kernels.triton_util import CompilerParams

_LOG2E = math.log2(math.e)
_MIN_ROWS = 16  # smallest M of a Triton dot
_MAX_ROWS = 128  # Q * G beyond this would spill registers; served by the reference instead
_PAGE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8,
                                            jnp.float8_e4m3fn))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, *, num_sms: int,
                      programs_per_sm: int = 4) -> int:
  """Number of splits per (sequence, KV head) so that the grid fills the chip.

  Args:
    num_seqs: sequences in the batch (S).
    num_kv_heads: KV heads (K).
    max_blocks: compute blocks in the longest possible sequence (page-table width / pages_per_block).
    num_sms: streaming multiprocessors of the card.
    programs_per_sm: programs wanted per SM.

  Returns:
    The largest split count giving at most `num_sms * programs_per_sm` programs (at least 1), capped so
    every split of a full-length sequence gets at least one block. Rounding down matters: one split too
    many starts a last partial wave of programs (H200, B=8, L=32k: 5 splits 357 us, 4 splits 283 us).
  """
  want = num_sms * programs_per_sm
  return max(1, min(want // (num_seqs * num_kv_heads), max_blocks))


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
  first, steps = pallas_mgpu.split_range(kv_len, q_len, split, num_splits, block_tokens)
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


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array, *, q_len: int, group: int) -> jax.Array:
  """Merges split partials (both kernels' format): acc [S, K, N, M >= Q * G, D], m (log2 units) and l
  [S, K, N, M] -> float32 [S, Q, K * G, D]."""
  num_seqs, num_kv_heads, _, _, head_dim = acc.shape
  rows = q_len * group
  acc, m, l = acc[:, :, :, :rows], m[:, :, :, :rows], l[:, :, :, :rows]
  if acc.shape[2] == 1:  # one split: nothing to weigh (no key: acc = 0, l = 0); one XLA fusion less
    denom, out = l[:, :, 0], acc[:, :, 0]
  else:
    m_max = jnp.max(m, axis=2, keepdims=True)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp2(m - m_max)  # 0 for splits that saw no key
    denom = jnp.sum(l * w, axis=2)
    out = jnp.sum(acc * w[..., None], axis=2)
  out = out / jnp.where(denom > 0, denom, 1.0)[..., None]  # [S, K, Q * G, D]
  out = out.reshape(num_seqs, num_kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(num_seqs, q_len, num_kv_heads * group, head_dim)


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
    num_splits: programs per (sequence, KV head); default from the SM count (`choose_num_splits`).
    pages_per_block: pages gathered per loop step; default `default_block_tokens` tokens' worth.
    num_warps, num_stages: Triton launch parameters (default 4 warps, 3 stages).
    int8_upcast: how int8 pages become float16: "bits" (integer arithmetic, `_upcast`) or "convert"
      (`astype`, the conversion unit); kept to measure one against the other.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    implementation: "mosaic" (`pallas_mgpu`, sm_90 only), "triton", or None: "mosaic" on an sm_90 GPU at
      head_dim 128 for the pages it serves (bf16/f16, int8 with per-token scales), when no Triton argument
      (pages_per_block, num_warps, num_stages, int8_upcast, interpret) was given.
    mosaic_config: launch parameters of the Mosaic GPU kernel.

  Returns:
    [S, Q, H, D] in q's dtype; zeros for sequences with kv_lens == 0.

  Raises:
    NotImplementedError: for inputs the kernel does not serve (sliding window, head_dim or page_size not
      a power of two, Q * G > 128, mismatched shapes).
  """
  num_seqs, q_len, num_heads, head_dim = q.shape
  if q.shape[0] != kv_lens.shape[0]:
    raise NotImplementedError(f"q has {q.shape[0]} sequences, kv_lens {kv_lens.shape[0]}")
  # [S, Q, H, D] -> [S, Q * H, D] is free; the kernel gathers its rows.
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
  """The kernel and the combine: q_flat [S' >= S, Q * H, D] (sequence s's queries in row s) ->
  [S, Q, H, D], float32 (or q's dtype where the kernel ran with one split and wrote the output itself)."""
  num_kv_heads, num_pages, page_size, head_dim_k = k_pages.shape
  num_heads = q_flat.shape[1] // q_len
  head_dim = q_flat.shape[2]
  num_seqs = kv_lens.shape[0]
  max_pages = page_table.shape[1]
  if sliding_window is not None:
    raise NotImplementedError("paged_decode does not implement sliding_window")
  if int8_upcast not in ("bits", "convert"):
    raise ValueError(f"unknown int8_upcast {int8_upcast!r}; valid: bits, convert")
  if (v_pages.shape != k_pages.shape or head_dim_k != head_dim or num_heads % num_kv_heads
      or page_table.shape[0] != num_seqs or q_flat.shape[0] < num_seqs):
    raise NotImplementedError(f"unsupported shapes q={q_flat.shape} (Q={q_len}) k_pages={k_pages.shape} "
                              f"v_pages={v_pages.shape} kv_lens={kv_lens.shape} page_table={page_table.shape}")
  if head_dim < 16 or not is_power_of_2(head_dim) or not is_power_of_2(page_size):
    raise NotImplementedError(f"head_dim={head_dim} and page_size={page_size} must be powers of 2, "
                              "head_dim >= 16")
  group = num_heads // num_kv_heads
  rows = max(_MIN_ROWS, next_power_of_2(q_len * group))
  if rows > _MAX_ROWS:
    raise NotImplementedError(f"Q * G = {q_len * group} query rows per KV head exceed {_MAX_ROWS}")
  if q_flat.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"q dtype {q_flat.dtype}")
  if k_pages.dtype not in _PAGE_DTYPES or v_pages.dtype not in _PAGE_DTYPES:
    raise NotImplementedError(f"page dtypes {k_pages.dtype}, {v_pages.dtype}")

  if implementation not in (None, "mosaic", "triton"):
    raise ValueError(f"unknown paged_decode implementation {implementation!r}; valid: mosaic, triton")
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
    if num_splits is None:
      num_splits = choose_num_splits(num_seqs, num_kv_heads, pl.cdiv(max_pages * page_size, config.block_kv),
                                     num_sms=num_sms(), programs_per_sm=config.programs_per_sm)
    out = pallas_mgpu.decode_partials(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales, v_scales,
                                      q_len=q_len, sm_scale=sm_scale, num_splits=num_splits,
                                      config=config)
    if num_splits == 1:  # the kernel wrote the normalized output
      return out.reshape(num_seqs, q_len, num_heads, head_dim)
    return combine_splits(*out, q_len=q_len, group=group)

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
