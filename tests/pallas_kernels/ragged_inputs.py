"""Random ragged-batch inputs for the attention kernel tests, NaN-poisoned wherever nothing may be read."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  """One ragged batch: per real sequence its new query tokens and cached prefix."""

  q_lens: tuple[int, ...]
  prefixes: tuple[int, ...]
  num_kv_heads: int = 2
  group: int = 1
  head_dim: int = 16
  page_size: int = 4
  pad_seqs: int = 1  # sequence slots past num_seqs
  pad_tokens: int = 3  # query rows past the last real sequence
  spare_pages: int = 3  # pages no sequence owns


def make_inputs(case: Case, dtype, seed: int):
  """Returns the reference's positional arguments for `case`, NaN-poisoned where nothing may be read."""
  rng = np.random.default_rng(seed)
  num_real = len(case.q_lens)
  num_slots = num_real + case.pad_seqs
  kv_lens = [q + p for q, p in zip(case.q_lens, case.prefixes)]
  pages_per_seq = [-(-n // case.page_size) for n in kv_lens]
  max_pages = max(pages_per_seq) + 1  # one spare column, poisoned through the page table
  num_pages = sum(pages_per_seq) + case.spare_pages
  kv_shape = (case.num_kv_heads, num_pages, case.page_size, case.head_dim)
  k_pages = rng.standard_normal(kv_shape).astype(np.float32)
  v_pages = rng.standard_normal(kv_shape).astype(np.float32)
  owned = np.zeros((num_pages, case.page_size), bool)
  perm = rng.permutation(num_pages)  # shuffled pages
  page_table = np.zeros((num_slots, max_pages), np.int32)
  spare = perm[sum(pages_per_seq):]
  start = 0
  for s, (n_pages, kv_len) in enumerate(zip(pages_per_seq, kv_lens)):
    mine = perm[start:start + n_pages]
    start += n_pages
    page_table[s, :n_pages] = mine
    page_table[s, n_pages:] = rng.choice(spare, max_pages - n_pages)  # in range, never read
    for i in range(kv_len):
      owned[mine[i // case.page_size], i % case.page_size] = True
  page_table[num_real:] = rng.choice(spare, (case.pad_seqs, max_pages))
  k_pages[:, ~owned] = np.nan
  v_pages[:, ~owned] = np.nan

  num_heads = case.num_kv_heads * case.group
  real_tokens = sum(case.q_lens)
  num_tokens = real_tokens + case.pad_tokens
  q = rng.standard_normal((num_tokens, num_heads, case.head_dim)).astype(np.float32)
  q[real_tokens:] = np.nan
  cu_q_lens = np.concatenate([[0], np.cumsum(case.q_lens), np.full(case.pad_seqs, real_tokens)])
  kv_lens_arr = np.concatenate([kv_lens, rng.integers(1, 50, case.pad_seqs)])  # padding slots: junk
  return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
          jnp.asarray(kv_lens_arr, jnp.int32), jnp.asarray(page_table), jnp.asarray(cu_q_lens, jnp.int32),
          jnp.asarray([num_real], jnp.int32))
