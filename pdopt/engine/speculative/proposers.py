"""Where speculative guesses come from: prompt lookup (`NgramProposer`) or a small draft model with its own
paged KV cache (`DraftModelProposer`)."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import jax
import numpy as np

from pdopt.cache.block_manager import BlockManager
from pdopt.engine import batch as batch_lib
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import Buckets, ChunkSpec, DraftInputs
from pdopt.engine.request import Request
from pdopt.engine.runner import ModelRunner
from pdopt.engine.speculative.programs import draft_program
from pdopt.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Proposals:
  """Guesses for the sequences of a step.

  Attributes:
    counts: guesses per sequence (known on the host before the guesses themselves).
    token_ids: the guesses per sequence on the host (n-gram lookup), or None when they stay on the device.
    device: the draft pass's outputs on the device (`programs.draft_program`: guess tokens [S', k] and, when
      some request samples, their distributions [S', k, V]), or None; sequence i's guesses are row `rows[i]`.
    rows: per sequence, its row in `device` (-1: none).
  """
  counts: tuple[int, ...]
  token_ids: tuple[tuple[int, ...], ...] | None = None
  device: tuple[jax.Array, jax.Array | None] | None = None
  rows: tuple[int, ...] = ()


class Proposer(Protocol):
  """Guesses continuations of running sequences. `propose` gets the step's requests (prompt plus generated
  tokens in `all_token_ids`) and the most guesses each may get (0: none)."""

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    ...

  def rollback(self, request_id: str, num_tokens: int) -> None:
    """Only the first `num_tokens` tokens of the request are known to be right; forget the rest."""

  def free(self, request_id: str) -> None:
    """The request ended or was preempted."""

  def check_no_leaks(self, idle: bool) -> None:
    """Raises if the proposer's own state is inconsistent (or, when `idle`, not empty)."""

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    """The programs `propose` will run for these (T, S, P) buckets, for the engine's warm-up to compile."""


class NgramProposer:
  """Prompt lookup: continue the sequence the way it continued after the most recent earlier occurrence of
  its longest matching suffix n-gram (sizes `max_n` down to `min_n`)."""

  def __init__(self, min_n: int, max_n: int):
    self.min_n, self.max_n = min_n, max_n

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    guesses = tuple(tuple(self.lookup(r.all_token_ids, d)) if d > 0 else () for r, d in zip(requests, max_drafts))
    return Proposals(counts=tuple(len(g) for g in guesses), token_ids=guesses)

  def lookup(self, token_ids: Sequence[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    ids = np.asarray(token_ids, np.int64)
    for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
      windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # Starts before the suffix itself.
      hits = np.flatnonzero(np.all(windows == ids[-n:], axis=1))
      if hits.size:
        start = int(hits[-1]) + n
        return ids[start:start + k].tolist()
    return []

  def rollback(self, request_id: str, num_tokens: int) -> None:
    pass

  def free(self, request_id: str) -> None:
    pass

  def check_no_leaks(self, idle: bool) -> None:
    pass

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    return []


class DraftModelProposer:
  """A small draft model with its own paged KV cache.

  `self.computed[request_id]` tokens of each sequence (real tokens, then the guesses of the current step)
  have K/V in the draft's pages. One pass (`programs.draft_program`, one device program) runs every speculating
  sequence's missing tokens and all of its guesses; its outputs stay on the device and feed the target's
  verification directly, so the host never waits for the draft. Only when the missing tokens exceed one
  pass (a request's first decode after a long prompt) do catch-up passes run first (their outputs unused).
  """

  def __init__(self, model: Transformer, num_pages: int, page_size: int, buckets: Buckets, max_tokens: int,
               num_speculative_tokens: int, attention_backend: str = "auto"):
    """Args:
      model: the draft model (same vocabulary as the target).
      num_pages, page_size: its KV pool.
      buckets: shape buckets of its passes (the engine's).
      max_tokens: tokens per pass.
      num_speculative_tokens: k, the most guesses per sequence (one pass computes them all).
      attention_backend: see `pallas_kernels.api`.
    """
    self.block_manager = BlockManager(num_pages, page_size, enable_prefix_caching=False)
    self.runner = ModelRunner(model, num_pages, page_size, attention_backend)
    self.buckets = buckets
    self.page_size = page_size
    self.max_tokens = max_tokens
    self.max_seqs = buckets.seqs[-1]
    self.k = num_speculative_tokens
    self.computed: dict[str, int] = {}

  def _pass(self, requests, parts, num_slots: int, sampled: bool):
    """Dispatches one draft pass over `parts` = (request index, start, num tokens, guesses)."""
    chunks, steps = [], []
    for i, start, n, want in parts:
      req = requests[i]
      chunks.append(ChunkSpec(token_ids=req.all_token_ids[start:start + n], start=start,
                              page_table=self.block_manager.page_table(req.request_id),
                              temperature=float(req.sampling.temperature), top_k=req.sampling.top_k,
                              top_p=float(req.sampling.top_p), seed=req.seed, token_index=req.num_generated))
      steps.append(want)
      self.computed[req.request_id] = start + n + max(want - 1, 0)
    num_tokens = sum(len(c.token_ids) for c in chunks)
    # The pass takes the target step's sequence bucket, so its outputs index like the verification's.
    shape = self.buckets.pick(max(num_tokens, num_slots), max(len(chunks), num_slots),
                              max(len(c.page_table) for c in chunks))
    draft_steps = np.zeros(shape[1], np.int32)
    draft_steps[:len(steps)] = steps
    batch = batch_lib.build(chunks, self.page_size, shape).replace(draft=DraftInputs(draft_steps))
    return self.runner.call(draft_program(self.k, sampled), batch, fetch=False)

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    counts = [0] * len(requests)
    todo = []  # (request index, tokens the draft has, guesses)
    for i, d in enumerate(max_drafts):
      if d <= 0:
        continue
      req = requests[i]
      want, end = d, req.num_tokens
      # Guess j > 0 writes guess j - 1's K/V: pages for end + want - 1 tokens.
      while want > 1 and not self.block_manager.allocate(req.request_id, end + want - 1):
        want -= 1
      if want == 1 and not self.block_manager.allocate(req.request_id, end):
        continue  # The draft pool is full: no guesses for this sequence this step.
      todo.append((i, self.computed.get(req.request_id, 0), want))
      counts[i] = want
    if not todo:
      return Proposals(counts=tuple(counts))
    # As the verification: its sampled program needs the draft's q.
    sampled = any(r.sampling.temperature > 0 for r in requests)
    num_slots = len(requests)
    if sum(requests[i].num_tokens - start for i, start, _ in todo) > self.max_tokens:
      # Catch up on all but each sequence's last token first, in as many passes as the budget needs.
      parts, budget = [], self.max_tokens
      for i, start, _ in todo:
        left = requests[i].num_tokens - 1 - start
        while left > 0:
          if budget == 0 or len(parts) == self.max_seqs:
            self._pass(requests, parts, 1, sampled)
            parts, budget = [], self.max_tokens
          n = min(left, budget)
          parts.append((i, start, n, 0))
          start, left, budget = start + n, left - n, budget - n
      if parts:
        self._pass(requests, parts, 1, sampled)
      todo = [(i, requests[i].num_tokens - 1, want) for i, _, want in todo]
    out = self._pass(requests, [(i, start, requests[i].num_tokens - start, want) for i, start, want in todo],
                     num_slots, sampled)
    rows = [-1] * len(requests)
    for r, (i, _, _) in enumerate(todo):
      rows[i] = r
    return Proposals(counts=tuple(counts), device=out, rows=tuple(rows))

  def rollback(self, request_id: str, num_tokens: int) -> None:
    if request_id in self.computed and self.computed[request_id] > num_tokens:
      self.computed[request_id] = num_tokens
      self.block_manager.truncate(request_id, num_tokens)

  def free(self, request_id: str) -> None:
    self.computed.pop(request_id, None)
    self.block_manager.free(request_id)

  def check_no_leaks(self, idle: bool) -> None:
    self.block_manager.check_invariants()
    for rid, n in self.computed.items():
      if n > len(self.block_manager.page_table(rid)) * self.page_size:
        raise AssertionError(f"draft of {rid!r} claims {n} computed tokens beyond its pages")
    if idle:
      if self.computed:
        raise AssertionError(f"draft state of ended requests left: {sorted(self.computed)[:10]}")
      self.block_manager.assert_no_leaks()

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    calls = []
    for shape in shapes:
      batch = batch_lib.build([], self.page_size, shape).replace(draft=DraftInputs(np.zeros(shape[1], np.int32)))
      calls += [runner_lib.WarmupCall(self.runner, batch, program=draft_program(self.k, sampled))
                for sampled in (False, True)]
    return calls
