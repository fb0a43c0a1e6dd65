"""RMSNorm, the q/k/v projection, RoPE and the KV write of a decode step in two kernels (Pallas, Triton).

A decode step of a small batch reads every weight once and does little else, so its time is the weights'
bytes plus a launch per kernel. Before attention, XLA runs five kernels per layer at the Llama-3.2-1B shape:
the input RMSNorm, the q/k/v matmul (split-K), then, each adding the matmul's split-K partials, a K scatter
with k's RoPE, a V scatter, and a concatenate with q's RoPE (pallas_kernels/NOTES.md, ## engine).
`norm_qkv_rope_write` does the same in two:

1. A split-K matmul of (x * norm weight) with the merged projection `[E, K * (G + 2) * D]`, grid (row
   block, column block, split), that also sums x^2 over its share of E. The norm then costs nothing
   extra: `norm(x) @ W = diag(1 / rms(x)) ((x * w) @ W)`, and the row scale waits for the epilogue.
2. An epilogue per (row block, head of the merged layout: a query head, a key or a value), that adds the
   splits in a fixed order, scales by 1 / rms, adds the bias, rotates q and k (the two halves of a head
   are RoPE pairs, so a program holding one head has both), and stores q or writes k or v into the pages
   (aliased: updated in place under `jit` with donation, never copied).

Its reference, with the same signature, is `pallas_kernels.reference.norm_qkv_rope_write`, which computes in
float32 throughout; the kernels differ from it by one rounding more, of (x * norm weight) to x's dtype before
the matmul. Rows past the batch are masked, and tokens with a negative cache slot (padding) write nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.sizes import is_power_of_2, power_of_2_divisor
from pallas_kernels.triton_util import MATMUL_DTYPES, MIN_DOT, CompilerParams, dot_rows



@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """Launch parameters of the two kernels.

  Attributes:
    block_k: hidden-size columns of x (rows of W) per loop step of the matmul; a smaller power of two
      dividing E / splits is used where this one does not.
    block_rows: most batch rows per matmul program (a power of two >= 16; fewer rows are padded to 16).
    block_cols: projection columns per matmul program (a smaller power of two dividing the width is used
      where this one does not).
    splits: matmul programs sharing each column block's sum over E (split-K).
    num_warps, num_stages: Triton launch parameters of the matmul.
    epilogue_rows: batch rows per epilogue program.
  """
  block_k: int = 64
  block_rows: int = 64
  block_cols: int = 128
  splits: int = 4
  num_warps: int = 4
  num_stages: int = 4
  epilogue_rows: int = 16


def default_config(num_tokens: int) -> FusedConfig:
  """Measured on an H200 at the Llama-3.2-1B shape (E = 2048, 3072 projection columns; NOTES.md,
  ## engine): one token is fastest with 8 splits and 3 stages, 64 tokens with 4 splits and 4 stages."""
  if num_tokens <= MIN_DOT:
    return FusedConfig(splits=8, num_stages=3)
  return FusedConfig()


# A masked-out row of a store gets an index past the array, never one that another row writes. The GPU
# does not touch masked lanes either way, but the Pallas interpreter implements a masked store as a scatter
# of (mask ? new : old) values, where a duplicate index may put back the old value over a real write, and
# it drops indices past the end.


def _qkv_matmul_kernel(
    x_ref,  # [T, E]
    g_ref,  # [E]: the input norm's weight
    w_ref,  # [E, N]: qkv_proj as [E, K * (G + 2) * D], a free reshape
    part_ref,  # [splits, T', N] float32: this split's (x * g) @ W over its share of E (T' = T padded to rows)
    ss_ref,  # [splits, T'] float32: this split's sum of x^2
    *,
    num_tokens: int,
    rows: int,
    cols: int,
    block_k: int,
    precision,
):
  first_row = pl.program_id(0) * rows
  row = first_row + lax.broadcasted_iota(jnp.int32, (rows,), 0)
  x_mask = jnp.broadcast_to((row < num_tokens)[:, None], (rows, block_k))
  row = jnp.minimum(row, num_tokens - 1)
  split = pl.program_id(2)
  share = x_ref.shape[1] // part_ref.shape[0]
  first = pl.program_id(1) * cols
  kk = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)

  def body(i, carry):
    acc, ss = carry
    start = pl.multiple_of(split * share + i * block_k, block_k)
    x = plgpu.load(x_ref.at[row[:, None], start + kk], mask=x_mask, other=0.0).astype(jnp.float32)  # [rows, bk]
    a = (x * g_ref[pl.ds(start, block_k)].astype(jnp.float32)[None, :]).astype(x_ref.dtype)
    acc += lax.dot_general(a, w_ref[pl.ds(start, block_k), pl.ds(first, cols)], (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
    return acc, ss + jnp.sum(x * x, axis=1)

  acc, ss = lax.fori_loop(0, share // block_k, body, (jnp.zeros((rows, cols), jnp.float32),
                                                      jnp.zeros((rows,), jnp.float32)))
  part_ref[split, pl.ds(first_row, rows), pl.ds(first, cols)] = acc

  @pl.when(first == 0)
  def _():
    ss_ref[split, pl.ds(first_row, rows)] = ss


def _qkv_epilogue_kernel(
    part_ref,  # [splits, T', N] float32
    ss_ref,  # [splits, T'] float32
    b_ref,  # None or [N]: qkv_bias
    pos_ref,  # [T] int32
    freq_ref,  # [D / 2] float32: RoPE inverse frequencies
    slot_ref,  # [T] int32: flat cache slot of each token, negative for padding
    k_in_ref,  # [K * P * page_size, D]: aliased with k_ref
    v_in_ref,  # [K * P * page_size, D]: aliased with v_ref
    q_ref,  # [T, H * D]
    k_ref,  # [K * P * page_size, D]
    v_ref,  # [K * P * page_size, D]
    *,
    group: int,
    head_dim: int,
    hidden: int,
    num_slots: int,
    num_tokens: int,
    rows: int,
    eps: float,
):
  del k_in_ref, v_in_ref  # the same buffers as k_ref and v_ref
  first_row = pl.program_id(0) * rows
  out_row = first_row + lax.broadcasted_iota(jnp.int32, (rows,), 0)
  row_ok = out_row < num_tokens
  row = jnp.minimum(out_row, num_tokens - 1)  # for loads; masked stores go to out_row (see above)
  head = pl.program_id(1)  # kv_head * (G + 2) + part
  kv_head, part = lax.div(head, group + 2), lax.rem(head, group + 2)
  half = head_dim // 2
  lo_col = head * head_dim
  splits = part_ref.shape[0]
  # The splits' partial sums, added in a fixed order (the result does not depend on scheduling).
  lo = sum(part_ref[s, pl.ds(first_row, rows), pl.ds(lo_col, half)] for s in range(splits))
  hi = sum(part_ref[s, pl.ds(first_row, rows), pl.ds(lo_col + half, half)] for s in range(splits))
  ss = sum(ss_ref[s, pl.ds(first_row, rows)] for s in range(splits))
  inv_rms = lax.rsqrt(ss / hidden + eps)[:, None]
  lo, hi = lo * inv_rms, hi * inv_rms
  cols = lax.broadcasted_iota(jnp.int32, (1, half), 1)
  if b_ref is not None:
    lo = lo + plgpu.load(b_ref.at[lo_col + cols]).astype(jnp.float32)
    hi = hi + plgpu.load(b_ref.at[lo_col + half + cols]).astype(jnp.float32)
  angle = plgpu.load(pos_ref.at[row]).astype(jnp.float32)[:, None] * plgpu.load(freq_ref.at[cols])
  is_v = part == group + 1  # values are not rotated
  cos = jnp.where(is_v, 1.0, jnp.cos(angle))
  sin = jnp.where(is_v, 0.0, jnp.sin(angle))
  lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
  lo, hi = lo.astype(q_ref.dtype), hi.astype(q_ref.dtype)
  mask = jnp.broadcast_to(row_ok[:, None], (rows, half))

  @pl.when(part < group)
  def _():
    q_col = (kv_head * group + part) * head_dim + cols
    plgpu.store(q_ref.at[out_row[:, None], q_col], lo, mask=mask)
    plgpu.store(q_ref.at[out_row[:, None], q_col + half], hi, mask=mask)

  slot = plgpu.load(slot_ref.at[row])
  writes = row_ok & (slot >= 0)
  # Rows that write nothing point past the pages (see above).
  page_row = jnp.where(writes, kv_head * num_slots + slot, k_ref.shape[0] + out_row)[:, None]
  kv_mask = jnp.broadcast_to(writes[:, None], (rows, half))
  for index, ref in ((group, k_ref), (group + 1, v_ref)):
    @pl.when(part == index)
    def _(ref=ref):
      plgpu.store(ref.at[page_row, cols], lo.astype(ref.dtype), mask=kv_mask)
      plgpu.store(ref.at[page_row, half + cols], hi.astype(ref.dtype), mask=kv_mask)


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def norm_qkv_rope_write(
    x: jax.Array,  # [T, E]
    norm_weight: jax.Array,  # [E]
    qkv_proj: jax.Array,  # [E, K, G + 2, D]
    qkv_bias: jax.Array | None,  # [K, G + 2, D]
    positions: jax.Array,  # [T] int32
    inv_freq: jax.Array,  # [D / 2] float32
    slot_mapping: jax.Array,  # [T] int32
    cache: tuple[jax.Array, ...],  # (K pages, V pages), each [K, P, page_size, D]
    *,
    eps: float,
    config: FusedConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """q of a decode batch, with its k and v written into the cache; see `reference.norm_qkv_rope_write`.

  Two kernels: a split-K matmul of (x * norm weight) with the merged projection that also sums x^2, and an
  epilogue per (row block, head) that adds the splits, scales by 1 / rms, adds the bias, rotates q and k,
  and stores q or writes k or v into the pages.

  Args:
    x: the residual stream of T tokens (before the layer's input norm).
    norm_weight: the input RMSNorm's weight; eps its epsilon.
    qkv_proj, qkv_bias: the merged projection (per KV head its G query heads, then k, then v) and bias.
    positions: each token's position (RoPE); inv_freq: RoPE's inverse frequencies.
    slot_mapping: flat cache slot `page * page_size + offset` of each token, below P * page_size; negative
      writes nothing.
    cache: the layer's unquantized pages, updated in place under `jit` with donation.
    config: launch parameters; default `default_config(T)`.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    (q [T, H, D] in x's dtype, rotated; the cache with k and v written).

  Raises:
    NotImplementedError: quantized pages, dtypes other than float32/bfloat16/float16 (the same for x and the
      weights), or sizes without power-of-two blocks (head_dim / 2, row blocks, and blocks of at least 16
      dividing the projection's width and E / splits).
  """
  if len(cache) != 2:
    raise NotImplementedError("norm_qkv_rope_write serves unquantized caches only")
  k_pages, v_pages = cache
  hidden, num_kv_heads, parts, head_dim = qkv_proj.shape
  config = config or default_config(x.shape[0])
  if x.ndim != 2 or x.dtype not in MATMUL_DTYPES or {norm_weight.dtype, qkv_proj.dtype} != {x.dtype}:
    raise NotImplementedError(f"x must be [T, E] float32/bfloat16/float16 like the weights, got x {x.shape} "
                              f"{x.dtype}, norm weight {norm_weight.dtype}, qkv_proj {qkv_proj.dtype}")
  if not (is_power_of_2(config.block_rows) and is_power_of_2(config.epilogue_rows)):
    raise NotImplementedError(f"block_rows={config.block_rows} and epilogue_rows={config.epilogue_rows} must be "
                              "powers of two")
  if norm_weight.shape != (x.shape[1],) or hidden != x.shape[1]:
    raise NotImplementedError(f"hidden sizes differ: x {x.shape}, norm weight {norm_weight.shape}, "
                              f"qkv_proj {qkv_proj.shape}")
  group = parts - 2
  num_tokens = x.shape[0]
  width = num_kv_heads * parts * head_dim
  half = head_dim // 2
  cols = power_of_2_divisor(width, config.block_cols)
  splits = config.splits
  if (half < MIN_DOT or not is_power_of_2(half) or cols < MIN_DOT or k_pages.shape[0] != num_kv_heads
      or k_pages.shape[-1] != head_dim or v_pages.shape != k_pages.shape or k_pages.dtype != v_pages.dtype):
    raise NotImplementedError(f"unsupported shapes: qkv_proj {qkv_proj.shape}, pages {k_pages.shape} "
                              f"{v_pages.shape}")
  block_k = power_of_2_divisor(hidden // splits, config.block_k) if hidden % splits == 0 else 0
  if block_k < MIN_DOT:
    raise NotImplementedError(f"hidden size {hidden} in {splits} splits has no power-of-two block of >= {MIN_DOT}")
  _, num_pages, page_size, _ = k_pages.shape
  num_slots = num_pages * page_size
  rows = dot_rows(num_tokens, config.block_rows)
  row_blocks = pl.cdiv(num_tokens, rows)
  epilogue_rows = min(rows, dot_rows(num_tokens, config.epilogue_rows))  # divides rows: both powers of two
  part, ss = pl.pallas_call(
      functools.partial(_qkv_matmul_kernel, num_tokens=num_tokens, rows=rows, cols=cols, block_k=block_k,
                        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None),
      grid=(row_blocks, width // cols, splits),
      out_shape=[jax.ShapeDtypeStruct((splits, row_blocks * rows, width), jnp.float32),
                 jax.ShapeDtypeStruct((splits, row_blocks * rows), jnp.float32)],
      compiler_params=CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name=f"norm_qkv_matmul_s{splits}",
  )(x, norm_weight, qkv_proj.reshape(hidden, width))
  k_flat = k_pages.reshape(num_kv_heads * num_slots, head_dim)  # free reshapes of contiguous arrays
  v_flat = v_pages.reshape(num_kv_heads * num_slots, head_dim)
  args = [part, ss, None if qkv_bias is None else qkv_bias.reshape(-1), positions.astype(jnp.int32),
          inv_freq.astype(jnp.float32), slot_mapping.astype(jnp.int32), k_flat, v_flat]
  num_inputs = len(jax.tree_util.tree_leaves(args))
  q, k_flat, v_flat = pl.pallas_call(
      functools.partial(_qkv_epilogue_kernel, group=group, head_dim=head_dim, hidden=hidden, num_slots=num_slots,
                        num_tokens=num_tokens, rows=epilogue_rows, eps=eps),
      grid=(pl.cdiv(num_tokens, epilogue_rows), num_kv_heads * parts),
      out_shape=[jax.ShapeDtypeStruct((num_tokens, num_kv_heads * group * head_dim), x.dtype),
                 jax.ShapeDtypeStruct(k_flat.shape, k_flat.dtype), jax.ShapeDtypeStruct(v_flat.shape, v_flat.dtype)],
      input_output_aliases={num_inputs - 2: 1, num_inputs - 1: 2},
      compiler_params=CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name=f"qkv_rope_write_g{group}_d{head_dim}",
  )(*args)
  return q.reshape(num_tokens, -1, head_dim), (k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape))
