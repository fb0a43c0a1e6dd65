"""Flash prefill attention over paged K/V: Pallas kernel lowered through Mosaic GPU (Hopper, sm_90a).

Same semantics as `pallas_kernels.reference.ragged_paged_attention` restricted to prompt chunks (causal,
no sliding window, unquantized pages), and the same work decomposition as the Triton kernel
(`pallas_triton.work_items`): a work item is (sequence, block of 128 query tokens), heaviest first.

One CUDA block per (query head, work item), three warpgroups:

- two consumer warpgroups, each owning 64 query rows of the item (wgmma needs M = 64 per warpgroup). Q
  rows start anywhere in the flat `[T, H, D]` array, so TMA brings them untiled and the warpgroup rewrites
  them swizzled for wgmma; S = Q K^T and O += P V run on wgmma with float32 accumulators; online softmax
  in base 2. FlashAttention-3's two overlaps: within a warpgroup, S of key block j and P V of block j - 1
  go to the tensor cores together and the softmax of block j runs while P V is in flight; between the
  two warpgroups, turns on the tensor cores alternate (ping-pong), so one's softmax also overlaps the
  other's matmuls. Both walk the same key blocks, as many as the later rows need (the earlier rows mask
  the extra block, at most one and only for items that do not start on a block boundary), which keeps
  the two in lockstep; a warpgroup with no rows sits out, and the other then runs alone.
- one producer warpgroup, of which one warp walks the item's key blocks (`block_kv` tokens) and fills a
  ring of `num_stages` K and V buffers in shared memory by TMA, one copy per page (`min(page_size,
  block_kv)` tokens each, page ids read from a copy of the page table in global memory), as soon as the
  consumers have released a slot.

Data arrival (K, V, Q ready) is signalled by mbarriers, which TMA completes. Everything between threads
(a slot released, the turn on the tensor cores) uses hardware named barriers (`bar.arrive` / `bar.sync`),
which are cheaper but have no phases: the protocol never lets a warpgroup arrive twice on one barrier
before the waiter has taken the first round (a consumer releases a slot only after it has waited for the
slot's data, which the producer loads only after taking the previous round; turns strictly alternate).

Keys past kv_len (the tail of the last page, or pages past the sequence's end) are loaded like the rest:
their scores are masked, and the consumer zeroes those V rows in shared memory before P V so that NaN
garbage in unused slots cannot reach the output through 0 * NaN. Output rows are written by TMA in a
ladder of power-of-two row counts so that a block never writes past its sequence's last query row; rows
of padding tokens (past cu_q_lens[num_seqs]) form a pseudo-sequence with no keys, whose items write zeros.

Requires bfloat16 or float16 q/k/v of one dtype, head_dim 64 or 128, page_size a multiple of 8 that
divides block_kv or is a multiple of it; anything else raises NotImplementedError (the Triton kernel
serves it). The kernel only compiles for sm_90a, but `jax.jit(...).lower(lowering_platforms=("cuda",))`
runs its whole Mosaic GPU lowering (layouts, TMA shapes, barriers) on any host; the tests do.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.flash_prefill import pallas_triton
from pallas_kernels.gpu_info import num_sms
from pallas_kernels.mosaic_util import (MAX_REGISTERS, NUM_NAMED_BARRIERS, PRODUCER_REGISTERS, SHARED_MEMORY_BYTES,
                                        WARP_THREADS, WG_THREADS, WGMMA_DTYPES, WGMMA_ROWS, named_barrier,
                                        swizzled, zero_keys_past_end)

_CONSUMERS = 2  # warpgroups of WGMMA_ROWS query rows each
_BLOCK_Q = WGMMA_ROWS * _CONSUMERS  # query tokens per work item
_LOG2E = math.log2(math.e)
_ITEM_FIELDS = 5  # columns of `item_table`
# Hardware named barriers (bar.sync / bar.arrive), 16 per CTA. Mosaic GPU uses id 0 (the whole CTA) and
# 1 + warpgroup index; ours start above them: two for the consumers' turn-taking, then one per ring slot
# for "K consumed" and one per slot for "V consumed".
_SCHEDULE_BARRIER = 5
_FREE_BARRIERS = _SCHEDULE_BARRIER + _CONSUMERS


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Launch parameters of the Mosaic GPU kernel.

  Attributes:
    block_kv: key tokens per pipeline step (a multiple of 64).
    num_stages: K/V buffers in the shared-memory ring (>= 2).
    head_chunk: how programs map to (query head, work item). The KV heads are cut into chunks of
      `head_chunk`; the chunks run one after another, and within a chunk every item runs for all of the
      chunk's query heads next to each other, heaviest item first. 1 keeps one KV head's items together
      (the fewest K/V streams in L2 at once); the number of KV heads runs every head of an item together
      (the best balance: the lightest items run last). Must divide the number of KV heads. None:
      `default_head_chunk`.
  """

  block_kv: int = 128
  num_stages: int = 2
  head_chunk: int | None = None

  def __post_init__(self):
    if self.block_kv % 64 or self.block_kv <= 0:
      raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
    max_stages = (NUM_NAMED_BARRIERS - _FREE_BARRIERS) // 2
    if not 2 <= self.num_stages <= max_stages:
      raise ValueError(f"num_stages must be in [2, {max_stages}], got {self.num_stages}")
    if self.head_chunk is not None and self.head_chunk <= 0:
      raise ValueError(f"head_chunk must be positive, got {self.head_chunk}")


def default_head_chunk(num_tokens: int, num_kv_heads: int, group: int) -> int:
  """Every KV head in one chunk (the best balance) for batches under 8192 tokens (S=2048: 10% faster than
  chunks of one KV head for G = 1 and 4, H200, 2026-11-27). Longer ones take the smallest chunk whose
  (query head, item) pairs fill the GPU: the K/V streams of all heads no longer fit L2, and the fewer KV heads
  run at once the better, but a chunk of fewer pairs than SMs leaves its heaviest items running alone at its
  end, since the next chunk starts heaviest first too.

  H200, TFLOP/s of the chunk sizes in one process (NOTES.md, 2026-11-28), S=8192 K=32: 1 519, 2 538, 4 536,
  8 531, 32 505; S=16384 K=32: 1-4 574-577, 8 565; S=8192 K=8: 1 and 2 542-545, 8 534.
  """
  if num_tokens < 8192:
    return num_kv_heads
  num_items = -(-num_tokens // (_CONSUMERS * WGMMA_ROWS))
  sms = num_sms()
  return next(c for c in range(1, num_kv_heads + 1) if num_kv_heads % c == 0 and c * group * num_items >= sms
              or c == num_kv_heads)


def shared_memory_bytes(head_dim: int, itemsize: int, config: MosaicConfig) -> int:
  """Shared memory of one CTA: Q (swizzled) and its untiled staging/output buffer per consumer, and the K and
  V rings."""
  return (2 * _CONSUMERS * WGMMA_ROWS + 2 * config.num_stages * config.block_kv) * head_dim * itemsize


def check_supported(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, *, sliding_window, k_scales,
                    v_scales, config: MosaicConfig) -> None:
  """Raises NotImplementedError, naming the input, for what this kernel does not serve."""
  block_kv = config.block_kv
  if k_scales is not None or v_scales is not None:
    raise NotImplementedError("the Mosaic GPU prefill kernel does not serve quantized pages")
  if sliding_window is not None:
    raise NotImplementedError(f"the Mosaic GPU prefill kernel has no sliding window (got {sliding_window})")
  if q.dtype not in WGMMA_DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
    raise NotImplementedError(f"the Mosaic GPU prefill kernel needs q, k, v all bfloat16 or all float16; "
                              f"got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
  head_dim = q.shape[-1]
  if head_dim not in (64, 128):
    raise NotImplementedError(f"the Mosaic GPU prefill kernel needs head_dim 64 or 128, got {head_dim}")
  if config.head_chunk is not None and k_pages.shape[0] % config.head_chunk:  # a bad argument, not a fallback
    raise ValueError(f"head_chunk {config.head_chunk} does not divide the {k_pages.shape[0]} KV heads")
  page_size = k_pages.shape[2]
  if page_size % 8 or (block_kv % page_size and page_size % block_kv):
    raise NotImplementedError(f"the Mosaic GPU prefill kernel needs a page_size that is a multiple of 8 and "
                              f"divides or is a multiple of block_kv={block_kv}; got {page_size}")
  if q.shape[1] % k_pages.shape[0]:
    raise NotImplementedError(f"{q.shape[1]} query heads are not a multiple of {k_pages.shape[0]} KV heads")
  smem = shared_memory_bytes(head_dim, q.dtype.itemsize, config)
  if smem > SHARED_MEMORY_BYTES:
    raise NotImplementedError(f"{config} needs {smem} bytes of shared memory at head_dim {head_dim}; an sm_90 "
                              f"CTA has {SHARED_MEMORY_BYTES}")


def item_table(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, *, num_tokens: int) -> jax.Array:
  """[W, 5] int32 per work item: sequence, first query row in q, rows (0 for spare items), absolute position
  of the first row, kv_len. Items come from `pallas_triton.work_items` (heaviest first) over the real
  sequences plus one pseudo-sequence holding the padding rows with no keys, whose items write zeros."""
  n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
  cu = jnp.concatenate([cu_q_lens, jnp.full((1,), num_tokens, jnp.int32)])
  cu = jnp.where(jnp.arange(cu.shape[0]) <= n, cu, num_tokens)  # slot n: rows [cu_q_lens[n], T)
  kv = jnp.concatenate([kv_lens, jnp.zeros((1,), jnp.int32)])
  kv = jnp.where(jnp.arange(kv.shape[0]) < n, kv, 0)
  work_seq, work_block = pallas_triton.work_items(cu, kv, n + 1, num_tokens=num_tokens, block_q=_BLOCK_Q)
  seq = jnp.maximum(work_seq, 0)
  q_start = cu[seq]
  q_len = cu[seq + 1] - q_start
  first = work_block * _BLOCK_Q
  rows = jnp.where(work_seq >= 0, jnp.clip(q_len - first, 0, _BLOCK_Q), 0)
  return jnp.stack([seq, q_start + first, rows, kv[seq] - q_len + first, kv[seq]], axis=1).astype(jnp.int32)


def consumer_steps(num_rows, pos_start, kv_len, w: int, block_kv: int):
  """Key blocks that the rows of consumer warpgroup w of an item need: those holding a key at or before its
  last row's position, capped at kv_len; 0 when it has no real rows or no keys (kv_len 0: its positions are
  negative, and a negative count would unbalance the barriers). The kernel walks the larger of the two
  counts in both warpgroups. Works on scalars and arrays alike."""
  last = jnp.minimum(pos_start + (w + 1) * WGMMA_ROWS, kv_len)
  return jnp.where(num_rows > w * WGMMA_ROWS, jnp.maximum((last + block_kv - 1) // block_kv, 0), 0)


def program_slot(program, *, group: int, head_chunk: int, num_items: int):
  """(query head, work item) of a program (see `MosaicConfig.head_chunk`). Works on scalars and arrays."""
  chunk_heads = head_chunk * group  # query heads of one chunk
  chunk, rest = lax.div(program, chunk_heads * num_items), lax.rem(program, chunk_heads * num_items)
  return chunk * chunk_heads + lax.rem(rest, chunk_heads), lax.div(rest, chunk_heads)


def _kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, scratch, *, sm_scale: float, block_kv: int, num_stages: int,
            group: int, head_chunk: int, num_items: int, num_slots: int, max_pages: int):
  """One (query head, work item); see the module docstring. `meta_ref` is the item table ([W, 5], row-major)
  followed by the page table ([S, Pmax], row-major), flat."""
  (q_smem2, o_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready) = scratch
  num_heads = q_ref.shape[1]
  program = lax.axis_index("programs")
  head, item = program_slot(program, group=group, head_chunk=head_chunk, num_items=num_items)
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]
  page_size = k_ref.shape[2]
  num_pages = k_ref.shape[1]
  tokens_per_copy = min(page_size, block_kv)
  copies = block_kv // tokens_per_copy

  field = lambda f: meta_ref[item * _ITEM_FIELDS + f]
  seq = jnp.minimum(field(0), num_slots - 1)  # the padding pseudo-sequence loads no pages
  row_start, num_rows, pos_start, kv_len = field(1), field(2), field(3), field(4)
  kv_head = head // group
  scale = sm_scale * _LOG2E

  # Both warpgroups walk the same key blocks, as many as the later rows need (the earlier rows mask the
  # extra block, at most one, and only when the item does not start on a block boundary): equal counts keep
  # the turn-taking and slot releases in lockstep. A warpgroup with no rows sits out, and the other then
  # neither takes turns nor waits for it.
  total_steps = jnp.maximum(consumer_steps(num_rows, pos_start, kv_len, 0, block_kv),
                            consumer_steps(num_rows, pos_start, kv_len, 1, block_kv))
  pingpong = num_rows > WGMMA_ROWS  # both warpgroups have rows
  free_threads = jnp.where(pingpong, _CONSUMERS * WG_THREADS, WG_THREADS) + WARP_THREADS  # + the TMA warp

  k_free = lambda slot: _FREE_BARRIERS + slot
  v_free = lambda slot: _FREE_BARRIERS + num_stages + slot

  def release_slot(barrier):
    named_barrier("arrive", barrier, free_threads)

  # Turn-taking on the tensor cores (FlashAttention-3's ping-pong): each phase of a warpgroup issues its
  # matmuls, hands the turn to the other, and waits for the turn back before its next phase. A warpgroup
  # waits on its own barrier, where the other arrives. Warpgroup 0 starts without waiting and warpgroup 1
  # does not hand over after its last phase, so both barriers see as many arrivals as waits.
  def pass_turn():
    pl.when(pingpong)(lambda: named_barrier("arrive", _SCHEDULE_BARRIER + 1 - wg, _CONSUMERS * WG_THREADS))

  def take_turn():
    pl.when(pingpong)(lambda: named_barrier("sync", _SCHEDULE_BARRIER + wg, _CONSUMERS * WG_THREADS))

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(MAX_REGISTERS, action="increase")
    q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
    row0 = wg * WGMMA_ROWS
    valid = num_rows - row0  # real rows of this warpgroup (may be <= 0)
    pos0 = pos_start + row0
    full = jnp.clip((pos0 + 1) // block_kv, 0, total_steps)  # blocks wholly at or before the first row
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    @pl.when(valid > 0)
    def _():
      # Q rows start anywhere, so TMA brings them untiled into o_smem (free until the output) and the
      # warpgroup rewrites them swizzled for wgmma.
      plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row_start + row0, WGMMA_ROWS), head], o_smem, q_ready.at[wg])

    def softmax(s, step, m_i, l_i, *, masked: bool):
      """P of key block `step` from its scores, with the running max and sum; alpha rescales the output."""
      if masked:
        rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(cols + step * block_kv <= rows + pos0, s, -jnp.inf)
      # The running max is kept in scaled (base-2) units, so p = exp2(s * scale - m) is one FMA per score.
      m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l_new = l_i * alpha + p.sum(axis=1)
      return p.astype(dtype), m_new, l_new, alpha

    def zero_v_past_end(step):
      slot = lax.rem(step, num_stages)
      zero_keys_past_end(v_smem.at[slot], step * block_kv, kv_len)

    def s_tile():
      return plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32)

    def k_tile(slot):
      return plgpu.transpose_ref(k_smem.at[slot], (1, 0))

    def phase(step, carry, *, masked: bool):
      """Phase `step` (1 <= step < total_steps): S of block `step` and O += P V of block step - 1 go to the
      tensor cores together; the softmax of block `step` runs while P V is still in flight (FA3's overlap
      within a warpgroup). The output is rescaled once P V is done."""
      acc, m_i, l_i, p = carry
      k_slot, v_slot = lax.rem(step, num_stages), lax.rem(step - 1, num_stages)
      plgpu.barrier_wait(k_ready.at[k_slot])
      plgpu.barrier_wait(v_ready.at[v_slot])
      take_turn()
      if masked:
        zero_v_past_end(step - 1)

      def body(refs):
        acc_ref, p_ref, m_ref, l_ref, alpha_ref = refs

        def qk(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_tile(k_slot))
          plgpu.wgmma(acc_ref, p_ref[...], v_smem.at[v_slot])
          pass_turn()
          return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S done, P V may still run

        s = pl.run_scoped(qk, s_tile())
        release_slot(k_free(k_slot))
        p_ref[...], m_ref[...], l_ref[...], alpha_ref[...] = softmax(s, step, m_ref[...], l_ref[...],
                                                                     masked=masked)

      acc, p_new, m_i, l_i, alpha = pl.run_state(body)((plgpu.ACC.init(acc), p, m_i, l_i, m_i))
      # The old P was the register operand of the P V in flight until here. A use of it after the wait keeps
      # the compiler from writing the new P into the same registers while P V still reads them (ptxas would
      # then serialize the matmuls, C7513).
      acc, _ = lax.optimization_barrier((acc, p))
      release_slot(v_free(v_slot))
      acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
      return acc, m_i, l_i, p_new

    def attend():
      """Output rows (unnormalized) and their softmax sums over total_steps >= 1 key blocks."""
      m_i = plgpu.layout_cast(jnp.full((WGMMA_ROWS,), -jnp.inf, jnp.float32), row_layout)
      l_i = plgpu.layout_cast(jnp.full((WGMMA_ROWS,), 0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.full((WGMMA_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
      # Phase 0: S of block 0 alone.
      plgpu.barrier_wait(k_ready.at[0])
      pl.when(wg == 1)(take_turn)

      def qk0(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_tile(0))
        pass_turn()
        return s_ref[...]

      s = pl.run_scoped(qk0, s_tile())
      release_slot(k_free(0))
      p, m_i, l_i, _ = lax.cond(full > 0, functools.partial(softmax, masked=False),
                                functools.partial(softmax, masked=True), s, 0, m_i, l_i)
      carry = (acc, m_i, l_i, p)
      split = jnp.maximum(full, 1)
      carry = lax.fori_loop(1, split, functools.partial(phase, masked=False), carry)
      acc, m_i, l_i, p = lax.fori_loop(split, total_steps, functools.partial(phase, masked=True), carry)
      # Last phase: P V of the last block alone.
      last = total_steps - 1
      slot = lax.rem(last, num_stages)
      plgpu.barrier_wait(v_ready.at[slot])
      take_turn()
      zero_v_past_end(last)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
        pl.when(wg == 0)(pass_turn)

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      release_slot(v_free(slot))
      return acc, l_i

    @pl.when(valid > 0)
    def _compute():
      plgpu.barrier_wait(q_ready.at[wg])
      q_smem[...] = plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
      plgpu.commit_smem()
      zeros = (plgpu.layout_cast(jnp.full((WGMMA_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA),
               plgpu.layout_cast(jnp.full((WGMMA_ROWS,), 0, jnp.float32), row_layout))
      acc, l_i = lax.cond(total_steps > 0, attend, lambda: zeros)
      # Rows with no key (kv_len 0: padding, or decodes the mixed-batch path serves elsewhere) give 0.
      acc /= lax.broadcast_in_dim(jnp.where(l_i > 0, l_i, 1.0), acc.shape, [0])
      o_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      # Store exactly `valid` rows (<= 64) as a ladder of power-of-two TMA copies.
      n = jnp.minimum(valid, WGMMA_ROWS)
      done = 0
      size = WGMMA_ROWS
      while size:
        @pl.when(n & size != 0)
        def _():
          plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(done, size)],
                                  o_ref.at[pl.ds(row_start + row0 + done, size), head])

        done += n & size
        size //= 2
      plgpu.wait_smem_to_gmem(0)

  page_row = num_items * _ITEM_FIELDS + seq * max_pages  # this sequence's page ids in meta_ref

  def _tma_warp():
    """One warp of the producer warpgroup issues every copy (no warpgroup-wide sync per copy)."""

    def pages_of(step):
      """(page id, first slot in the page) of each copy of key block `step`."""
      out = []
      for c in range(copies):
        key = step * block_kv + c * tokens_per_copy
        index = jnp.minimum(lax.div(key, page_size), max_pages - 1)  # lax: warp code has no floor division
        page = meta_ref[page_row + index]
        out.append((jnp.clip(page, 0, num_pages - 1), 0 if page_size <= block_kv else lax.rem(key, page_size)))
      return out

    def load(pages, slot, src, dst, ready):
      for c, (page, offset) in enumerate(pages):
        plgpu.copy_gmem_to_smem(src.at[kv_head, page, pl.ds(offset, tokens_per_copy)],
                                dst.at[slot, pl.ds(c * tokens_per_copy, tokens_per_copy)], ready.at[slot])

    for i in range(num_stages):
      @pl.when(i < total_steps)
      def _():
        pages = pages_of(i)
        load(pages, i, k_ref, k_smem, k_ready)
        load(pages, i, v_ref, v_smem, v_ready)

    @pl.loop(0, jnp.maximum(total_steps - num_stages, 0))
    def _(step):
      slot = lax.rem(step, num_stages)
      pages = pages_of(step + num_stages)  # page-table reads before the waits, not after
      named_barrier("sync", k_free(slot), free_threads)
      load(pages, slot, k_ref, k_smem, k_ready)
      named_barrier("sync", v_free(slot), free_threads)
      load(pages, slot, v_ref, v_smem, v_ready)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    plgpu.warp_map(lambda warp: pl.when(warp == 0)(_tma_warp))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "num_stages", "head_chunk"))
def _flash_prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale, block_kv,
                   num_stages, head_chunk):
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  items = item_table(cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32), num_seqs, num_tokens=num_tokens)
  copies = block_kv // min(page_size, block_kv)
  dtype = q.dtype
  transforms = swizzled(dtype)

  # One fresh int32 buffer for the scalars: Mosaic GPU needs 256-byte aligned inputs, and a page table
  # sliced out of a larger array (the engine packs its step metadata) may not be.
  meta = jnp.concatenate([items.reshape(-1), page_table.astype(jnp.int32).reshape(-1)])

  def entry(meta_ref, q_ref, k_ref, v_ref, o_ref):
    pl.run_scoped(
        lambda *scratch: _kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, scratch, sm_scale=sm_scale,
                                 block_kv=block_kv, num_stages=num_stages, group=num_heads // num_kv_heads,
                                 head_chunk=head_chunk, num_items=items.shape[0], num_slots=page_table.shape[0],
                                 max_pages=page_table.shape[1]),
        (
            plgpu.SMEM((_CONSUMERS, WGMMA_ROWS, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((_CONSUMERS, WGMMA_ROWS, head_dim), dtype),
            plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=transforms),
        ),
        (
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
            plgpu.Barrier(num_barriers=_CONSUMERS),
        ),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(num_heads * items.shape[0],),
      grid_names=("programs",),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      # Lane semantics explicitly: the default became Warpgroup in JAX 0.11.
      compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(meta, q, k_pages, v_pages)


def flash_prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                  sliding_window: int | None = None, k_scales=None, v_scales=None,
                  config: MosaicConfig | None = None) -> jax.Array:
  """Causal attention of ragged prompt chunks against paged K/V (Pallas, Mosaic GPU, sm_90a).

  Args: as `pallas_triton.flash_prefill` (see the reference for the inputs); `config` the launch parameters.

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero.

  Raises:
    NotImplementedError: for inputs this kernel does not serve (see the module docstring).
  """
  config = config or MosaicConfig()
  check_supported(q, k_pages, v_pages, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales,
                  config=config)
  return _flash_prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=float(sm_scale),
                        block_kv=config.block_kv, num_stages=config.num_stages,
                        head_chunk=config.head_chunk or default_head_chunk(
                            q.shape[0], k_pages.shape[0], q.shape[1] // k_pages.shape[0]))
