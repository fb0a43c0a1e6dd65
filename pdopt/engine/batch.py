"""Packing a step's scheduled chunks into flat, padded arrays (host side, numpy).

Shapes are padded to a small fixed set of buckets (tokens T, sequences S, pages per sequence P) so the
step compiles once per bucket, never per request.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Sequence

import numpy as np


def geometric_buckets(smallest: int, largest: int, factor: int = 4) -> tuple[int, ...]:
  """smallest, smallest*factor, ... capped by and always including `largest`."""
  out, b = [], max(1, min(smallest, largest))
  while b < largest:
    out.append(b)
    b *= factor
  out.append(largest)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded sizes; a batch takes the smallest bucket that holds it in each dimension."""
  tokens: tuple[int, ...]
  seqs: tuple[int, ...]
  pages: tuple[int, ...]

  @staticmethod
  def _pick(sizes: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
      raise ValueError(f"{what}={n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]

  def pick(self, num_tokens: int, num_seqs: int, max_pages: int) -> tuple[int, int, int]:
    return (self._pick(self.tokens, num_tokens, "tokens"), self._pick(self.seqs, num_seqs, "sequences"),
            self._pick(self.pages, max_pages, "pages per sequence"))

  def all_shapes(self) -> list[tuple[int, int, int]]:
    """Every (T, S, P) combination `pick` can return: a sequence bucket is reachable with token bucket T
    when its smallest sequence count (one more than the bucket below it) fits in T tokens."""
    lower = dict(zip(self.seqs, (0,) + self.seqs[:-1]))
    return [(t, s, p) for t in self.tokens for s in self.seqs for p in self.pages if lower[s] + 1 <= t]

  def decode_shapes(self, max_seqs: int) -> list[tuple[int, int, int]]:
    """Every (T, S, P) `pick` returns for a batch of n one-token sequences, n = 1 ... max_seqs."""
    pairs = {(self._pick(self.tokens, n, "tokens"), self._pick(self.seqs, n, "sequences"))
             for n in range(1, min(max_seqs, self.tokens[-1], self.seqs[-1]) + 1)}
    return [(t, s, p) for t, s in sorted(pairs) for p in self.pages]


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  """One sequence's part of a step: tokens [start, start + len(token_ids)) of its sequence."""
  token_ids: Sequence[int]
  start: int
  page_table: Sequence[int]
  temperature: float
  top_k: int
  top_p: float
  seed: int
  token_index: int  # Index of the token this chunk would sample (number generated so far).


def pack(chunks: Sequence[ChunkSpec], page_size: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """Flat arrays for `Transformer.__call__`'s metadata and the sampler, padded to `shape` = (T, S, P).

  Padding tokens get slot -1 (nothing written) and belong to no sequence; padding sequences have no
  queries and kv_len 0.
  """
  t_pad, s_pad, p_pad = shape
  token_ids = np.zeros(t_pad, np.int32)
  positions = np.zeros(t_pad, np.int32)
  slots = np.full(t_pad, -1, np.int32)
  cu_q_lens = np.zeros(s_pad + 1, np.int32)
  kv_lens = np.zeros(s_pad, np.int32)
  page_table = np.zeros((s_pad, p_pad), np.int32)
  logits_indices = np.zeros(s_pad, np.int32)
  temperature = np.zeros(s_pad, np.float32)
  top_k = np.zeros(s_pad, np.int32)
  top_p = np.ones(s_pad, np.float32)
  seeds = np.zeros(s_pad, np.uint32)
  token_index = np.zeros(s_pad, np.int32)
  s = len(chunks)
  if s:
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, count=s)
    t = int(q_lens.sum())
    seq = np.repeat(np.arange(s), q_lens)  # [t] sequence of each token
    ends = np.cumsum(q_lens)
    starts = np.fromiter((c.start for c in chunks), np.int32, count=s)
    token_ids[:t] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32, count=t)
    positions[:t] = starts[seq] + np.arange(t) - (ends - q_lens)[seq]
    # Ragged page tables into the padded [S, P] table in one scatter.
    n_pages = np.fromiter((len(c.page_table) for c in chunks), np.int64, count=s)
    rows = np.repeat(np.arange(s), n_pages)
    cols = np.arange(rows.size) - np.repeat(np.cumsum(n_pages) - n_pages, n_pages)
    page_table[rows, cols] = np.fromiter(itertools.chain.from_iterable(c.page_table for c in chunks), np.int32,
                                         count=rows.size)
    slots[:t] = page_table[seq, positions[:t] // page_size] * page_size + positions[:t] % page_size
    kv_lens[:s] = starts + q_lens
    cu_q_lens[1:s + 1] = ends
    cu_q_lens[s + 1:] = t
    logits_indices[:s] = ends - 1
    temperature[:s] = [c.temperature for c in chunks]
    top_k[:s] = [c.top_k for c in chunks]
    top_p[:s] = [c.top_p for c in chunks]
    seeds[:s] = [c.seed for c in chunks]
    token_index[:s] = [c.token_index for c in chunks]
  return dict(token_ids=token_ids, positions=positions, slot_mapping=slots, cu_q_lens=cu_q_lens, kv_lens=kv_lens,
              page_table=page_table, num_seqs=np.asarray([s], np.int32), logits_indices=logits_indices,
              temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, token_index=token_index)
