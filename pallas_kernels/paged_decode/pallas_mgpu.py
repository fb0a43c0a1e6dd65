"""Split-K paged decode attention: Pallas kernel lowered through Mosaic GPU (Hopper, sm_90a).

Same work decomposition and partial results as the Triton kernel (`pallas_triton`): one program per
(sequence, KV head, split), holding the Q * G query rows of its KV head, walking its share of the
sequence's key blocks and writing float32 partials (acc, m, l) that `pallas_triton.combine_splits`
merges. What changes is how the bytes arrive:

- One CUDA block per program, three warpgroups. One warp of the producer warpgroup brings key blocks
  (`block_kv` tokens) into a ring of `num_stages` K and V buffers in shared memory by TMA, one copy per
  page (page ids read from a copy of the page table in global memory), as soon as a consumer has
  released a slot: the copies need no registers, no address arithmetic per element and no thread of the
  consumers, so their time goes to the matmuls and the softmax only.
- Two consumer warpgroups take the split's key blocks in turns (block i to consumer i mod 2, so with an
  even ring each slot has one consumer), each with its own online softmax state (acc, m, l); at the end
  consumer 1 hands its state to consumer 0 through shared memory, which merges and writes the result.
  Each holds the rows in one 64-row wgmma tile (M = 64 is wgmma's smallest; rows past Q * G are zero and
  never written out): S = Q K^T and O += P V on wgmma with float32 accumulators, softmax in base 2.
  One consumer left the tensor cores and the ALUs idle while it waited on itself: the second one made
  int8 pages 1.34x faster on an H200 (NOTES.md, ## paged_decode).

Data arrival (K, V, Q) is signalled by mbarriers that TMA completes; "slot consumed", "Q ready" and
"partials ready" by hardware named barriers (`mosaic_util.named_barrier`): a consumer
arrives only for slots the producer will refill, so every barrier sees as many arrivals as waits.

Keys past kv_len (the tail of the last page, pages past the end) are loaded like the rest: their scores
are masked, and the consumer zeroes those V rows in shared memory before P V (0 * NaN would leak the
garbage of unused slots). Queries see keys up to their own position (Q > 1 verifies speculation).

int8 pages (per-token scales, `quant.quantize_kv`): TMA brings the int8 values and their scales into the
ring (half the bytes of bf16); a consumer dequantizes a block into its own bf16 buffer (values times their
token's scale in bf16, rounded like a bf16 cache; in float32 it was 1.3x slower; rows past kv_len set to 0
since their scales may be NaN), releases the ring slot at once, and runs the same matmuls on it.

Requires bfloat16 or float16 queries; pages in q's dtype (head_dim 64 or 128) or int8 with per-token
scales (bfloat16 queries, head_dim 128, page_size a multiple of 32 so that one page's scales are one
128-byte copy);
page_size a multiple of 8 that divides block_kv or is a multiple of it; Q * G <= 64; no sliding window.
Anything else raises NotImplementedError (the Triton kernel serves it). Compiles only for sm_90a; lowers for
CUDA on any host (`jax.jit(...).lower(lowering_platforms=("cuda",))`), which the tests do.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_util import named_barrier, zero_keys_past_end

_ROWS = 64  # wgmma's M: the query rows of a program, padded
_STATS = 8  # columns of the stats tile written per row: m, l, then padding (a TMA row needs 16 bytes)
_LOG2E = math.log2(math.e)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_SHARED_MEMORY_BYTES = 227 * 1024 - 1024
# Mosaic GPU's own shared memory: the row reductions' scratch (`CompilerParams.reduction_scratch_bytes`,
# 2 KB by default) and room for the mbarriers.
_RESERVED_BYTES = plgpu.CompilerParams().reduction_scratch_bytes + 128
_CONSUMERS = 2
_WG_THREADS = 128
_PRODUCER_THREADS = 32  # the TMA warp
# Named barriers 0-3 belong to Mosaic GPU (the CTA, then one per warpgroup); ours: Q ready, partials ready
# for the merge, then K-consumed per ring slot and V-consumed per ring slot.
_Q_BARRIER = 4
_MERGE_BARRIER = 5
_FREE_BARRIERS = 6
_NUM_NAMED_BARRIERS = 16


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Launch parameters of the Mosaic GPU decode kernel.

  Attributes:
    block_kv: key tokens per pipeline step (a multiple of 64, at most 256).
    num_stages: K/V buffers in the shared-memory ring (even: each consumer owns half of them).
    programs_per_sm: programs wanted per SM when choosing the split count (`choose_num_splits`).
  """

  block_kv: int = 128
  num_stages: int = 2
  programs_per_sm: int = 1

  def __post_init__(self):
    if self.block_kv % 64 or not 0 < self.block_kv <= 256:  # wgmma's N and a TMA box stop at 256
      raise ValueError(f"block_kv must be a multiple of 64 in [64, 256], got {self.block_kv}")
    max_stages = (_NUM_NAMED_BARRIERS - _FREE_BARRIERS) // 2
    # Even: consumer w takes the blocks i = w mod 2, so each ring slot (i mod num_stages) then belongs to one
    # consumer, which waits on every phase of its mbarriers (an odd ring made the consumers alternate on a
    # slot, each skipping the other's phases, and hung the kernel on an H200).
    if not 2 <= self.num_stages <= max_stages or self.num_stages % 2:
      raise ValueError(f"num_stages must be even and in [2, {max_stages}], got {self.num_stages}")
    if self.programs_per_sm < 1:
      raise ValueError(f"programs_per_sm must be >= 1, got {self.programs_per_sm}")


def shared_memory_bytes(head_dim: int, itemsize: int, config: DecodeConfig, page_itemsize: int | None = None) -> int:
  """Q (staging and swizzled), the K and V rings, the float32 output and stats tiles (also the merge's), what
  Mosaic GPU reserves (reduction scratch, mbarriers); for 8-bit pages (`page_itemsize` 1) also each
  consumer's dequantized block and the rings' scales."""
  page_itemsize = page_itemsize or itemsize
  ring = config.num_stages * config.block_kv
  total = (2 * _ROWS * itemsize + 2 * ring * page_itemsize) * head_dim + _ROWS * (head_dim + _STATS) * 4
  total += _RESERVED_BYTES
  if page_itemsize != itemsize:
    total += _CONSUMERS * config.block_kv * head_dim * itemsize + 2 * ring * 4
  return total


def check_supported(q_dtype, k_pages: jax.Array, v_pages: jax.Array, *, rows: int, sliding_window, k_scales,
                    v_scales, config: DecodeConfig) -> None:
  """Raises NotImplementedError, naming the input, for what this kernel does not serve. `rows` is Q * G."""
  if sliding_window is not None:
    raise NotImplementedError(f"the Mosaic GPU decode kernel has no sliding window (got {sliding_window})")
  if q_dtype not in _SUPPORTED_DTYPES:
    raise NotImplementedError(f"the Mosaic GPU decode kernel needs bfloat16 or float16 queries, got {q_dtype}")
  head_dim, page_size = k_pages.shape[3], k_pages.shape[2]
  if k_scales is None and v_scales is None:
    if k_pages.dtype != q_dtype or v_pages.dtype != q_dtype:
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs pages in q's dtype {q_dtype} or int8; got "
                                f"{k_pages.dtype}, {v_pages.dtype}")
  else:
    per_token = k_pages.shape[:3]
    if (k_pages.dtype != jnp.int8 or v_pages.dtype != jnp.int8 or k_scales is None or v_scales is None
        or k_scales.shape != per_token or v_scales.shape != per_token):
      raise NotImplementedError(
          f"the Mosaic GPU decode kernel serves quantized pages as int8 with per-token scales {per_token}; got "
          f"{k_pages.dtype}, {v_pages.dtype} with scales {getattr(k_scales, 'shape', None)}, "
          f"{getattr(v_scales, 'shape', None)}")
    if head_dim != 128:
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs head_dim 128 for int8 pages, got {head_dim}")
    if q_dtype != jnp.bfloat16:  # scales are rounded to the matmul dtype: float16 would flush small ones
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs bfloat16 queries for int8 pages, got {q_dtype}")
    if page_size % 32:  # a TMA copy of one page's scales must move a multiple of 128 bytes
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs a page_size that is a multiple of 32 for "
                                f"int8 pages (one page's float32 scales in one copy), got {page_size}")
  if head_dim not in (64, 128):
    raise NotImplementedError(f"the Mosaic GPU decode kernel needs head_dim 64 or 128, got {head_dim}")
  if page_size % 8 or (config.block_kv % page_size and page_size % config.block_kv):
    raise NotImplementedError(f"the Mosaic GPU decode kernel needs a page_size that is a multiple of 8 and "
                              f"divides or is a multiple of block_kv={config.block_kv}; got {page_size}")
  if rows > _ROWS:
    raise NotImplementedError(f"Q * G = {rows} query rows per KV head exceed the kernel's {_ROWS}")
  smem = shared_memory_bytes(head_dim, jnp.dtype(q_dtype).itemsize, config, k_pages.dtype.itemsize)
  if smem > _SHARED_MEMORY_BYTES:
    raise NotImplementedError(f"{config} needs {smem} bytes of shared memory at head_dim {head_dim}; an sm_90 "
                              f"CTA has {_SHARED_MEMORY_BYTES}")


def _swizzled(dtype, head_dim: int):
  """Shared-memory transforms for wgmma operands and TMA: rows of head_dim values, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def split_range(kv_len, q_len: int, split, num_splits: int, block_kv: int):
  """(first block, number of blocks) of `split` over a sequence of kv_len keys (0: a padding sequence).
  The same even division as the Triton kernel; works on scalars and arrays (non-negative ints, `lax.div`)."""
  length = jnp.where(kv_len > 0, jnp.maximum(kv_len, q_len), 0)
  num_blocks = lax.div(length + block_kv - 1, block_kv)
  per = lax.div(num_blocks + num_splits - 1, num_splits)
  first = split * per
  return first, jnp.clip(num_blocks - first, 0, per)


def _kernel(meta_ref, q_ref, k_ref, v_ref, scale_refs, out_refs, scratch, *, q_len: int, group: int,
            num_splits: int, block_kv: int, num_stages: int, sm_scale: float, num_seqs: int, max_pages: int):
  """One (sequence, KV head, split); see the module docstring. `meta_ref` is kv_lens ([S]) followed by the
  page table ([S, Pmax], row-major), flat. `scale_refs`: () or the per-token scales (k, v) [K, P, page_size]
  of int8 pages. `out_refs`: (the attention output [S, Q * H, D]) with one split, (acc, stats) partials
  otherwise."""
  (q_stage, q_smem, k_smem, v_smem, acc_smem, stats_smem, *dequant), (k_ready, v_ready, q_ready) = scratch
  quantized = bool(scale_refs)
  num_kv_heads, num_pages, page_size, head_dim = k_ref.shape
  num_heads = q_ref.shape[1] // q_len
  rows = q_len * group
  dtype = q_ref.dtype  # the matmuls' operand dtype
  tokens_per_copy = min(page_size, block_kv)
  copies = block_kv // tokens_per_copy
  free_threads = _WG_THREADS + _PRODUCER_THREADS  # a slot's one consumer and the TMA warp

  program = lax.axis_index("programs")
  split = lax.rem(program, num_splits)
  kv_head = lax.rem(lax.div(program, num_splits), num_kv_heads)
  seq = lax.div(program, num_splits * num_kv_heads)
  kv_len = meta_ref[seq]
  length = jnp.where(kv_len > 0, jnp.maximum(kv_len, q_len), 0)
  first, steps = split_range(kv_len, q_len, split, num_splits, block_kv)
  # Leading blocks of the split whose keys every row sees (all at or before the first query's position).
  unmasked = jnp.clip(lax.div(length - q_len + 1, block_kv) - first, 0, steps)
  wg = lax.axis_index("wg")
  scale = sm_scale * _LOG2E

  k_free = lambda slot: _FREE_BARRIERS + slot
  v_free = lambda slot: _FREE_BARRIERS + num_stages + slot

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def release(barrier, i):
      # Only slots the producer refills: equal arrivals and waits on every named barrier.
      pl.when(i + num_stages < steps)(lambda: named_barrier("arrive", barrier, free_threads))

    def softmax(s, b, m_i, l_i, *, masked: bool):
      if masked:
        # Key pos is visible to row r (token t = r // G) iff pos < length and pos <= length - Q + t, i.e.
        # r >= (pos - length + Q) * G; padding rows see every key below length.
        r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        pos = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + b * block_kv
        s = jnp.where((pos < length) & (r >= (pos - (length - q_len)) * group), s, -jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
      # A row may have seen no key yet (m stays -inf, as the merge and the combine expect): exp2 then gets a
      # finite reference instead of -inf - -inf.
      m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_ref)
      p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_ref, s.shape, [0]))
      return p, m_new, l_i * alpha + p.sum(axis=1), alpha

    def dequantize(b, slot, values, scales, out, *, masked: bool):
      """int8 values of ring slot `slot` times their per-token scales, in the matmul dtype, into `out`; rows
      past kv_len become 0 (their scales may be NaN)."""
      for c in range(block_kv // _ROWS):
        x = plgpu.load(values.at[slot, pl.ds(c * _ROWS, _ROWS)], (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
        x = plgpu.layout_cast(x, plgpu.Layout.WGMMA).astype(dtype)
        scale_rows = plgpu.load(scales.at[slot, pl.ds(c * _ROWS, _ROWS)], (), layout=row_layout,
                                optimized=False)
        x = x * lax.broadcast_in_dim(scale_rows.astype(dtype), x.shape, [0])
        if masked:
          key = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA)
          x = jnp.where(key + b * block_kv + c * _ROWS < length, x, jnp.zeros_like(x))
        out[pl.ds(c * _ROWS, _ROWS)] = x
      plgpu.commit_smem()

    def step(j, carry, *, masked: bool):
      """Key block i = 2 j + wg of the split: the consumers take turns, each with its own softmax state."""
      acc, m_i, l_i = carry
      i = 2 * j + wg
      b, slot = first + i, lax.rem(i, num_stages)
      plgpu.barrier_wait(k_ready.at[slot])
      if quantized:  # dequantized into this consumer's buffer; the slot goes back to the producer at once
        k_tile = dequant[0].at[wg]
        dequantize(b, slot, k_smem, dequant[1], k_tile, masked=masked)
        release(k_free(slot), i)
      else:
        k_tile = k_smem.at[slot]

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_kv), jnp.float32))
      if not quantized:
        release(k_free(slot), i)
      p, m_i, l_i, alpha = softmax(s, b, m_i, l_i, masked=masked)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      plgpu.barrier_wait(v_ready.at[slot])
      if quantized:  # the same buffer: S, its last reader, is done
        v_tile = dequant[0].at[wg]
        dequantize(b, slot, v_smem, dequant[2], v_tile, masked=masked)
        release(v_free(slot), i)
      else:
        v_tile = v_smem.at[slot]
        if masked:
          zero_keys_past_end(v_smem.at[slot], b * block_kv, length)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(dtype), v_tile)

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      if not quantized:
        release(v_free(slot), i)
      return acc, m_i, l_i

    @pl.when(wg == 0)
    def _():
      # Row r = t * G + g is query token t, head kv_head * G + g: Q copies of G contiguous rows of q.
      for t in range(q_len):
        plgpu.copy_gmem_to_smem(q_ref.at[seq, pl.ds(t * num_heads + kv_head * group, group)],
                                q_stage.at[pl.ds(t * group, group)], q_ready.at[0])
      plgpu.barrier_wait(q_ready.at[0])
      q = plgpu.load(q_stage, (), layout=plgpu.Layout.WGMMA, optimized=False)
      row = plgpu.broadcasted_iota(jnp.int32, q.shape, 0, layout=plgpu.Layout.WGMMA)
      q_smem[...] = jnp.where(row < rows, q, jnp.zeros_like(q))  # rows past Q * G hold stale shared memory
      plgpu.commit_smem()

    named_barrier("sync", _Q_BARRIER, _CONSUMERS * _WG_THREADS)  # Q is in q_smem
    half = lambda n: jnp.maximum(lax.div(n - wg + 1, 2), 0)  # blocks 2 j + wg below n
    carry = (plgpu.layout_cast(jnp.full((_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout),
             plgpu.layout_cast(jnp.full((_ROWS,), 0, jnp.float32), row_layout))
    carry = lax.fori_loop(0, half(unmasked), functools.partial(step, masked=False), carry)
    acc, m_i, l_i = lax.fori_loop(half(unmasked), half(steps), functools.partial(step, masked=True), carry)
    col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _STATS), 1, layout=plgpu.Layout.WGMMA)

    @pl.when(wg == 1)
    def _():  # hand the partial result to consumer 0
      acc_smem[...] = acc
      stats_smem[...] = jnp.where(col == 0, lax.broadcast_in_dim(m_i, (_ROWS, _STATS), [0]),
                                  lax.broadcast_in_dim(l_i, (_ROWS, _STATS), [0]))
      named_barrier("arrive", _MERGE_BARRIER, _CONSUMERS * _WG_THREADS)

    @pl.when(wg == 0)
    def _():
      named_barrier("sync", _MERGE_BARRIER, _CONSUMERS * _WG_THREADS)
      acc1 = plgpu.load(acc_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
      stats = plgpu.load(stats_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
      m1 = jnp.where(col == 0, stats, -jnp.inf).max(axis=1)
      l1 = jnp.where(col == 1, stats, -jnp.inf).max(axis=1)
      m = jnp.maximum(m_i, m1)
      m_safe = jnp.where(m == -jnp.inf, 0.0, m)
      a0, a1 = jnp.exp2(m_i - m_safe), jnp.exp2(m1 - m_safe)
      acc_all = (acc * lax.broadcast_in_dim(a0, acc.shape, [0]) + acc1 * lax.broadcast_in_dim(a1, acc.shape, [0]))
      l_all = l_i * a0 + l1 * a1
      if num_splits == 1:  # the whole sequence: normalize here and write q's rows, no combine pass
        out = acc_all / lax.broadcast_in_dim(jnp.where(l_all > 0, l_all, 1.0), acc.shape, [0])  # 0: no keys
        q_stage[...] = out.astype(dtype)  # free since Q was read
        plgpu.commit_smem()
        for t in range(q_len):
          plgpu.copy_smem_to_gmem(q_stage.at[pl.ds(t * group, group)],
                                  out_refs[0].at[seq, pl.ds(t * num_heads + kv_head * group, group)])
      else:
        acc_ref, stats_ref = out_refs
        acc_smem[...] = acc_all
        stats_smem[...] = jnp.where(col == 0, lax.broadcast_in_dim(m, (_ROWS, _STATS), [0]),
                                    lax.broadcast_in_dim(l_all, (_ROWS, _STATS), [0]))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem.at[pl.ds(0, rows)], acc_ref.at[seq, kv_head, split])
        plgpu.copy_smem_to_gmem(stats_smem.at[pl.ds(0, rows)], stats_ref.at[seq, kv_head, split])
      plgpu.wait_smem_to_gmem(0)

  def _tma_warp():
    page_row = num_seqs + seq * max_pages  # this sequence's page ids in meta_ref

    def pages_of(b):
      """(page id, first slot in the page) of each copy of key block b."""
      out = []
      for c in range(copies):
        key = b * block_kv + c * tokens_per_copy
        page = meta_ref[page_row + jnp.minimum(lax.div(key, page_size), max_pages - 1)]
        out.append((jnp.clip(page, 0, num_pages - 1), 0 if page_size <= block_kv else lax.rem(key, page_size)))
      return out

    def copy(pages, slot, which):
      """The values (and scales) of K (which = 0) or V (1) of one block, one copy per page."""
      src, dst, ready = ((k_ref, k_smem, k_ready), (v_ref, v_smem, v_ready))[which]
      for c, (page, offset) in enumerate(pages):
        window = pl.ds(c * tokens_per_copy, tokens_per_copy)
        plgpu.copy_gmem_to_smem(src.at[kv_head, page, pl.ds(offset, tokens_per_copy)], dst.at[slot, window],
                                ready.at[slot])
        if quantized:
          plgpu.copy_gmem_to_smem(scale_refs[which].at[kv_head, page, pl.ds(offset, tokens_per_copy)],
                                  dequant[1 + which].at[slot, window], ready.at[slot])

    for i in range(num_stages):
      @pl.when(i < steps)
      def _(i=i):
        pages = pages_of(first + i)
        copy(pages, i, 0)
        copy(pages, i, 1)

    @pl.loop(0, jnp.maximum(steps - num_stages, 0))
    def _(i):
      slot = lax.rem(i, num_stages)
      pages = pages_of(first + i + num_stages)  # page-table reads before the waits
      named_barrier("sync", k_free(slot), free_threads)
      copy(pages, slot, 0)
      named_barrier("sync", v_free(slot), free_threads)
      copy(pages, slot, 1)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    plgpu.warp_map(lambda warp: pl.when(warp == 0)(_tma_warp))


@functools.partial(jax.jit, static_argnames=("q_len", "sm_scale", "num_splits", "block_kv", "num_stages"))
def decode_partials(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales=None, v_scales=None, *, q_len: int,
                    sm_scale: float, num_splits: int, block_kv: int, num_stages: int):
  """Paged decode attention, or its split partials.

  Args:
    q_flat: [S' >= S, Q * H, D] queries, sequence s's in row s (token-major).
    k_pages, v_pages: [K, P, page_size, D], in q's dtype or int8 with `k_scales`, `v_scales`.
    kv_lens: [S] int32; page_table: [S, Pmax] int32.
    k_scales, v_scales: per-token scales [K, P, page_size] float32 of int8 pages, else None.
    q_len, sm_scale: query tokens per sequence, softmax scale.
    num_splits, block_kv, num_stages: launch parameters (see `DecodeConfig`).

  Returns:
    With one split, the attention output [S, Q * H, D] in q's dtype (zeros for kv_len 0). Otherwise
    (acc [S, K, N, Q * G, D], m [S, K, N, Q * G], l [S, K, N, Q * G]) float32: unnormalized outputs,
    running maxima (log2 units, -inf for a split with no key) and softmax sums of each split, for
    `pallas_triton.combine_splits`.
  """
  num_kv_heads, _, page_size, head_dim = k_pages.shape
  num_seqs, max_pages = page_table.shape
  if (v_pages.shape != k_pages.shape or q_flat.shape[2] != head_dim or q_flat.shape[1] % (q_len * num_kv_heads)
      or q_flat.shape[0] < num_seqs or kv_lens.shape != (num_seqs,)):
    raise ValueError(f"mismatched shapes: q_flat {q_flat.shape} (Q={q_len}), k_pages {k_pages.shape}, v_pages "
                     f"{v_pages.shape}, kv_lens {kv_lens.shape}, page_table {page_table.shape}")
  group = q_flat.shape[1] // q_len // num_kv_heads
  rows = q_len * group
  dtype = q_flat.dtype
  quantized = k_scales is not None
  copies = block_kv // min(page_size, block_kv)
  transforms = _swizzled(dtype, head_dim)
  # One fresh int32 buffer for the scalars (Mosaic GPU wants 256-byte aligned inputs).
  meta = jnp.concatenate([kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1)])
  scales = (k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)) if quantized else ()
  ring = (num_stages, block_kv, head_dim)
  dequant = ()
  if quantized:  # the dequantized K and V blocks, and the rings' scales
    dequant = (plgpu.SMEM((_CONSUMERS,) + ring[1:], dtype, transforms=transforms),
               plgpu.SMEM(ring[:2], jnp.float32), plgpu.SMEM(ring[:2], jnp.float32))

  def entry(meta_ref, q_ref, k_ref, v_ref, *refs):
    scale_refs, out_refs = refs[:len(scales)], refs[len(scales):]
    pl.run_scoped(
        lambda *scratch: _kernel(meta_ref, q_ref, k_ref, v_ref, scale_refs, out_refs, scratch, q_len=q_len,
                                 group=group, num_splits=num_splits, block_kv=block_kv, num_stages=num_stages,
                                 sm_scale=sm_scale, num_seqs=num_seqs, max_pages=max_pages),
        (
            plgpu.SMEM((_ROWS, head_dim), dtype),
            plgpu.SMEM((_ROWS, head_dim), dtype, transforms=transforms),
            plgpu.SMEM(ring, k_pages.dtype, transforms=_swizzled(k_pages.dtype, head_dim)),
            plgpu.SMEM(ring, v_pages.dtype, transforms=_swizzled(v_pages.dtype, head_dim)),
            plgpu.SMEM((_ROWS, head_dim), jnp.float32),
            plgpu.SMEM((_ROWS, _STATS), jnp.float32),
            *dequant,
        ),
        (
            plgpu.Barrier(num_arrivals=copies * (1 + quantized), num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=copies * (1 + quantized), num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=q_len, num_barriers=1),
        ),
        collective_axes="wg",
    )

  part = (num_seqs, num_kv_heads, num_splits, rows)
  if num_splits == 1:
    out_type = (jax.ShapeDtypeStruct((num_seqs,) + q_flat.shape[1:], dtype),)
  else:
    out_type = (jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                jax.ShapeDtypeStruct(part + (_STATS,), jnp.float32))
  outs = plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(num_seqs * num_kv_heads * num_splits,),
      grid_names=("programs",),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(meta, q_flat, k_pages, v_pages, *scales)
  if num_splits == 1:
    return outs[0]
  acc, stats = outs
  return acc, stats[..., 0], stats[..., 1]
