"""Flash prefill attention over paged K/V: Pallas kernel lowered through Triton (GPU).

Semantics are those of `pallas_kernels.reference.ragged_paged_attention`: a flat ragged batch of query
rows (`cu_q_lens`), each sequence causal against its own K/V (cached prefix plus this step's tokens) read
from pages through the page table.

Work decomposition. The wrapper cuts every real sequence's query rows into blocks of `block_q` tokens and
lists them as work items (sequence id, query block); the grid is (work item, KV head). One program takes
all G = H / K query heads of its KV head, so its matmuls have block_q * G rows (row r is token r // G,
head r % G) and each K/V tile it loads serves G heads. Items are ordered heaviest first (most keys to
visit) so the long causal blocks start early and the short ones fill the tail. The number of items is a
static bound, cdiv(T, block_q) + S; the spare ones have no rows and exit at once.

Inner loop. Keys are visited in blocks of `block_k`: first the blocks that lie wholly at or below the
block's first query position (no mask), then the diagonal blocks (causal mask, keys past kv_len zeroed
in V so NaN padding in unused page slots cannot reach the output). Online softmax in base 2 with float32
statistics and accumulator. K/V rows are gathered token by token through the page table, so any page size
works and pages may sit anywhere.

Padding query rows (past cu_q_lens[num_seqs]) are never written by the kernel: the output buffer is a
zeros array aliased to the kernel's output.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.flash_prefill import tuning
from pallas_kernels.sizes import is_power_of_2
from pallas_kernels.triton_util import CompilerParams

# Finite so that a row whose keys are all masked in one block gives exp2(0) = 1 rather than NaN; the
# next unmasked key rescales that garbage by exp2(-huge) = 0. Every real row sees key 0 in block 0.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dot(a: jax.Array, b: jax.Array, *, contract_b: int, precision) -> jax.Array:
  """[M, C] x b -> [M, N] float32, contracting b's dim `contract_b` (pl.dot is gone in JAX 0.12)."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _flash_prefill_kernel(
    work_seq_ref,  # [W] int32, sequence of each work item, -1 for spare items
    work_block_ref,  # [W] int32, query block (in units of block_q) within the sequence's chunk
    cu_q_lens_ref,  # [S + 1] int32
    kv_lens_ref,  # [S] int32
    page_table_ref,  # [S, Pmax] int32
    q_ref,  # [T, H, D]
    k_pages_ref,  # [K, P, page_size, D]
    v_pages_ref,  # [K, P, page_size, D]
    o_init_ref,  # [T, H, D], zeros, aliased to o_ref
    o_ref,  # [T, H, D]
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    group: int,
    sliding_window: int | None,
    precision: lax.Precision | None,
    prefetch_pages: bool,
):
  del o_init_ref  # Only there to zero the rows no program writes.
  item, kv_head = pl.program_id(0), pl.program_id(1)
  head_dim = q_ref.shape[-1]
  page_size = k_pages_ref.shape[2]
  max_pages = page_table_ref.shape[1]
  rows = block_q * group

  seq = work_seq_ref[item]
  real = seq >= 0
  seq = jnp.maximum(seq, 0)
  q_start = cu_q_lens_ref[seq]
  q_len = jnp.where(real, cu_q_lens_ref[seq + 1] - q_start, 0)
  kv_len = kv_lens_ref[seq]
  first = work_block_ref[item] * block_q  # index of the block's first query within the chunk
  prefix = kv_len - q_len

  token_valid = first + jnp.arange(block_q) < q_len  # [block_q]
  q_rows = pl.ds(q_start + first, block_q)
  if group == 1:
    q = plgpu.load(q_ref.at[q_rows, kv_head, :], mask=token_valid[:, None], other=0.0)
  else:
    q = plgpu.load(q_ref.at[q_rows, pl.ds(kv_head * group, group), :],
                   mask=token_valid[:, None, None], other=0.0)
    q = q.reshape(rows, head_dim)  # [block_q * G, D], row = token * G + head

  # Absolute positions: query row r is token first + r // G.
  q_pos = prefix + first + jnp.arange(rows) // group  # [rows]
  q_pos_min = prefix + first
  q_pos_max = prefix + jnp.minimum(first + block_q, q_len) - 1
  num_blocks = jnp.where(q_len > first, (q_pos_max + block_k) // block_k, 0)
  if sliding_window is None:
    lo = 0
    # Blocks whose last key is at or before the first query position need no mask.
    num_full = jnp.minimum((q_pos_min + 1) // block_k, num_blocks)
  else:
    lo = jnp.maximum(q_pos_min - sliding_window + 1, 0) // block_k
    num_full = lo  # With a window every visited block is masked.
  qk_scale = sm_scale * _LOG2E
  d_index = jnp.arange(head_dim)

  def page_ids(start):
    key_pos = start * block_k + jnp.arange(block_k)
    return page_table_ref[seq, jnp.minimum(key_pos // page_size, max_pages - 1)]  # [block_k]

  def load_kv(key_pos, pages, key_mask):
    index = (kv_head, pages[:, None], (key_pos % page_size)[:, None], d_index[None, :])
    if key_mask is None:
      return k_pages_ref[index], v_pages_ref[index]  # [block_k, D] each
    mask = key_mask[:, None]
    return (plgpu.load(k_pages_ref.at[index], mask=mask, other=0.0),
            plgpu.load(v_pages_ref.at[index], mask=mask, other=0.0))

  def step(k, v, carry, mask):
    acc, m_prev, l_prev = carry
    qk = _dot(q, k, contract_b=1, precision=precision) * qk_scale  # [rows, block_k] f32
    if mask is not None:
      qk = jnp.where(mask, qk, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, qk.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(qk - m_next[:, None])
    l_next = l_prev * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, contract_b=0, precision=precision)
    return acc, m_next, l_next

  def body(start, carry, *, masked: bool):
    if prefetch_pages:
      # The page ids of block `start` came from the previous step, so the K/V addresses do not wait on
      # a load issued in this one; fetch those of the next block now.
      *state, pages = carry
      next_pages = page_ids(start + 1)
    else:
      state, pages = carry, page_ids(start)
    key_pos = start * block_k + jnp.arange(block_k)  # [block_k]
    if masked:
      k, v = load_kv(key_pos, pages, key_pos < kv_len)
      mask = key_pos[None, :] <= q_pos[:, None]
      if sliding_window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
    else:
      k, v = load_kv(key_pos, pages, None)
      mask = None
    state = step(k, v, tuple(state), mask)
    return (*state, next_pages) if prefetch_pages else state

  carry = (
      jnp.zeros((rows, head_dim), jnp.float32),
      jnp.full((rows,), -jnp.inf, jnp.float32),
      jnp.zeros((rows,), jnp.float32),
  )
  if prefetch_pages:
    carry = (*carry, page_ids(lo))
  carry = lax.fori_loop(lo, num_full, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
  acc, _, l = carry[:3]
  out = acc / jnp.where(l > 0, l, 1.0)[:, None]
  out = out.astype(o_ref.dtype)
  if group == 1:
    plgpu.store(o_ref.at[q_rows, kv_head, :], out, mask=token_valid[:, None])
  else:
    plgpu.store(o_ref.at[q_rows, pl.ds(kv_head * group, group), :],
                out.reshape(block_q, group, head_dim), mask=token_valid[:, None, None])


def work_items(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, *, num_tokens: int,
               block_q: int) -> tuple[jax.Array, jax.Array]:
  """Lists the (sequence, query block) work items of a ragged batch, heaviest first.

  Args:
    cu_q_lens: [S + 1] int32 cumulative query lengths.
    kv_lens: [S] int32 KV lengths.
    num_seqs: [1] int32 real sequences.
    num_tokens: T, the number of query rows.
    block_q: query tokens per block.

  Returns:
    work_seq: [W] int32 sequence of each item, -1 for spare items; W = cdiv(T, block_q) + S.
    work_block: [W] int32 query block of each item within its sequence's chunk.
  """
  num_slots = kv_lens.shape[0]
  n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
  real = jnp.arange(num_slots) < n
  q_lens = jnp.where(real, cu_q_lens[1:] - cu_q_lens[:-1], 0)
  blocks = (q_lens + block_q - 1) // block_q  # [S]
  ends = jnp.cumsum(blocks)
  num_items = pl.cdiv(num_tokens, block_q) + num_slots
  item = jnp.arange(num_items, dtype=jnp.int32)
  seq = jnp.minimum(jnp.searchsorted(ends, item, side="right", method="compare_all"), num_slots - 1).astype(jnp.int32)
  valid = item < ends[-1]
  block = item - (ends[seq] - blocks[seq])
  # Cost of an item: keys it visits, up to its last query position; spare items cost -1.
  last_pos = kv_lens[seq] - q_lens[seq] + jnp.minimum((block + 1) * block_q, q_lens[seq])
  cost = jnp.where(valid, last_pos, -1)
  order = jnp.argsort(-cost, stable=True)
  work_seq = jnp.where(valid, seq, -1)[order]
  work_block = block[order].astype(jnp.int32)
  return work_seq, work_block


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "block_q", "block_k", "num_warps", "num_stages",
                     "prefetch_pages", "interpret"))
def _flash_prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale,
                   sliding_window, block_q, block_k, num_warps, num_stages, prefetch_pages, interpret):
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  group = num_heads // num_kv_heads
  work_seq, work_block = work_items(cu_q_lens, kv_lens, num_seqs, num_tokens=num_tokens,
                                    block_q=block_q)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _flash_prefill_kernel, sm_scale=sm_scale, block_q=block_q, block_k=block_k, group=group,
      sliding_window=sliding_window, precision=precision, prefetch_pages=prefetch_pages)
  return pl.pallas_call(
      kernel,
      grid=(work_seq.shape[0], num_kv_heads),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      input_output_aliases={8: 0},
      compiler_params=CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="flash_prefill",
  )(work_seq, work_block, cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32),
    page_table.astype(jnp.int32), q, k_pages, v_pages, jnp.zeros_like(q))


def flash_prefill(
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
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch_pages: bool | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Causal attention of ragged prompt chunks against paged K/V (Pallas, Triton lowering).

  Args:
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale, sliding_window: as in
      `pallas_kernels.reference.ragged_paged_attention`.
    k_scales, v_scales: must be None (quantized pages are not served: NotImplementedError).
    block_q: query tokens per program (a power of two); default from the tuning table.
    block_k: key tokens per inner step (a power of two, >= 16); default from the tuning table.
    num_warps, num_stages: Triton launch parameters; default from the tuning table.
    prefetch_pages: load the next key block's page ids one step ahead (in the loop carry); default
      from the tuning table.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero.

  Raises:
    NotImplementedError: for inputs this kernel does not serve (quantized pages, other dtypes, K/V
      dtype different from q's, a head dim that is not a power of two in [16, 256], H not a multiple
      of K, a group size H / K that is not a power of two).
  """
  if k_scales is not None or v_scales is not None:
    raise NotImplementedError("flash_prefill does not serve quantized pages")
  num_heads, head_dim = q.shape[1:]
  num_kv_heads = k_pages.shape[0]
  if q.dtype not in _SUPPORTED_DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
    raise NotImplementedError(f"flash_prefill needs q, k, v of one dtype among float32, bfloat16, "
                              f"float16; got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
  if not is_power_of_2(head_dim) or not 16 <= head_dim <= 256:
    raise NotImplementedError(f"flash_prefill needs a power-of-two head_dim in [16, 256], got {head_dim}")
  if num_heads % num_kv_heads:
    raise NotImplementedError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
  group = num_heads // num_kv_heads
  if not is_power_of_2(group):
    raise NotImplementedError(f"flash_prefill needs a power-of-two group size (query heads per KV head), "
                              f"got {num_heads} / {num_kv_heads} = {group}")
  card = tuning.Card.OTHER if interpret else tuning.current_card()
  config = tuning.lookup(head_dim, group, q.dtype, card)
  block_q = block_q or config.block_q
  block_k = block_k or config.block_k
  if not (is_power_of_2(block_q) and is_power_of_2(block_k)):
    raise ValueError(f"block_q={block_q} and block_k={block_k} must be powers of two")
  return _flash_prefill(
      q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=float(sm_scale),
      sliding_window=sliding_window, block_q=block_q, block_k=block_k,
      num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
      prefetch_pages=config.prefetch_pages if prefetch_pages is None else prefetch_pages,
      interpret=interpret)
