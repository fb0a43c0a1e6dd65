"""Ragged paged attention on TPU (Pallas, Mosaic TPU): prompt chunks and decodes of a mixed batch in one call.

The semantics are `pallas_kernels.reference.ragged_paged_attention`'s. The design, and why (details and the
expected roofline in `pallas_kernels/NOTES.md`, ## ragged_paged (TPU)):

- **Layout.** The wrapper transposes q `[T, H, D]` to `[K, T * G, D]`: for each KV head, the rows of its G
  query heads token after token. A block of rows is then one plain 2-D matmul operand with whole GQA groups
  (no reshape, strided load or relayout in the kernel), and the output comes back the same way. The pages
  keep the cache's layout `[K, P, page_size, D]` and stay in HBM.
- **Grid** (KV-head block, query block): a program owns `block_rows` rows (block_q tokens) of
  `kv_heads_per_block` KV heads and writes them once; programs share nothing, so both grid axes are
  "parallel". The wrapper lists, per query block, the range of sequences that have rows in it.
- **Sequences of a block** run one after another; each walks its KV blocks (`block_kv` keys, whole pages)
  from the first key its first row sees (the sliding window) to the last key its last row sees (causality).
  The pages of a KV block are copied from HBM by one DMA per page (all heads of the program at once) into
  one of two VMEM buffers, and the next block, or the next sequence's first block, is already in flight
  while one is computed.
- **Decode, prefill, mixed.** A sequence whose rows in the block span at most `max_sub_tiles` sub-tiles
  (`sub_rows` rows: a decode, a speculative verification) is computed sub-tile by sub-tile; a longer one
  (a prompt chunk) over the whole block, so a block full of decodes pays a sublane tile of softmax per
  sequence, not `block_rows`. `decode_only` (the caller's promise, at trace time) compiles the first path
  alone.
- **Masks.** Rows of other sequences and keys outside a row's causal window get a finite -1e30 score and a
  probability of exactly 0, so every row's statistics are unchanged by work done for another sequence; V rows
  of keys outside the block's key range (page tails, pages not copied, stale buffer contents) are zeroed
  before P V, as 0 * NaN would poison the sum.
- **Quantized pages** (int8, float8 e4m3): converted to q's dtype in VMEM; per-head scales fold into the
  softmax scale and the P V product, per-token scales multiply the scores' columns and P's columns. Per-token
  scales reach the kernel gathered per sequence by the wrapper (`[K, S, Pmax * page_size]`), so each KV
  block's scales are one lane-aligned DMA.

Runs in TPU interpret mode on any platform (`interpret`), which is how the tests run it on CPU; on a TPU the
checks of `check_supported` add Mosaic's tiling constraints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged import tuning

_NEG = -1e30  # finite: a row that has seen no key keeps exp(m_prev - m_new) = 1, never NaN
_LANES = 128  # the m and l statistics are kept lane-replicated, one vreg row per query row
_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))

Scales = Literal["none", "head", "token"]


def sublane_tile(dtype) -> int:
  """Rows of one (sublane, lane) tile of `dtype` in VMEM: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit values."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static sizes of one call, derived once from the shapes and the block sizes.

  Attributes:
    num_kv_heads, group, head_dim, page_size, pages_per_seq: K, G, D, page_size, Pmax.
    kv_heads_per_block: KV heads per program.
    block_q: tokens per query block; block_rows = block_q * G.
    sub_q: tokens per sub-tile; sub_rows = sub_q * G.
    pages_per_block: pages per KV block; block_kv = pages_per_block * page_size.
    max_sub_tiles: see `tuning.BlockSizes`.
    scales: "none", "head" (per-head scales in SMEM) or "token" (gathered per-token scales).
  """

  num_kv_heads: int
  group: int
  head_dim: int
  page_size: int
  pages_per_seq: int
  kv_heads_per_block: int
  block_q: int
  sub_q: int
  pages_per_block: int
  max_sub_tiles: int
  scales: Scales

  @property
  def block_rows(self) -> int:
    return self.block_q * self.group

  @property
  def sub_rows(self) -> int:
    return self.sub_q * self.group

  @property
  def block_kv(self) -> int:
    return self.pages_per_block * self.page_size


def vmem_bytes(plan: Plan, q_dtype, kv_dtype) -> int:
  """VMEM the kernel plans for: the double-buffered q and output blocks and K/V (and scale) buffers, the
  softmax statistics and accumulator, and the live [block_rows, block_kv] float32 score tiles."""
  kb, rows, keys, d = plan.kv_heads_per_block, plan.block_rows, plan.block_kv, plan.head_dim
  q_bytes = 2 * 2 * kb * rows * d * jnp.dtype(q_dtype).itemsize
  kv_bytes = 2 * 2 * kb * keys * d * jnp.dtype(kv_dtype).itemsize
  scale_bytes = 2 * 2 * kb * keys * 4 if plan.scales == "token" else 0
  stats = kb * rows * (2 * _LANES + d) * 4
  live = 3 * rows * keys * 4
  return q_bytes + kv_bytes + scale_bytes + stats + live


def make_plan(q_shape, q_dtype, k_shape, kv_dtype, pages_per_seq: int, sizes: tuning.BlockSizes,
              scales: Scales) -> Plan:
  """Turns block sizes into whole sub-tiles, pages and KV heads for these shapes.

  Query rows come in units of whole sublane tiles of q's dtype, so a sub-tile and a block start on a tile
  boundary whatever the group size; a block is never larger than the batch needs.
  """
  num_tokens, num_heads, head_dim = q_shape
  num_kv_heads, _, page_size, _ = k_shape
  group = num_heads // num_kv_heads
  tile = sublane_tile(q_dtype)
  unit = tile // math.gcd(group, tile)  # tokens whose G rows fill whole tiles
  sub_q = unit * max(1, sizes.sub_rows // (unit * group))
  block_q = sub_q * max(1, sizes.block_rows // (sub_q * group))
  block_q = min(block_q, sub_q * pl.cdiv(max(num_tokens, 1), sub_q))
  pages_per_block = max(1, sizes.block_kv // page_size)
  plan = Plan(num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, page_size=page_size,
              pages_per_seq=pages_per_seq, kv_heads_per_block=1, block_q=block_q, sub_q=sub_q,
              pages_per_block=pages_per_block, max_sub_tiles=sizes.max_sub_tiles, scales=scales)
  if sizes.kv_heads_per_block is not None:
    if num_kv_heads % sizes.kv_heads_per_block:
      raise ValueError(f"kv_heads_per_block={sizes.kv_heads_per_block} does not divide {num_kv_heads} KV heads")
    return dataclasses.replace(plan, kv_heads_per_block=sizes.kv_heads_per_block)
  # The most KV heads per program that fit: fewer programs and larger page copies.
  for kb in sorted((d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0), reverse=True):
    candidate = dataclasses.replace(plan, kv_heads_per_block=kb)
    if kb == 1 or vmem_bytes(candidate, q_dtype, kv_dtype) <= sizes.vmem_budget:
      return candidate
  return plan


def check_supported(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                    page_table: jax.Array, cu_q_lens: jax.Array, *, k_scales: jax.Array | None,
                    v_scales: jax.Array | None, compiled: bool) -> Scales:
  """Raises NotImplementedError, naming the input, for inputs the kernel does not serve.

  Args:
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, k_scales, v_scales: the kernel's inputs.
    compiled: the kernel will be compiled by Mosaic for a TPU (not interpreted), which adds its tiling
      constraints: head_dim a multiple of 128 lanes, page_size a multiple of the pages' sublane tile.

  Returns:
    How the pages are scaled: "none", "head" or "token".
  """
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, head_dim_k = k_pages.shape
  if (v_pages.shape != k_pages.shape or head_dim_k != head_dim or num_heads % num_kv_heads
      or page_table.shape[0] != kv_lens.shape[0] or cu_q_lens.shape != (kv_lens.shape[0] + 1,)):
    raise NotImplementedError(f"unsupported shapes q={q.shape} k_pages={k_pages.shape} v_pages={v_pages.shape} "
                              f"kv_lens={kv_lens.shape} page_table={page_table.shape} cu_q_lens={cu_q_lens.shape}")
  if q.dtype not in _Q_DTYPES:
    raise NotImplementedError(f"q dtype {q.dtype}; the TPU kernel serves float32 and bfloat16")
  if k_pages.dtype != v_pages.dtype:
    raise NotImplementedError(f"page dtypes {k_pages.dtype} and {v_pages.dtype} differ")
  if (k_scales is None) != (v_scales is None):
    raise NotImplementedError("k_scales and v_scales must be given together")
  scales: Scales = "none"
  if k_scales is not None:
    if k_pages.dtype not in _QUANT_DTYPES:
      raise NotImplementedError(f"scales with {k_pages.dtype} pages; scaled pages are int8 or float8_e4m3fn")
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
      if s.shape not in ((num_kv_heads,), (num_kv_heads, num_pages, page_size)):
        raise NotImplementedError(f"{name} of shape {s.shape}; per head [K] or per token [K, P, page_size]")
    if k_scales.shape != v_scales.shape:
      raise NotImplementedError(f"k_scales {k_scales.shape} and v_scales {v_scales.shape} differ in granularity")
    scales = "head" if k_scales.ndim == 1 else "token"
  elif k_pages.dtype != q.dtype:
    raise NotImplementedError(f"{k_pages.dtype} pages with {q.dtype} queries and no scales")
  if compiled:
    if head_dim % _LANES:
      raise NotImplementedError(f"head_dim={head_dim}: Mosaic tiles want a multiple of {_LANES} lanes")
    if page_size % sublane_tile(k_pages.dtype):
      raise NotImplementedError(f"page_size={page_size} is not a multiple of {sublane_tile(k_pages.dtype)}, the "
                                f"sublane tile of {k_pages.dtype} pages, which each page copy fills")
  del num_tokens
  return scales


class _Span(NamedTuple):
  """The scalars of one sequence in one query block (int32 scalars on the TPU's scalar core).

  Attributes:
    s: the sequence.
    lo, hi: its rows in the block, as flat token indices [lo, hi).
    first_pos: flat token t of the sequence sits at position first_pos + t.
    key_start, key_end: the keys [key_start, key_end) that some row of the block sees.
    first_block, end_block: the KV blocks [first_block, end_block) holding them (empty: none).
  """

  s: jax.Array
  lo: jax.Array
  hi: jax.Array
  first_pos: jax.Array
  key_start: jax.Array
  key_end: jax.Array
  first_block: jax.Array
  end_block: jax.Array


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # [S]
    cu_q_lens_ref,  # [S + 1]
    page_table_ref,  # [S * Pmax], flat: 2-D SMEM arrays pad their rows
    seq_ranges_ref,  # [2 * NQ]: per query block, its first sequence and one past its last
    # Inputs.
    q_ref,  # [KB, block_rows, D] VMEM block of the [K, T * G, D] queries
    k_hbm,  # [K, P, page_size, D] HBM
    v_hbm,  # [K, P, page_size, D] HBM
    *refs,
    plan: Plan,
    sm_scale: float,
    sliding_window: int | None,
    decode_only: bool,
):
  if plan.scales == "none":
    k_sc = v_sc = ks_buf = vs_buf = None
    o_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref = refs
  elif plan.scales == "head":
    ks_buf = vs_buf = None
    k_sc, v_sc, o_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref = refs
  else:
    k_sc, v_sc, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems, m_ref, l_ref, acc_ref = refs
  # k_sc, v_sc: [K] SMEM (per head) or [K, S, Lp] HBM (per token, gathered per sequence)
  # o_ref: [KB, block_rows, D] VMEM block of the [K, T * G, D] output
  # k_buf, v_buf: [2, KB, block_kv, D] VMEM, two slots; ks_buf, vs_buf: [2, KB, block_kv] float32
  # sems: [2] DMA semaphores, one per slot
  # m_ref, l_ref: [KB, block_rows, 128] float32; acc_ref: [KB, block_rows, D] float32
  kb, group, page_size = plan.kv_heads_per_block, plan.group, plan.page_size
  block_q, block_kv, head_dim = plan.block_q, plan.block_kv, plan.head_dim
  h0 = pl.program_id(0) * kb
  q_block = pl.program_id(1)
  tok0 = q_block * block_q  # the first token of this block
  compute_dtype = q_ref.dtype
  precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else lax.Precision.DEFAULT

  m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def span(s) -> _Span:
    """Sequence s in this block. Every quotient is of non-negative ints (`lax.div`: no sign handling)."""
    q_start, q_end, kv_len = cu_q_lens_ref[s], cu_q_lens_ref[s + 1], kv_lens_ref[s]
    lo = jnp.maximum(q_start, tok0)
    hi = jnp.minimum(q_end, tok0 + block_q)
    first_pos = kv_len - (q_end - q_start) - q_start  # position of flat token t: first_pos + t
    key_end = jnp.clip(first_pos + hi, 0, kv_len)  # one past the last key the last row sees
    key_start = jnp.int32(0)
    if sliding_window is not None:
      key_start = jnp.maximum(first_pos + lo - sliding_window + 1, 0)
    has_keys = (hi > lo) & (key_end > key_start)
    first_block = lax.div(key_start, block_kv)
    end_block = jnp.where(has_keys, pl.cdiv(key_end, block_kv), first_block)
    return _Span(s, lo, hi, first_pos, key_start, key_end, first_block, end_block)

  def fetch(sp, j, slot, *, wait: bool):
    """Starts (or waits for) the DMAs of KV block j of sequence `sp` into `slot`: one per page that a row of
    the block sees, all KV heads of the program at once, in a scalar loop over just those pages."""
    first_page = j * plan.pages_per_block
    lo = jnp.maximum(lax.div(sp.key_start, page_size) - first_page, 0)
    hi = jnp.minimum(pl.cdiv(sp.key_end, page_size) - first_page, plan.pages_per_block)

    def page_copies(p, carry):
      page = jnp.minimum(first_page + p, plan.pages_per_seq - 1)
      page_id = page_table_ref[sp.s * plan.pages_per_seq + page]
      dst = pl.ds(pl.multiple_of(p * page_size, page_size), page_size)
      for hbm, buf in ((k_hbm, k_buf), (v_hbm, v_buf)):
        copy = pltpu.make_async_copy(hbm.at[pl.ds(h0, kb), page_id], buf.at[slot, :, dst], sems.at[slot])
        (copy.wait if wait else copy.start)()  # [KB, page_size, D]
      return carry

    lax.fori_loop(lo, hi, page_copies, 0)
    if plan.scales == "token":
      for sc, buf in ((k_sc, ks_buf), (v_sc, vs_buf)):
        copy = pltpu.make_async_copy(sc.at[pl.ds(h0, kb), sp.s, pl.ds(j * block_kv, block_kv)], buf.at[slot],
                                     sems.at[slot])  # [KB, block_kv]
        (copy.wait if wait else copy.start)()

  def attend(sp, j, slot, row0, num_rows: int):
    """Online-softmax update of rows [row0, row0 + num_rows) of every head with KV block j of sequence sp."""
    rows = pl.ds(row0, num_rows)
    shape = (num_rows, block_kv)
    # Row r holds token tok0 + r // G at position base + r // G. Masks compare multiples of G with r rather
    # than divide a vector (no integer division on the VPU): key <= base + r // G  <=>  (key - base) * G <= r.
    row = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    key = j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 1)
    base = sp.first_pos + tok0
    mask = (row >= (sp.lo - tok0) * group) & (row < (sp.hi - tok0) * group) & ((key - base) * group <= row)
    if sliding_window is not None:  # key > base + r // G - window  <=>  (key - base + window) * G > r
      mask &= (key - base + sliding_window) * group > row
    # Keys of this block that some row of the sequence may see: everything else may be stale or NaN.
    v_key = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)
    v_ok = (v_key >= sp.key_start) & (v_key < sp.key_end)
    if plan.scales == "token":
      s_key = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
      s_ok = (s_key >= sp.key_start) & (s_key < sp.key_end)
    for hh in range(kb):
      q = q_ref[hh, rows, :]  # [num_rows, D]
      k = k_buf[slot, hh].astype(compute_dtype)  # [block_kv, D]
      v = jnp.where(v_ok, v_buf[slot, hh].astype(compute_dtype), 0)
      scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)  # [num_rows, block_kv]
      scale = sm_scale if plan.scales != "head" else sm_scale * k_sc[h0 + hh]
      scores = scores * scale
      if plan.scales == "token":
        scores = scores * ks_buf[slot, pl.ds(hh, 1), :]
      scores = jnp.where(mask, scores, _NEG)
      m_prev = m_ref[hh, rows, :][:, :1]
      l_prev = l_ref[hh, rows, :][:, :1]
      m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
      p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)  # exactly 0 where masked, even in unseen rows
      alpha = jnp.exp(m_prev - m_new)
      l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
      if plan.scales == "token":
        p = p * jnp.where(s_ok, vs_buf[slot, pl.ds(hh, 1), :], 0.0)
      pv = lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)  # [num_rows, D]
      if plan.scales == "head":
        pv = pv * v_sc[h0 + hh]
      acc_ref[hh, rows, :] = alpha * acc_ref[hh, rows, :] + pv
      m_ref[hh, rows, :] = jnp.broadcast_to(m_new, (num_rows, _LANES))
      l_ref[hh, rows, :] = jnp.broadcast_to(l_new, (num_rows, _LANES))

  def compute(sp, j, slot):
    """KV block j of sequence sp against its rows: tile by tile when they span few sub-tiles, else the block."""
    first_tile = lax.div(sp.lo - tok0, plan.sub_q)
    last_tile = lax.div(sp.hi - 1 - tok0, plan.sub_q)

    def tiles():
      @pl.loop(first_tile, last_tile + 1)
      def _(t):
        attend(sp, j, slot, pl.multiple_of(t * plan.sub_rows, plan.sub_rows), plan.sub_rows)

    if plan.block_q == plan.sub_q:  # a block is one sub-tile
      attend(sp, j, slot, 0, plan.block_rows)
    elif decode_only:  # one row per sequence: never the whole block
      tiles()
    else:
      few = last_tile - first_tile < plan.max_sub_tiles
      pl.when(few)(tiles)
      pl.when(jnp.logical_not(few))(lambda: attend(sp, j, slot, 0, plan.block_rows))

  first_seq, end_seq = seq_ranges_ref[2 * q_block], seq_ranges_ref[2 * q_block + 1]

  def seq_body(s, carry):
    slot, prefetched = carry  # prefetched: the previous sequence already started this one's first block
    sp = span(s)
    has_blocks = sp.first_block < sp.end_block
    pl.when(has_blocks & (prefetched == 0))(lambda: fetch(sp, sp.first_block, slot, wait=False))
    nxt = span(jnp.minimum(s + 1, end_seq - 1))
    next_has_blocks = (s + 1 < end_seq) & (nxt.first_block < nxt.end_block)

    def kv_body(j, slot):
      other = 1 - slot

      @pl.when(j + 1 < sp.end_block)
      def _():
        fetch(sp, j + 1, other, wait=False)

      @pl.when((j + 1 == sp.end_block) & next_has_blocks)
      def _():
        fetch(nxt, nxt.first_block, other, wait=False)

      fetch(sp, j, slot, wait=True)
      compute(sp, j, slot)
      return other

    slot = lax.fori_loop(sp.first_block, sp.end_block, kv_body, slot)
    return slot, (has_blocks & next_has_blocks).astype(jnp.int32)

  lax.fori_loop(first_seq, end_seq, seq_body, (jnp.int32(0), jnp.int32(0)))

  for hh in range(kb):
    l = l_ref[hh][:, :1]
    o_ref[hh] = (acc_ref[hh] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def seq_ranges(cu_q_lens: jax.Array, num_seqs: jax.Array, num_blocks: int, block_q: int) -> jax.Array:
  """[2 * num_blocks] int32: for each block of block_q flat query tokens, the first real sequence with rows in
  it and one past the last (sequences are contiguous in the flat rows, so each block's are a range)."""
  num_slots = cu_q_lens.shape[0] - 1
  real = jnp.arange(num_slots) < jnp.reshape(num_seqs, ()).astype(jnp.int32)  # [S]
  starts = jnp.arange(num_blocks, dtype=jnp.int32)[:, None] * block_q  # [NQ, 1]
  first = jnp.sum(real & (cu_q_lens[1:] <= starts), axis=1)
  end = jnp.maximum(jnp.sum(real & (cu_q_lens[:-1] < starts + block_q), axis=1), first)
  return jnp.stack([first, end], axis=1).reshape(-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "decode_only", "interpret", "plan",
                                             "vmem_limit"))
def _forward(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales, v_scales, *,
             sm_scale: float, sliding_window: int | None, decode_only: bool, interpret, plan: Plan,
             vmem_limit: int):
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, group = plan.num_kv_heads, plan.group
  num_slots, pages_per_seq = page_table.shape
  kb, block_q, block_rows, block_kv = plan.kv_heads_per_block, plan.block_q, plan.block_rows, plan.block_kv
  num_blocks = pl.cdiv(num_tokens, block_q)
  padded = num_blocks * block_q
  # [T, H, D] -> [K, T * G, D]: a KV head's query rows, token after token (its G heads in each token).
  q_t = jnp.pad(q.reshape(num_tokens, num_kv_heads, group, head_dim), ((0, padded - num_tokens),) + ((0, 0),) * 3)
  q_t = q_t.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded * group, head_dim)
  cu_q_lens = cu_q_lens.astype(jnp.int32)
  prefetch = (kv_lens.astype(jnp.int32), cu_q_lens, page_table.astype(jnp.int32).reshape(-1),
              seq_ranges(cu_q_lens, num_seqs, num_blocks, block_q))

  rows_spec = pl.BlockSpec((kb, block_rows, head_dim), lambda h, i, *_: (h, i, 0))
  in_specs = [rows_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
  inputs = [q_t, k_pages, v_pages]
  scratch = [pltpu.VMEM((2, kb, block_kv, head_dim), k_pages.dtype)] * 2
  if plan.scales == "head":
    in_specs += [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2
    inputs += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
  elif plan.scales == "token":
    # Each sequence's scales in key order, padded to whole KV blocks: [K, S, Lp].
    length = pl.cdiv(pages_per_seq * plan.page_size, block_kv) * block_kv

    def per_sequence(scales):
      gathered = scales.astype(jnp.float32)[:, page_table].reshape(num_kv_heads, num_slots, -1)
      return jnp.pad(gathered, ((0, 0), (0, 0), (0, length - gathered.shape[-1])))

    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 2
    inputs += [per_sequence(k_scales), per_sequence(v_scales)]
    scratch += [pltpu.VMEM((2, kb, block_kv), jnp.float32)] * 2
  scratch += [pltpu.SemaphoreType.DMA((2,)),
              pltpu.VMEM((kb, block_rows, _LANES), jnp.float32),
              pltpu.VMEM((kb, block_rows, _LANES), jnp.float32),
              pltpu.VMEM((kb, block_rows, head_dim), jnp.float32)]

  kernel = functools.partial(_kernel, plan=plan, sm_scale=sm_scale, sliding_window=sliding_window,
                             decode_only=decode_only)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=(num_kv_heads // kb, num_blocks),
                                             in_specs=in_specs, out_specs=rows_spec, scratch_shapes=scratch),
      out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=vmem_limit),
      interpret=interpret,
      name="ragged_paged_attention_tpu",
  )(*prefetch, *inputs)  # [K, padded * G, D]
  out = out.reshape(num_kv_heads, padded, group, head_dim).transpose(1, 0, 2, 3)
  return out.reshape(padded, num_heads, head_dim)[:num_tokens]


def ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_pages: jax.Array,  # [K, P, page_size, D]
    v_pages: jax.Array,  # [K, P, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, Pmax] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    num_seqs: jax.Array,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    v_scales: jax.Array | None = None,  # [K, P, page_size] or [K] float32
    decode_only: bool = False,
    interpret: bool | pltpu.InterpretParams = False,
    block_sizes: tuning.BlockSizes | None = None,
) -> jax.Array:
  """`reference.ragged_paged_attention` on TPU: one kernel for the prompt chunks and decodes of a batch.

  Args:
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale, sliding_window, k_scales,
      v_scales, decode_only: as in `pallas_kernels.reference.ragged_paged_attention`. q is float32 or
      bfloat16; pages in q's dtype, or int8 / float8_e4m3fn with per-head `[K]` or per-token
      `[K, P, page_size]` scales.
    interpret: run in TPU interpret mode (on any platform; CPU tests): True, or `pltpu.InterpretParams` (e.g.
      with `detect_races=True`).
    block_sizes: the kernel's block sizes; None looks them up for the default device's TPU generation
      (`tuning.lookup`).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero.

  Raises:
    NotImplementedError: for inputs the kernel does not serve (see `check_supported`); `pallas_kernels.api`
      then runs the reference.
  """
  params = pltpu.InterpretParams() if interpret is True else (interpret or False)
  compiled = not params and jax.default_backend() == "tpu"
  scales = check_supported(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, k_scales=k_scales,
                           v_scales=v_scales, compiled=compiled)
  sizes = block_sizes or tuning.lookup(tuning.current_generation(), q.dtype, k_pages.dtype, q.shape[2])
  plan = make_plan(q.shape, q.dtype, k_pages.shape, k_pages.dtype, page_table.shape[1], sizes, scales)
  # Twice the plan leaves Mosaic room for its own scratch; the tuning budgets keep it under each chip's VMEM.
  vmem_limit = max(32 * 1024 * 1024, 2 * vmem_bytes(plan, q.dtype, k_pages.dtype))
  return _forward(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales, v_scales,
                  sm_scale=float(sm_scale), sliding_window=sliding_window, decode_only=bool(decode_only),
                  interpret=params, plan=plan, vmem_limit=vmem_limit)
