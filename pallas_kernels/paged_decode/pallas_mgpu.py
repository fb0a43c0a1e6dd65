"""Split-K paged decode attention: Pallas kernel lowered through Mosaic GPU (Hopper, sm_90a).

Same work decomposition and partial results as the Triton kernel (`pallas_triton`): one program per
(sequence, KV head, split), holding the Q * G query rows of its KV head, walking its share of the
sequence's key blocks (`common.split_range`) and writing float32 partials (acc, m, l) that
`common.combine_splits` merges. What changes is how the bytes arrive:

- One CUDA block per program: C consumer warpgroups (`DecodeConfig.consumers`, 2 or 3) and a producer
  warpgroup. One warp of the producer (or 2 or 4, `DecodeConfig.producer_warps`, each with its share of the
  copy jobs: K, V, their scales) brings key blocks (`block_kv` tokens) into a ring of `num_stages` K and V
  buffers in shared memory by TMA, one copy per page (page ids read from a copy of the page table in
  global memory), as soon as a consumer has released a slot: the copies need no registers, no address
  arithmetic per element and no thread of the consumers, so their time goes to the matmuls and the
  softmax only.
- The consumer warpgroups take the split's key blocks in turns (block i to consumer i mod C, so with a
  ring of a multiple of C each slot has one consumer), each with its own online softmax state (acc, m, l);
  at the end consumers 1.. hand their states to consumer 0 through shared memory, which merges them and
  writes the result.
  Each holds the rows in one 64-row wgmma tile (M = 64 is wgmma's smallest; rows past Q * G are zero and
  never written out): S = Q K^T and O += P V on wgmma with float32 accumulators, softmax in base 2.
  One consumer left the tensor cores and the ALUs idle while it waited on itself: the second one made
  int8 pages 1.34x faster on an H200, and a third (the int8 default) 3-10% more (NOTES.md, ## paged_decode).
  bf16 pages keep two: with three (64-token blocks, the largest ring that fits) B=64, L=4096 ran 2% slower
  and B=8, L=32k 6% faster.

Data arrival (K, V, Q) is signalled by mbarriers that TMA completes; "slot consumed", "Q ready" and
"partials ready" by hardware named barriers (`mosaic_util.named_barrier`): a consumer
arrives only for slots the producer will refill, so every barrier sees as many arrivals as waits.

Keys past kv_len (the tail of the last page, pages past the end) are loaded like the rest: their scores
are masked, and the consumer zeroes those V rows in shared memory before P V (0 * NaN would leak the
garbage of unused slots). Queries see keys up to their own position (Q > 1 verifies speculation).

int8 pages (per-token scales, `quant.quantize_kv`): TMA brings the int8 values and their scales into the
ring (half the bytes of bf16), and the consumers work transposed: S^T = K Q^T and O^T += V^T P^T, so that K
and V^T are the wgmmas' A operands and N (the query rows padded to >= 16, not 64) is their narrow side.
S^T is an int8 x int8 -> int32 wgmma with both operands in shared memory: Q is quantized per row (int8 with a
float32 scale per (token, head), in XLA before the kernel, ~0.01% of the bytes), so K is never upcast. For
O^T, V^T is loaded transposed from the int8 ring, upcast to bf16 in registers and fed to the tensor cores as
the A operand; P^T, times V's scales, reaches that wgmma as its B operand through a small [block_kv, N]
tile. No dequantized K/V tile goes through shared memory (the first design, bf16 tiles written and read
back, reached only 1.0x the speed of bf16 pages on an H200; upcasting K and V in registers with three
consumers 1.30x at page 16; the int8 MMA for S^T 1.55x, and with two TMA warps 1.63x in kernel time,
NOTES.md). S^T's int32 entries are scaled by Q's row scales and K's token scales. The softmax then reduces
along axis 0, across the warpgroup's warps, through a per-consumer scratch (`reduce_keys`). Partials come
out transposed; `decode_partials` turns them back. With one split the kernel writes q's rows itself, as for
bf16 pages: the normalized O^T goes to shared memory in bf16 and one wgmma of a 64 x N identity (registers)
with it as the transposed B operand gives O (exact: each entry is one product by 1).

Requires bfloat16 or float16 queries; pages in q's dtype (head_dim 64 or 128) or int8 with per-token
scales (bfloat16 queries, head_dim 128, page_size 16 or a multiple of 32: `_scale_copy`);
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

from pallas_kernels.gpu_info import num_sms
from pallas_kernels.mosaic_util import (MAX_REGISTERS, NUM_NAMED_BARRIERS, PRODUCER_REGISTERS, REGISTERS,
                                        SHARED_MEMORY_BYTES, WARP_THREADS, WG_THREADS, WGMMA_DTYPES, WGMMA_ROWS,
                                        named_barrier, swizzled, zero_keys_past_end)
from pallas_kernels.paged_decode.common import choose_num_splits, combine_splits, split_range
from pallas_kernels.paged_decode.quant import quantize_kv
from pallas_kernels.sizes import next_power_of_2

_STATS = 8  # columns of the stats tile written per row: m, l, then padding (a TMA row needs 16 bytes)
_LOG2E = math.log2(math.e)
# Mosaic GPU's own shared memory: the row reductions' scratch (`CompilerParams.reduction_scratch_bytes`,
# 2 KB by default) and room for the mbarriers.
_RESERVED_BYTES = plgpu.CompilerParams().reduction_scratch_bytes + 128
# Named barriers 0-5 belong to Mosaic GPU (0 for the CTA, 1 + w for warpgroup w, up to 4 consumers and the
# producer; with 3 consumers an earlier layout gave warpgroup 3 our Q barrier and the kernel died of an illegal
# instruction on an H200). Ours: Q ready, partials ready for the merge, then K-consumed per ring slot and
# V-consumed per ring slot.
_Q_BARRIER = 6
_MERGE_BARRIER = 7
_FREE_BARRIERS = 8
_SCALE_COPY_TOKENS = 32  # float32 scales in the smallest TMA copy Mosaic GPU issues (128 bytes)
_REDUCE_SCRATCH = 1024  # float32 per consumer for the int8 kernel's cross-warp reductions (16 at a time)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Launch parameters of the Mosaic GPU decode kernel.

  Attributes:
    block_kv: key tokens per pipeline step (a multiple of 64, at most 256).
    num_stages: K/V buffers in the shared-memory ring, a multiple of `consumers` (each consumer owns
      num_stages / consumers of them); None: one per consumer.
    programs_per_sm: programs wanted per SM when choosing the split count (`choose_num_splits`).
    consumers: consumer warpgroups, 2 or 3; None: 3 for int8 pages with Q * G <= 16 (their per-block
      register work is the limit: 3-10% faster than 2 on an H200, NOTES.md) where the ring and shared
      memory allow, else 2.
    producer_warps: warps of the producer warpgroup that issue the TMA copies, 1, 2 or 4: the copy jobs
      (K values, V values, then for int8 pages K scales and V scales) are dealt to them in turn. One copy per
      page costs the issuing warp tens of nanoseconds, so small pages of int8 can outrun one warp (page 16:
      32 copies per 128-token block). None: 2 for int8 pages, else 1.
  """

  block_kv: int = 128
  num_stages: int | None = None
  programs_per_sm: int = 1
  consumers: int | None = None
  producer_warps: int | None = None

  def __post_init__(self):
    if self.block_kv % 64 or not 0 < self.block_kv <= 256:  # wgmma's N and a TMA box stop at 256
      raise ValueError(f"block_kv must be a multiple of 64 in [64, 256], got {self.block_kv}")
    max_stages = (NUM_NAMED_BARRIERS - _FREE_BARRIERS) // 2
    if self.num_stages is not None and not 2 <= self.num_stages <= max_stages:
      raise ValueError(f"num_stages must be in [2, {max_stages}], got {self.num_stages}")
    if self.consumers is not None and self.consumers not in (2, 3):
      raise ValueError(f"consumers must be 2 or 3, got {self.consumers}")
    # Consumer w takes the blocks i = w mod consumers, so with a ring of a multiple of `consumers` each ring
    # slot (i mod num_stages) belongs to one consumer, which waits on every phase of its mbarriers (a ring
    # of 3 with 2 consumers made them alternate on a slot, each skipping the other's phases, and hung the
    # kernel on an H200).
    if self.num_stages is not None and self.consumers is not None and self.num_stages % self.consumers:
      raise ValueError(f"num_stages ({self.num_stages}) must be a multiple of consumers ({self.consumers})")
    if self.programs_per_sm < 1:
      raise ValueError(f"programs_per_sm must be >= 1, got {self.programs_per_sm}")
    if self.producer_warps not in (None, 1, 2, 4):
      raise ValueError(f"producer_warps must be 1, 2 or 4, got {self.producer_warps}")

  def resolve(self, quantized: bool, head_dim: int = 128, rows: int = WGMMA_ROWS) -> "DecodeConfig":
    """This config with `consumers`, `num_stages` and `producer_warps` filled in, for bf16/f16 pages or int8
    pages (quantized) at this head_dim and Q * G rows (the int8 kernel's tiles grow with the rows)."""
    config = self
    if config.producer_warps is None:
      config = dataclasses.replace(config, producer_warps=2 if quantized else 1)
    if config.consumers is not None:
      return dataclasses.replace(config, num_stages=config.num_stages or config.consumers)
    # Three only where measured (N = 16 query columns; wider tiles may not fit 152 registers) and where
    # shared memory allows.
    if quantized and (config.num_stages or 3) % 3 == 0 and _query_columns(rows) == 16:
      three = dataclasses.replace(config, consumers=3, num_stages=config.num_stages or 3)
      if shared_memory_bytes(head_dim, 2, three, 1, rows) <= SHARED_MEMORY_BYTES:
        return three
    if config.num_stages is not None and config.num_stages % 2:
      raise ValueError(f"num_stages={config.num_stages} needs a multiple of the consumer count; these pages "
                       f"(Q * G = {rows}) run 2 consumers: pass an even num_stages or consumers=3")
    return dataclasses.replace(config, consumers=2, num_stages=config.num_stages or 2)


def _consumer_registers(consumers: int) -> int:
  """Registers per consumer thread after `set_max_registers`: what the producer leaves, at most 232 (a
  multiple of 8, as setmaxnreg requires)."""
  free = (REGISTERS - WG_THREADS * PRODUCER_REGISTERS) // (consumers * WG_THREADS)
  return min(MAX_REGISTERS, free // 8 * 8)


def _query_columns(rows: int) -> int:
  """N of the int8 kernel's transposed tiles: the query rows padded to a power of two >= 16 (wgmma's N and
  the P^T tile's swizzle)."""
  return max(16, next_power_of_2(rows))


def _scale_copy(tokens_per_copy: int) -> tuple[int, int]:
  """(tokens, phases) of one TMA copy of int8 scales. Mosaic GPU copies move multiples of 128 bytes (32
  float32 scales): a 16-token page's copy takes its next page's scales along, so copies alternate between two
  buffers ("phases") that the extra 16 land in without overwriting a neighbour's; the consumer picks each
  token's scale from its copy's phase."""
  tokens = max(tokens_per_copy, _SCALE_COPY_TOKENS)
  return tokens, tokens // tokens_per_copy


def shared_memory_bytes(head_dim: int, itemsize: int, config: DecodeConfig, page_itemsize: int | None = None,
                        rows: int = WGMMA_ROWS) -> int:
  """Bytes of shared memory of one program: the K and V rings, what Mosaic GPU reserves (reduction scratch,
  mbarriers), Q (staging and swizzled) and the float32 output and stats tiles (also the merge's); for 8-bit
  pages (`page_itemsize` 1; `rows` = Q * G) Q in int8 with its scales, the transposed output tiles, each
  consumer's P^T tile and reduction scratch, and the rings' scales."""
  page_itemsize = page_itemsize or itemsize
  if config.consumers is None or config.num_stages is None:
    config = config.resolve(page_itemsize != itemsize, head_dim, rows)
  ring = config.num_stages * config.block_kv
  total = 2 * ring * page_itemsize * head_dim + _RESERVED_BYTES
  merge = config.consumers - 1  # output and stats tiles: one per consumer but the first
  if page_itemsize == itemsize:
    return total + 2 * WGMMA_ROWS * itemsize * head_dim + merge * WGMMA_ROWS * (head_dim + _STATS) * 4
  n_cols = _query_columns(rows)
  scales = 2 * config.num_stages * 2 * (config.block_kv + _SCALE_COPY_TOKENS // 2) * 4  # at most two phases
  # Q in int8 and its scales; O^T in bf16 and O staged (used with one split)
  q = n_cols * head_dim + max(_SCALE_COPY_TOKENS, n_cols) * 4 + (n_cols + WGMMA_ROWS) * head_dim * itemsize
  return (total + q + merge * (head_dim + WGMMA_ROWS) * n_cols * 4
          + config.consumers * (config.block_kv * n_cols * itemsize + _REDUCE_SCRATCH * 4) + scales)


def check_supported(q_dtype, k_pages: jax.Array, v_pages: jax.Array, *, rows: int, sliding_window, k_scales,
                    v_scales, config: DecodeConfig) -> None:
  """Raises NotImplementedError, naming the input, for what this kernel does not serve. `rows` is Q * G."""
  if sliding_window is not None:
    raise NotImplementedError(f"the Mosaic GPU decode kernel has no sliding window (got {sliding_window})")
  if q_dtype not in WGMMA_DTYPES:
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
    if q_dtype != jnp.bfloat16:  # P^T times V's scales is rounded to the matmul dtype: float16 flushes it
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs bfloat16 queries for int8 pages, got {q_dtype}")
    if page_size % _SCALE_COPY_TOKENS and page_size != _SCALE_COPY_TOKENS // 2:  # see `_scale_copy`
      raise NotImplementedError(f"the Mosaic GPU decode kernel needs a page_size of 16 or a multiple of 32 for "
                                f"int8 pages (its TMA copies of scales move multiples of 128 bytes), got {page_size}")
  if head_dim not in (64, 128):
    raise NotImplementedError(f"the Mosaic GPU decode kernel needs head_dim 64 or 128, got {head_dim}")
  if page_size % 8 or (config.block_kv % page_size and page_size % config.block_kv):
    raise NotImplementedError(f"the Mosaic GPU decode kernel needs a page_size that is a multiple of 8 and "
                              f"divides or is a multiple of block_kv={config.block_kv}; got {page_size}")
  if rows > WGMMA_ROWS:
    raise NotImplementedError(f"Q * G = {rows} query rows per KV head exceed the kernel's {WGMMA_ROWS}")
  config = config.resolve(k_scales is not None, head_dim, rows)
  smem = shared_memory_bytes(head_dim, jnp.dtype(q_dtype).itemsize, config, k_pages.dtype.itemsize, rows)
  if smem > SHARED_MEMORY_BYTES:
    raise NotImplementedError(f"{config} needs {smem} bytes of shared memory at head_dim {head_dim}; an sm_90 "
                              f"CTA has {SHARED_MEMORY_BYTES}")


def _kernel(meta_ref, q_ref, k_ref, v_ref, scale_refs, out_refs, scratch, *, q_len: int, group: int,
            num_splits: int, block_kv: int, num_stages: int, consumers: int, producer_warps: int,
            sm_scale: float, num_seqs: int, max_pages: int):
  """One (sequence, KV head, split); see the module docstring. `meta_ref` is kv_lens ([S]) followed by the
  page table ([S, Pmax], row-major), flat. `scale_refs`: () or, for int8 pages, the per-token scales of K and V
  ([K, P * page_size]) and Q quantized per row by `decode_partials` (int8 [S, K, N, D], scales [S, K, >= 32]).
  `out_refs`: (the attention output [S, Q * H, D]) with one split, (acc, stats) partials otherwise."""
  (q_tiles, k_smem, v_smem, acc_smem, stats_smem, *int8_scratch), (k_ready, v_ready, q_ready) = scratch
  quantized = len(scale_refs) > 0
  if quantized:  # Q as int8 [N, D] and its row scales; the output's tiles (O^T in bf16, O staged for TMA)
    q8_ref, qs_ref = scale_refs[2:]
    q8_smem, qs_smem, ot_smem, q_stage = q_tiles
    p_smem, reduce_smem, *scale_smem = int8_scratch
    n_cols = p_smem.shape[2]  # N: the query rows, padded to a power of two >= 16
  else:  # Q as it arrives (with one split, also the output's staging) and swizzled for wgmma
    q_stage, q_smem = q_tiles
  num_kv_heads, num_pages, page_size, head_dim = k_ref.shape
  num_heads = q_ref.shape[1] // q_len
  rows = q_len * group
  dtype = q_ref.dtype  # the matmuls' operand dtype
  tokens_per_copy = min(page_size, block_kv)
  copies = block_kv // tokens_per_copy
  scale_tokens, scale_phases = _scale_copy(tokens_per_copy)
  # Copy jobs (which: 0 for K, 1 for V; values or scales), dealt to the producer's warps in turn.
  jobs = [(which, False) for which in (0, 1)] + ([(which, True) for which in (0, 1)] if quantized else [])
  warp_jobs = [jobs[w::producer_warps] for w in range(producer_warps)]
  # A slot's "consumed" barrier: its one consumer and every producer warp that refills K (or V).
  free_threads = [WG_THREADS + WARP_THREADS * sum(any(j[0] == which for j in wj) for wj in warp_jobs)
                  for which in (0, 1)]

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

  @pl.when(wg < consumers)
  def _consumer():
    plgpu.set_max_registers(_consumer_registers(consumers), action="increase")
    # The query rows lie along axis 0 of S and acc (S = Q K^T, O = P V) or, with int8 pages, along axis 1
    # (S^T = K Q^T, O^T = V^T P^T); the keys along the other axis of S.
    q_axis = 1 if quantized else 0
    key_axis = 1 - q_axis
    q_layout = plgpu.Layout.WGMMA.reduce(key_axis)  # vectors over the query rows
    iota = lambda shape, axis: plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
    along_q = lambda x, shape: lax.broadcast_in_dim(x, shape, [q_axis])

    def reduce_keys(op, x):
      """x reduced over its key axis: within each warp's rows for S, across the warpgroup's 4 warps for S^T."""
      if not quantized:
        return x.max(axis=1) if op == "max" else x.sum(axis=1)

      # NOTE: Pallas lowers a cross-warp reduction through one shared-memory scratch for all warpgroups
      # (`ModuleContext.scratch_view`), so the two consumers raced on it and corrupted each other's softmax;
      # each consumer passes its own scratch here.
      @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
                         return_type=plgpu.ShapeDtypeStruct((n_cols,), jnp.float32, layout=q_layout))
      def reduce(_, x, scratch):
        return x.reduce(op, 0, scratch=scratch)

      return reduce(x, reduce_smem.at[wg])

    def release(which, slot, i):
      # Only slots the producer refills: equal arrivals and waits on every named barrier.
      barrier = (k_free, v_free)[which](slot)
      pl.when(i + num_stages < steps)(lambda: named_barrier("arrive", barrier, free_threads[which]))

    def softmax(s, b, m_i, l_i, *, masked: bool):
      if masked:
        # Key pos is visible to row r (token t = r // G) iff pos < length and pos <= length - Q + t, i.e.
        # r >= (pos - length + Q) * G; padding rows see every key below length.
        r, pos = iota(s.shape, q_axis), iota(s.shape, key_axis) + b * block_kv
        s = jnp.where((pos < length) & (r >= (pos - (length - q_len)) * group), s, -jnp.inf)
      m_new = jnp.maximum(m_i, reduce_keys("max", s) * scale)
      # A row may have seen no key yet (m stays -inf, as the merge and the combine expect): exp2 then gets a
      # finite reference instead of -inf - -inf.
      m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_ref)
      p = jnp.exp2(s * scale - along_q(m_ref, s.shape))
      return p, m_new, l_i * alpha + reduce_keys("add", p), alpha

    def step(j, carry, *, masked: bool):
      """Key block i = C j + wg of the split: the C consumers take turns, each with its own softmax state."""
      acc, m_i, l_i = carry
      i = consumers * j + wg
      b, slot = first + i, lax.rem(i, num_stages)
      plgpu.barrier_wait(k_ready.at[slot])

      def qk(s_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32))
      release(0, slot, i)
      p, m_i, l_i, alpha = softmax(s, b, m_i, l_i, masked=masked)
      acc = acc * along_q(alpha, acc.shape)
      plgpu.barrier_wait(v_ready.at[slot])
      if masked:
        zero_keys_past_end(v_smem.at[slot], b * block_kv, length)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      release(1, slot, i)
      return acc, m_i, l_i

    def token_scales(which, slot):
      """The [block_kv] scales of K (which = 0) or V (1) in ring slot `slot`, along S^T's rows."""
      layout = plgpu.Layout.WGMMA.reduce(1)
      buffer = scale_smem[which].at[slot]
      phase = lambda n: plgpu.load(buffer.at[n, pl.ds(0, block_kv)], (), layout=layout, optimized=False)
      if scale_phases == 1:
        return phase(0)
      copy = lax.div(plgpu.broadcasted_iota(jnp.int32, (block_kv,), 0, layout=layout), tokens_per_copy)
      return jnp.where(lax.rem(copy, 2) == 0, phase(0), phase(1))

    def int8_step(j, carry, *, masked: bool):
      """`step` for int8 pages, transposed: S^T is an int8 wgmma of K and Q straight from shared memory; V^T
      is upcast in registers and enters the second wgmma as its A operand, P^T as its B operand through a
      small tile. The scales multiply S^T (Q's and K's) and P^T (V's); no dequantized tile goes through
      shared memory."""
      acc, m_i, l_i = carry  # acc: O^T [D, N]
      i = consumers * j + wg
      b, slot = first + i, lax.rem(i, num_stages)
      plgpu.barrier_wait(k_ready.at[slot])
      k_scale = token_scales(0, slot)

      def qk(s_ref):  # int8 x int8 -> int32, both operands straight from shared memory
        plgpu.wgmma(s_ref, k_smem.at[slot], plgpu.transpose_ref(q8_smem, (1, 0)))
        return s_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((block_kv, n_cols), jnp.int32))  # S^T [block_kv, N]
      release(0, slot, i)
      s = s.astype(jnp.float32) * q_scale * lax.broadcast_in_dim(k_scale, s.shape, [0])
      # Past kv_len the scales may be NaN: `softmax` masks those scores to -inf, and P^T to 0 below.
      p, m_i, l_i, alpha = softmax(s, b, m_i, l_i, masked=masked)
      acc = acc * along_q(alpha, acc.shape)
      plgpu.barrier_wait(v_ready.at[slot])
      v_scale = token_scales(1, slot)
      p = p * lax.broadcast_in_dim(v_scale, p.shape, [0])
      if masked:
        p = jnp.where(iota(p.shape, 0) + b * block_kv < length, p, jnp.zeros_like(p))
      p_smem.at[wg][...] = p.astype(dtype)
      plgpu.commit_smem()
      v = plgpu.load(plgpu.transpose_ref(v_smem.at[slot], (1, 0)), (), layout=plgpu.Layout.WGMMA_TRANSPOSED)
      v = plgpu.layout_cast(v.astype(dtype), plgpu.Layout.WGMMA)  # V^T [D, block_kv]

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, v, p_smem.at[wg])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      release(1, slot, i)
      return acc, m_i, l_i

    @pl.when(wg == 0)
    def _():
      if quantized:
        plgpu.copy_gmem_to_smem(q8_ref.at[seq, kv_head], q8_smem, q_ready.at[0])
        plgpu.copy_gmem_to_smem(qs_ref.at[seq, kv_head], qs_smem, q_ready.at[0])
        plgpu.barrier_wait(q_ready.at[0])
        return
      # Row r = t * G + g is query token t, head kv_head * G + g: Q copies of G contiguous rows of q.
      for t in range(q_len):
        plgpu.copy_gmem_to_smem(q_ref.at[seq, pl.ds(t * num_heads + kv_head * group, group)],
                                q_stage.at[pl.ds(t * group, group)], q_ready.at[0])
      plgpu.barrier_wait(q_ready.at[0])
      q = plgpu.load(q_stage, (), layout=plgpu.Layout.WGMMA, optimized=False)
      q_smem[...] = jnp.where(iota(q.shape, 0) < rows, q, jnp.zeros_like(q))  # rows past Q * G: stale memory
      plgpu.commit_smem()

    named_barrier("sync", _Q_BARRIER, consumers * WG_THREADS)  # Q is in shared memory
    if quantized:  # Q's row scales along S^T's columns, for every block
      q_scale = along_q(plgpu.load(qs_smem.at[pl.ds(0, n_cols)], (), layout=q_layout, optimized=False),
                        (block_kv, n_cols))
    share = lambda n: jnp.maximum(lax.div(n - wg + consumers - 1, consumers), 0)  # blocks C j + wg below n
    num_q = n_cols if quantized else WGMMA_ROWS
    acc_shape = (head_dim, n_cols) if quantized else (WGMMA_ROWS, head_dim)
    carry = (plgpu.layout_cast(jnp.full(acc_shape, 0, jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((num_q,), -jnp.inf, jnp.float32), q_layout),
             plgpu.layout_cast(jnp.full((num_q,), 0, jnp.float32), q_layout))
    body = int8_step if quantized else step
    carry = lax.fori_loop(0, share(unmasked), functools.partial(body, masked=False), carry)
    acc, m_i, l_i = lax.fori_loop(share(unmasked), share(steps), functools.partial(body, masked=True), carry)
    # Stats tile: m at index 0 and l at index 1 of the key axis, the query rows along the other.
    stats_shape = stats_smem.shape[1:]
    pack_stats = lambda m, l: jnp.where(iota(stats_shape, key_axis) == 0, along_q(m, stats_shape),
                                        along_q(l, stats_shape))

    @pl.when(wg > 0)
    def _():  # hand the partial result to consumer 0
      acc_smem.at[wg - 1][...] = acc
      stats_smem.at[wg - 1][...] = pack_stats(m_i, l_i)
      named_barrier("arrive", _MERGE_BARRIER, consumers * WG_THREADS)

    @pl.when(wg == 0)
    def _():
      named_barrier("sync", _MERGE_BARRIER, consumers * WG_THREADS)
      index = iota(stats_shape, key_axis)
      acc_all, m, l_all = acc, m_i, l_i
      for c in range(consumers - 1):
        acc_c = plgpu.load(acc_smem.at[c], (), layout=plgpu.Layout.WGMMA, optimized=False)
        stats = plgpu.load(stats_smem.at[c], (), layout=plgpu.Layout.WGMMA, optimized=False)
        m_c = reduce_keys("max", jnp.where(index == 0, stats, -jnp.inf))
        l_c = reduce_keys("max", jnp.where(index == 1, stats, -jnp.inf))
        m_new = jnp.maximum(m, m_c)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        a0, a1 = jnp.exp2(m - m_safe), jnp.exp2(m_c - m_safe)
        acc_all = acc_all * along_q(a0, acc.shape) + acc_c * along_q(a1, acc.shape)
        l_all, m = l_all * a0 + l_c * a1, m_new
      if num_splits == 1:  # the whole sequence: normalize, write q's rows, no combine pass
        out = acc_all / along_q(jnp.where(l_all > 0, l_all, 1.0), acc.shape)  # l = 0: no keys, output 0
        if quantized:  # O^T [D, N] -> O [64, D]: O = I O^T^T, one wgmma with O^T (in bf16) as its B operand
          ot_smem[...] = out.astype(dtype)
          plgpu.commit_smem()
          eye = jnp.where(iota((WGMMA_ROWS, n_cols), 0) == iota((WGMMA_ROWS, n_cols), 1), 1.0, 0.0).astype(dtype)

          def transpose(o_ref):
            plgpu.wgmma(o_ref, eye, plgpu.transpose_ref(ot_smem, (1, 0)))

          zeros = plgpu.layout_cast(jnp.full((WGMMA_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
          out = pl.run_state(transpose)(plgpu.ACC.init(zeros))  # exact: one product by 1 per entry
        q_stage[...] = out.astype(dtype)  # free since Q was read
        plgpu.commit_smem()
        for t in range(q_len):
          plgpu.copy_smem_to_gmem(q_stage.at[pl.ds(t * group, group)],
                                  out_refs[0].at[seq, pl.ds(t * num_heads + kv_head * group, group)])
      else:
        acc_ref, stats_ref = out_refs
        acc_out, stats_out = acc_smem.at[0], stats_smem.at[0]  # consumer 1's, read above
        acc_out[...] = acc_all
        stats_out[...] = pack_stats(m, l_all)
        plgpu.commit_smem()
        if quantized:  # O^T [D, N] and the stats' first two rows
          plgpu.copy_smem_to_gmem(acc_out, acc_ref.at[seq, kv_head, split])
          plgpu.copy_smem_to_gmem(stats_out.at[pl.ds(0, 2)], stats_ref.at[seq, kv_head, split])
        else:
          plgpu.copy_smem_to_gmem(acc_out.at[pl.ds(0, rows)], acc_ref.at[seq, kv_head, split])
          plgpu.copy_smem_to_gmem(stats_out.at[pl.ds(0, rows)], stats_ref.at[seq, kv_head, split])
      plgpu.wait_smem_to_gmem(0)

  def _tma_warp(my_jobs):
    """Issues the copies of `my_jobs` ((which, scales) pairs) for every block of the split."""
    whiches = sorted({which for which, _ in my_jobs})
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
      """This warp's copies of K (which = 0) or V (1) of one block (values, scales or both), one per page."""
      src, dst, ready = ((k_ref, k_smem, k_ready), (v_ref, v_smem, v_ready))[which]
      for c, (page, offset) in enumerate(pages):
        if (which, False) in my_jobs:
          window = pl.ds(c * tokens_per_copy, tokens_per_copy)
          plgpu.copy_gmem_to_smem(src.at[kv_head, page, pl.ds(offset, tokens_per_copy)], dst.at[slot, window],
                                  ready.at[slot])
        if (which, True) in my_jobs:
          scale_window = pl.ds(c * tokens_per_copy, scale_tokens)
          plgpu.copy_gmem_to_smem(scale_refs[which].at[kv_head, pl.ds(page * page_size + offset, scale_tokens)],
                                  scale_smem[which].at[slot, c % scale_phases, scale_window], ready.at[slot])

    for i in range(num_stages):
      @pl.when(i < steps)
      def _(i=i):
        pages = pages_of(first + i)
        for which in whiches:
          copy(pages, i, which)

    @pl.loop(0, jnp.maximum(steps - num_stages, 0))
    def _(i):
      slot = lax.rem(i, num_stages)
      pages = pages_of(first + i + num_stages)  # page-table reads before the waits
      for which in whiches:
        named_barrier("sync", (k_free, v_free)[which](slot), free_threads[which])
        copy(pages, slot, which)

  @pl.when(wg == consumers)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

    def per_warp(warp):
      for w, my_jobs in enumerate(warp_jobs):
        if my_jobs:
          pl.when(warp == w)(functools.partial(_tma_warp, my_jobs))

    plgpu.warp_map(per_warp)


@functools.partial(jax.jit, static_argnames=("q_len", "sm_scale", "num_splits", "config"))
def decode_partials(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales=None, v_scales=None, *, q_len: int,
                    sm_scale: float, num_splits: int, config: DecodeConfig = DecodeConfig()):
  """Paged decode attention, or its split partials.

  Args:
    q_flat: [S' >= S, Q * H, D] queries, sequence s's in row s (token-major).
    k_pages, v_pages: [K, P, page_size, D], in q's dtype or int8 with `k_scales`, `v_scales`.
    kv_lens: [S] int32; page_table: [S, Pmax] int32.
    k_scales, v_scales: per-token scales [K, P, page_size] float32 of int8 pages, else None.
    q_len, sm_scale: query tokens per sequence, softmax scale.
    num_splits: programs per (sequence, KV head).
    config: the other launch parameters (unset ones filled in by `DecodeConfig.resolve`).

  Returns:
    With one split, the attention output [S, Q * H, D] in q's dtype (zeros for kv_len 0). Otherwise
    (acc [S, K, N, Q * G, D], m [S, K, N, Q * G], l [S, K, N, Q * G]) float32: unnormalized outputs,
    running maxima (log2 units, -inf for a split with no key) and softmax sums of each split, for
    `common.combine_splits`.
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
  config = config.resolve(quantized, head_dim, rows)
  block_kv, num_stages, consumers = config.block_kv, config.num_stages, config.consumers
  n_cols = _query_columns(rows)
  tokens_per_copy = min(page_size, block_kv)
  copies = block_kv // tokens_per_copy
  scale_tokens, phases = _scale_copy(tokens_per_copy)
  transforms = swizzled(dtype)
  # One fresh int32 buffer for the scalars (Mosaic GPU wants 256-byte aligned inputs).
  meta = jnp.concatenate([kv_lens.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1)])
  # Scales as [K, P * page_size]: a copy may read past its page (`_scale_copy`).
  scales = tuple(x.astype(jnp.float32).reshape(num_kv_heads, -1) for x in (k_scales, v_scales)) if quantized else ()
  if quantized:  # Q per (sequence, KV head): int8 [N, D] (rows r = t * G + g, zero past Q * G), row scales
    q = q_flat[:num_seqs].reshape(num_seqs, q_len, num_kv_heads, group, head_dim).swapaxes(1, 2)
    q = jnp.pad(q.reshape(num_seqs, num_kv_heads, rows, head_dim), ((0, 0), (0, 0), (0, n_cols - rows), (0, 0)))
    q8, q_scales = quantize_kv(q, "int8")
    # A TMA copy moves at least 128 bytes: 32 scales.
    scales += (q8, jnp.pad(q_scales, ((0, 0), (0, 0), (0, max(_SCALE_COPY_TOKENS, n_cols) - n_cols))))
  ring = (num_stages, block_kv, head_dim)
  merge = consumers - 1  # consumers 1.. hand their partials to consumer 0 through these tiles
  p_columns = min(64, n_cols)  # a 128-byte swizzle holds 64 bf16 columns
  narrow = (plgpu.TilingTransform((8, p_columns)), plgpu.SwizzleTransform(2 * p_columns))  # [*, N] bf16 tiles
  if quantized:  # Q, O^T, its stats, each consumer's P^T tile and reduction scratch, the rings' scales
    q_tiles = (plgpu.SMEM((n_cols, head_dim), jnp.int8, transforms=swizzled(jnp.int8)),
               plgpu.SMEM((max(_SCALE_COPY_TOKENS, n_cols),), jnp.float32),
               plgpu.SMEM((head_dim, n_cols), dtype, transforms=narrow),  # O^T in bf16, the transpose's operand
               plgpu.SMEM((WGMMA_ROWS, head_dim), dtype))  # O, staged for its TMA copies
    out_tiles = (plgpu.SMEM((merge, head_dim, n_cols), jnp.float32),
                 plgpu.SMEM((merge, WGMMA_ROWS, n_cols), jnp.float32))
    int8_scratch = (
        plgpu.SMEM((consumers, block_kv, n_cols), dtype, transforms=narrow),
        plgpu.SMEM((consumers, _REDUCE_SCRATCH), jnp.float32),
        *[plgpu.SMEM((num_stages, phases, block_kv + scale_tokens - tokens_per_copy), jnp.float32)] * 2)
  else:
    q_tiles = (plgpu.SMEM((WGMMA_ROWS, head_dim), dtype),
               plgpu.SMEM((WGMMA_ROWS, head_dim), dtype, transforms=transforms))
    out_tiles = (plgpu.SMEM((merge, WGMMA_ROWS, head_dim), jnp.float32),
                 plgpu.SMEM((merge, WGMMA_ROWS, _STATS), jnp.float32))
    int8_scratch = ()

  def entry(meta_ref, q_ref, k_ref, v_ref, *refs):
    scale_refs, out_refs = refs[:len(scales)], refs[len(scales):]
    pl.run_scoped(
        lambda *scratch: _kernel(meta_ref, q_ref, k_ref, v_ref, scale_refs, out_refs, scratch, q_len=q_len,
                                 group=group, num_splits=num_splits, block_kv=block_kv, num_stages=num_stages,
                                 consumers=consumers, producer_warps=config.producer_warps,
                                 sm_scale=sm_scale, num_seqs=num_seqs, max_pages=max_pages),
        (
            q_tiles,
            plgpu.SMEM(ring, k_pages.dtype, transforms=swizzled(k_pages.dtype)),
            plgpu.SMEM(ring, v_pages.dtype, transforms=swizzled(v_pages.dtype)),
            *out_tiles,
            *int8_scratch,
        ),
        (
            plgpu.Barrier(num_arrivals=copies * (1 + quantized), num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=copies * (1 + quantized), num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=2 if quantized else q_len, num_barriers=1),
        ),
        collective_axes="wg",
    )

  part = (num_seqs, num_kv_heads, num_splits)
  if num_splits == 1:
    out_type = (jax.ShapeDtypeStruct((num_seqs,) + q_flat.shape[1:], dtype),)
  elif quantized:
    out_type = (jax.ShapeDtypeStruct(part + (head_dim, n_cols), jnp.float32),
                jax.ShapeDtypeStruct(part + (2, n_cols), jnp.float32))
  else:
    out_type = (jax.ShapeDtypeStruct(part + (rows, head_dim), jnp.float32),
                jax.ShapeDtypeStruct(part + (rows, _STATS), jnp.float32))
  outs = plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(num_seqs * num_kv_heads * num_splits,),
      grid_names=("programs",),
      num_threads=consumers + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(meta, q_flat, k_pages, v_pages, *scales)
  if num_splits == 1:
    return outs[0]
  if not quantized:
    return outs[0], outs[1][..., 0], outs[1][..., 1]
  acc_t, stats = outs[0][..., :rows], outs[1][..., :rows]  # O^T [S, K, N, D, rows], [S, K, N, 2, rows]
  return jnp.swapaxes(acc_t, -1, -2), stats[..., 0, :], stats[..., 1, :]


def decode(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales=None, v_scales=None, *, q_len: int,
           sm_scale: float, num_splits: int | None = None, config: DecodeConfig = DecodeConfig()) -> jax.Array:
  """Paged decode attention of the queries `q_flat` (sequence s's Q tokens in row s, token-major), for inputs
  that passed `common.check_inputs` and `check_supported`.

  Args:
    q_flat, k_pages, v_pages, kv_lens, page_table, k_scales, v_scales, q_len, sm_scale: as in `decode_partials`.
    num_splits: programs per (sequence, KV head); None: `common.choose_num_splits` with the config's
      `programs_per_sm`.
    config: the other launch parameters.

  Returns:
    [S, Q, H, D]: float32 merged from the splits' partials, or in q's dtype where one split wrote the output.
  """
  num_kv_heads, _, page_size, _ = k_pages.shape
  num_heads = q_flat.shape[1] // q_len
  head_dim = q_flat.shape[2]
  num_seqs = kv_lens.shape[0]
  max_pages = page_table.shape[1]
  if num_splits is None:
    num_splits = choose_num_splits(num_seqs, num_kv_heads, pl.cdiv(max_pages * page_size, config.block_kv),
                                   num_sms=num_sms(), programs_per_sm=config.programs_per_sm)
  out = decode_partials(q_flat, k_pages, v_pages, kv_lens, page_table, k_scales, v_scales, q_len=q_len,
                        sm_scale=sm_scale, num_splits=num_splits, config=config)
  if num_splits == 1:  # the kernel wrote the normalized output
    return out.reshape(num_seqs, q_len, num_heads, head_dim)
  return combine_splits(*out, q_len=q_len, group=num_heads // num_kv_heads)
