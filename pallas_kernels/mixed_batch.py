"""Attention for a mixed ragged batch on GPU: decode tokens to the split-K decode kernel, prompt chunks
to the flash prefill kernel, in one call and without copying the cache.

A serving step mixes sequences with one new token (decodes) and sequences with many (prompt chunks,
possibly behind a cached prefix). The two kinds want different kernels: a decode is memory-bound and
needs its KV history split across programs to fill the chip, a chunk is compute-bound and needs large
query blocks. Which sequence is which is only known on the device, so both kernels run over the whole
batch, each with the other kind's sequences masked out through `kv_lens`:

- `paged_decode` sees every sequence slot with one query (the first row of the sequence's chunk) and
  kv_len 0 for the slots that are not decodes, so their programs exit at once;
- `flash_prefill` sees the batch with kv_len 0 for the decodes: their one query row sees no key, their
  work item costs nothing and sorts last.

The decode rows of the result come from the first, the rest from the second. A caller that knows, when it
traces, that every sequence decodes one token (`decode_only`: the engine's steady decoding steps) skips the
prefill kernel and the row selection: `ragged_decode` reads sequence s's query from row s and writes its
output there. Both read the cache in place
through the page table (the layout of `pallas_kernels.reference`). A kernel that cannot serve the inputs
(`NotImplementedError`: a sliding window for the decode kernel, quantized pages for the prefill kernel)
hands its part to the other or, for prompt chunks, to the `jnp` reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.flash_prefill import flash_prefill
from pallas_kernels.paged_decode import paged_decode, ragged_decode


def single_query_mask(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
  """[S] bool: the real sequences with exactly one query row this step, which the decode kernel serves (a
  decode, or a prompt's last token alone: attention cannot tell them apart, and need not)."""
  num_slots = cu_q_lens.shape[0] - 1
  real = jnp.arange(num_slots) < jnp.reshape(num_seqs, ()).astype(jnp.int32)
  return real & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)


def mixed_batch_attention(
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
    decode_only: bool = False,
    interpret: bool = False,
) -> jax.Array:
  """`reference.ragged_paged_attention`, served by the decode and prefill kernels.

  Args:
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale, sliding_window, k_scales,
      v_scales, decode_only: as in `pallas_kernels.reference.ragged_paged_attention`.
    interpret: run both kernels in the Pallas interpreter (CPU tests).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero.

  Raises:
    NotImplementedError: when neither kernel serves the decodes (the caller falls back to the reference).
  """
  num_tokens = q.shape[0]
  kv_lens = kv_lens.astype(jnp.int32)
  cu_q_lens = cu_q_lens.astype(jnp.int32)
  single = single_query_mask(cu_q_lens, num_seqs)  # [S]
  common = dict(sm_scale=sm_scale, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales)
  if decode_only:  # Sequence s's one query is row s; slots past num_seqs are padding.
    real = jnp.arange(kv_lens.shape[0]) < jnp.reshape(num_seqs, ()).astype(jnp.int32)
    try:
      return ragged_decode(q, k_pages, v_pages, jnp.where(real, kv_lens, 0), page_table, interpret=interpret,
                           **common)
    except NotImplementedError:
      pass  # e.g. a sliding window: the general path below hands the decodes to the prefill kernel.
  try:
    first_rows = jnp.minimum(cu_q_lens[:-1], num_tokens - 1)  # [S] each sequence's first query row
    decoded = paged_decode(q[first_rows][:, None], k_pages, v_pages, jnp.where(single, kv_lens, 0),
                           page_table, interpret=interpret, **common)[:, 0]  # [S, H, D]
  except NotImplementedError:
    decoded = None
  chunk_lens = kv_lens if decoded is None else jnp.where(single, 0, kv_lens)
  args = (q, k_pages, v_pages, chunk_lens, page_table, cu_q_lens, num_seqs)
  try:
    out = flash_prefill(*args, interpret=interpret, **common)
  except NotImplementedError:
    if decoded is None:
      raise
    out = reference.ragged_paged_attention(*args, **common)
  if decoded is None:
    return out
  seq_ids, _ = reference.token_sequence_ids(cu_q_lens, num_tokens, num_seqs)  # [T], -1 for padding
  row_single = (seq_ids >= 0) & single[jnp.maximum(seq_ids, 0)]
  return jnp.where(row_single[:, None, None], decoded[jnp.maximum(seq_ids, 0)], out)
