"""What the two paged decode kernels share: the checks of their inputs, the splits, the merge of the splits.

Both kernels (`pallas_triton`, `pallas_mgpu`) run one program per (sequence, KV head, split); a split walks
its share of the sequence's key blocks (`split_range`), the number of splits is chosen to fill the chip
(`choose_num_splits`), and every split writes float32 partials (acc, m, l) that `combine_splits` merges in
jnp. `check_inputs` holds the checks that run before either kernel is chosen (`paged_decode/__init__`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sizes import is_power_of_2

_MAX_ROWS = 128  # Q * G beyond this would spill registers; served by the reference instead
_PAGE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8,
                                            jnp.float8_e4m3fn))


def check_inputs(q_flat: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                 page_table: jax.Array, *, q_len: int, sliding_window: int | None) -> None:
  """Raises NotImplementedError, naming the input, for inputs that neither kernel is asked to serve.

  Args:
    q_flat: [S' >= S, Q * H, D] queries, sequence s's in row s (token-major).
    k_pages, v_pages: [K, P, page_size, D].
    kv_lens: [S] int32; page_table: [S, Pmax] int32.
    q_len: Q, query tokens per sequence.
    sliding_window: must be None.
  """
  num_kv_heads, _, page_size, head_dim_k = k_pages.shape
  num_heads = q_flat.shape[1] // q_len
  head_dim = q_flat.shape[2]
  num_seqs = kv_lens.shape[0]
  if sliding_window is not None:
    raise NotImplementedError("paged_decode does not implement sliding_window")
  if (v_pages.shape != k_pages.shape or head_dim_k != head_dim or num_heads % num_kv_heads
      or page_table.shape[0] != num_seqs or q_flat.shape[0] < num_seqs):
    raise NotImplementedError(f"unsupported shapes q={q_flat.shape} (Q={q_len}) k_pages={k_pages.shape} "
                              f"v_pages={v_pages.shape} kv_lens={kv_lens.shape} page_table={page_table.shape}")
  if head_dim < 16 or not is_power_of_2(head_dim) or not is_power_of_2(page_size):
    raise NotImplementedError(f"head_dim={head_dim} and page_size={page_size} must be powers of 2, "
                              "head_dim >= 16")
  rows = q_len * (num_heads // num_kv_heads)
  if rows > _MAX_ROWS:
    raise NotImplementedError(f"Q * G = {rows} query rows per KV head exceed {_MAX_ROWS}")
  if q_flat.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"q dtype {q_flat.dtype}")
  if k_pages.dtype not in _PAGE_DTYPES or v_pages.dtype not in _PAGE_DTYPES:
    raise NotImplementedError(f"page dtypes {k_pages.dtype}, {v_pages.dtype}")


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


def split_range(kv_len, q_len: int, split, num_splits: int, block_kv: int):
  """(first block, number of blocks) of `split` over a sequence of kv_len keys (0: a padding sequence).
  Both kernels split a sequence this way; works on scalars and arrays (non-negative ints, `lax.div`)."""
  length = jnp.where(kv_len > 0, jnp.maximum(kv_len, q_len), 0)
  num_blocks = lax.div(length + block_kv - 1, block_kv)
  per = lax.div(num_blocks + num_splits - 1, num_splits)
  first = split * per
  return first, jnp.clip(num_blocks - first, 0, per)


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
