"""Pure-`jnp` references of the kernels: attention over a paged KV cache, and the fused first half of a layer.

These functions define the semantics every Pallas kernel in this package must reproduce; the kernels
take the same arguments and are tested against them on random inputs. The attention references are also
the attention that pdopt runs on CPU. Letters of shapes and einsums: the legend of `pallas_kernels`
(`pallas_kernels/__init__.py`).

Page layout (shared with `pdopt.cache.kv_cache`): one array per layer for K and one for V,

    k_pages, v_pages: [K, P, page_size, D]   (KV head, page, slot within the page, head dim)

Head-major, so the `page_size * D` values one KV head keeps in a page are contiguous; this is also the
layout of `jax.experimental.pallas.ops.gpu.paged_attention`, which lets benchmarks run both on the same
pages. Quantized caches store int8 or float8 values plus float32 scales, either per (KV head, token)
`[K, P, page_size]` or per KV head `[K]`; the dequantized value is `pages.astype(f32) * scales`.

A ragged batch of S sequences is described by

    q:          [T, H, D]     query tokens of all sequences, flattened; sequence s owns rows
                              cu_q_lens[s]:cu_q_lens[s + 1]
    kv_lens:    [S] int32     KV tokens of each sequence after this step (cached prefix + new tokens)
    page_table: [S, Pmax] int32  page ids of each sequence, in order; entries past the sequence's last
                              page are never read and may hold anything in range
    cu_q_lens:  [S + 1] int32 cumulative query lengths
    num_seqs:   [1] int32     sequences that are real; the rest of the S slots are padding

The i-th query of sequence s sits at absolute position kv_lens[s] - q_len[s] + i and attends causally to
keys 0 ... that position (optionally only the last `sliding_window` of them). Rows of q that belong to no
real sequence produce zeros.

`norm_qkv_rope_write` (the reference of `pallas_kernels.fused_layer`) is what a decoder layer does before
attention: RMSNorm of the residual stream, the q/k/v projection through one merged weight `[E, K, R, D]`
(per KV head its G query heads, its key and its value: R = G + 2), RoPE on q and k, and the write of k and
v into the pages at each token's flat slot `page * page_size + offset`. It computes in float32 and rounds
once, as the kernel does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def dequantize_pages(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
  """Returns float32 pages, applying per-(head, token) `[K, P, page_size]` or per-head `[K]` scales."""
  out = pages.astype(jnp.float32)
  if scales is None:
    return out
  scales = scales.astype(jnp.float32)
  if scales.ndim == 1:
    return out * scales[:, None, None, None]
  return out * scales[..., None]


def token_sequence_ids(cu_q_lens: jax.Array, num_tokens: int, num_seqs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Maps each of `num_tokens` flat query rows to (sequence id, index within that sequence's chunk).

  Returns:
    seq_ids: [T] int32; rows past cu_q_lens[num_seqs] get id -1.
    offsets: [T] int32, row index minus the start of its sequence's rows.
  """
  rows = jnp.arange(num_tokens, dtype=jnp.int32)
  seq_ids = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
  n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
  valid = rows < cu_q_lens[n]
  seq_ids_clamped = jnp.minimum(seq_ids, cu_q_lens.shape[0] - 2)
  offsets = rows - cu_q_lens[seq_ids_clamped]
  return jnp.where(valid, seq_ids_clamped, -1), offsets


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
) -> jax.Array:
  """Causal attention of a ragged batch of query tokens against paged K/V.

  Args:
    q: query rows of all sequences, flattened (see the module docstring).
    k_pages, v_pages: the layer's KV pages, `[K, P, page_size, D]`.
    kv_lens: KV length of each sequence including this step's tokens.
    page_table: page ids of each sequence.
    cu_q_lens: cumulative query lengths, `cu_q_lens[0] == 0`.
    num_seqs: number of real sequences, shape [1].
    sm_scale: softmax scale, usually `D ** -0.5`.
    sliding_window: if set, a query at position p sees keys in (p - sliding_window, p].
    k_scales, v_scales: dequantization scales of quantized pages, or None.
    decode_only: a promise made at trace time that every real sequence has exactly one query row, so
      sequence s's query is row s (`cu_q_lens[s] == s`); kernels then run their decode path alone. The
      result is the same either way (the reference does not use it).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero. Softmax runs in float32.
  """
  del decode_only  # The general computation below covers it.
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_heads // num_kv_heads
  max_len = page_table.shape[1] * page_size

  seq_ids, offsets = token_sequence_ids(cu_q_lens, num_tokens, num_seqs)
  valid_row = seq_ids >= 0
  sid = jnp.maximum(seq_ids, 0)
  q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
  q_pos = kv_lens[sid] - q_lens[sid] + offsets  # [T]

  k = dequantize_pages(k_pages, k_scales)
  v = dequantize_pages(v_pages, v_scales)
  # Gather each row's sequence pages: [K, T, Pmax, page_size, D] -> [K, T, J, D].
  pages = page_table[sid]  # [T, Pmax]
  k_rows = k[:, pages].reshape(num_kv_heads, num_tokens, max_len, head_dim)
  v_rows = v[:, pages].reshape(num_kv_heads, num_tokens, max_len, head_dim)

  key_pos = jnp.arange(max_len, dtype=jnp.int32)
  mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < kv_lens[sid][:, None])
  if sliding_window is not None:
    mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
  mask &= valid_row[:, None]  # [T, J]

  qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
  scores = jnp.einsum("TKGD,KTJD->TKGJ", qg, k_rows, precision=_HIGHEST) * sm_scale
  scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  # Masked keys may be NaN (unused pages); zero them so 0 * NaN cannot leak into the output.
  v_rows = jnp.where(mask[None, :, :, None], v_rows, 0.0)
  out = jnp.einsum("TKGJ,KTJD->TKGD", probs, v_rows, precision=_HIGHEST)
  out = out / jnp.where(denom > 0, denom, 1.0)
  out = jnp.where(valid_row[:, None, None, None], out, 0.0)
  return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def paged_decode_attention(
    q: jax.Array,  # [S, Q, H, D]
    k_pages: jax.Array,  # [K, P, page_size, D]
    v_pages: jax.Array,  # [K, P, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, Pmax] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
  """Decode attention: every sequence has the same number Q >= 1 of new query tokens.

  Q = 1 is plain decoding; Q = k + 1 verifies k speculated tokens. The Q queries of sequence s sit at
  positions kv_lens[s] - Q ... kv_lens[s] - 1. Sequences with kv_lens[s] == 0 are padding and give zeros.

  Returns:
    [S, Q, H, D] in q's dtype.
  """
  num_seqs, q_len, num_heads, head_dim = q.shape
  cu_q_lens = jnp.arange(num_seqs + 1, dtype=jnp.int32) * q_len
  real = jnp.asarray([num_seqs], jnp.int32)
  out = ragged_paged_attention(
      q.reshape(num_seqs * q_len, num_heads, head_dim), k_pages, v_pages,
      jnp.maximum(kv_lens, q_len), page_table, cu_q_lens, real,
      sm_scale=sm_scale, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales)
  out = out.reshape(num_seqs, q_len, num_heads, head_dim)
  return jnp.where((kv_lens > 0)[:, None, None, None], out, 0).astype(q.dtype)


def norm_qkv_rope_write(
    x: jax.Array,  # [T, E]
    norm_weight: jax.Array,  # [E]
    qkv_proj: jax.Array,  # [E, K, R, D], R = G + 2
    qkv_bias: jax.Array | None,  # [K, R, D]
    positions: jax.Array,  # [T] int32
    inv_freq: jax.Array,  # [D / 2] float32
    slot_mapping: jax.Array,  # [T] int32
    cache: tuple[jax.Array, jax.Array],  # (K pages, V pages), each [K, P, page_size, D]
    *,
    eps: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """RMSNorm, the merged q/k/v projection, RoPE and the KV write of T tokens (see the module docstring).

  Args:
    x: the residual stream of T tokens (before the layer's input norm).
    norm_weight: the input RMSNorm's weight; eps its epsilon.
    qkv_proj, qkv_bias: the merged projection (per KV head its G query heads, then k, then v) and its bias,
      or None.
    positions: each token's position (RoPE); inv_freq: RoPE's inverse frequencies, applied to the two halves
      of a head (the half-split convention of HF Llama).
    slot_mapping: flat cache slot `page * page_size + offset` of each token, below P * page_size; a negative
      slot (padding) writes nothing.
    cache: the layer's unquantized K and V pages.

  Returns:
    (q [T, H, D] in x's dtype, rotated; the cache with each token's k and v written at its slot, rounded to
    x's dtype and then to the pages'). Everything before the rounding is float32, matmuls at HIGHEST precision.
  """
  k_pages, v_pages = cache
  num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
  num_tokens = x.shape[0]
  group = qkv_proj.shape[2] - 2
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * norm_weight.astype(jnp.float32)
  qkv = jnp.einsum("TE,EKRD->TKRD", normed, qkv_proj.astype(jnp.float32), precision=_HIGHEST)
  if qkv_bias is not None:
    qkv = qkv + qkv_bias.astype(jnp.float32)
  angle = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]  # [T, D / 2]

  def rope(t):  # [T, ..., D]: the two halves of a head are RoPE pairs
    a = angle.reshape(num_tokens, *(1,) * (t.ndim - 2), -1)
    lo, hi = jnp.split(t, 2, axis=-1)
    return jnp.concatenate([lo * jnp.cos(a) - hi * jnp.sin(a), hi * jnp.cos(a) + lo * jnp.sin(a)], axis=-1)

  q = rope(qkv[:, :, :group]).reshape(num_tokens, num_kv_heads * group, head_dim).astype(x.dtype)
  k, v = rope(qkv[:, :, group]), qkv[:, :, group + 1]  # [T, K, D]
  slots = jnp.where(slot_mapping < 0, num_pages * page_size, slot_mapping)  # padding: past the end, dropped

  def write(pages, new):
    flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    new = jnp.swapaxes(new, 0, 1).astype(x.dtype).astype(pages.dtype)  # [K, T, D]
    return flat.at[:, slots].set(new, mode="drop").reshape(pages.shape)

  return q, (write(k_pages, k), write(v_pages, v))


def norm_gate_up_silu(x: jax.Array, norm_weight: jax.Array, gate_up_proj: jax.Array, *, eps: float) -> jax.Array:
  """silu(gate) * up of RMSNorm(x) for T tokens (`pdopt.models.layers.MLP` before its down projection).

  Args:
    x: [T, E], the residual stream before the norm; norm_weight [E] and eps: the RMSNorm.
    gate_up_proj: [E, 2, F], gate then up.

  Returns:
    [T, F] in x's dtype, computed in float32 (matmul at HIGHEST precision) and rounded once.
  """
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * norm_weight.astype(jnp.float32)
  gate_up = jnp.einsum("TE,ECF->TCF", normed, gate_up_proj.astype(jnp.float32), precision=_HIGHEST)
  return (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]).astype(x.dtype)


def matmul_add(a: jax.Array, w: jax.Array, residual: jax.Array) -> jax.Array:
  """residual + a @ w (a layer's o or down projection with its residual add).

  Args:
    a: [T, K]; w: [K, N]; residual: [T, N].

  Returns:
    [T, N] in the residual's dtype, computed in float32 (matmul at HIGHEST precision) and rounded once.
  """
  out = jnp.dot(a.astype(jnp.float32), w.astype(jnp.float32), precision=_HIGHEST)
  return (residual.astype(jnp.float32) + out).astype(residual.dtype)
