"""`SpeculativeExecutor`: the engine's executor with speculative decoding (see `pdopt.engine.speculative`).

Each plan runs as one target forward pass; its decodes are widened to 1 + d tokens (d <= k guesses from
the proposer) where the plan's unused token budget, the free pages and the request's remaining
`max_tokens` allow, and verified in that pass. The pages of rejected positions go back to the pool
(`BlockManager.truncate`; their K/V in the target cache is simply overwritten later), and the proposer
rolls back to the accepted prefix. A plan without guesses runs the ordinary step program.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from pdopt.cache.block_manager import BlockManager
from pdopt.engine import batch as batch_lib
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import Buckets, VerifyInputs
from pdopt.engine.device_executor import DeviceExecutor, samples
from pdopt.engine.executor import StepOutcome, StepPlan, WorkResult
from pdopt.engine.runner import ModelRunner
from pdopt.engine.speculative.config import SpecStats, SpeculativeConfig, SpeculativeMethod
from pdopt.engine.speculative.programs import draft_program, verify_program
from pdopt.engine.speculative.proposers import DraftModelProposer, NgramProposer, Proposals, Proposer
from pdopt.models.transformer import Transformer


class SpeculativeExecutor(DeviceExecutor):
  """Proposes, verifies and rolls back; counts `SpecStats` (`spec_stats`).

  Args:
    runner, block_manager, buckets, max_num_seqs: as for `DeviceExecutor`.
    config: the speculative settings.
    draft: the draft model, required for method "draft" and refused otherwise.
    max_num_batched_tokens: the step's token budget (the draft's passes use it too).
    max_model_len: longest sequence (tokens); the draft's context must hold it.

  Raises:
    ValueError: a missing, superfluous or incompatible draft model, named.
  """

  def __init__(self, runner: ModelRunner, block_manager: BlockManager, buckets: Buckets, max_num_seqs: int, *,
               config: SpeculativeConfig, draft: Transformer | None, max_num_batched_tokens: int,
               max_model_len: int):
    super().__init__(runner, block_manager, buckets, max_num_seqs)
    self.config = config
    self.k = config.num_speculative_tokens
    self.spec_stats = SpecStats()
    match config.method:
      case SpeculativeMethod.DRAFT:
        if draft is None:
          raise ValueError("EngineConfig.speculative.method='draft' needs a draft model: "
                           "pdopt.Engine(model, config, draft_model=...)")
        if draft.config.vocab_size != runner.config.vocab_size:
          raise ValueError(f"draft_model vocab_size {draft.config.vocab_size} differs from the target's "
                           f"{runner.config.vocab_size}")
        if draft.config.max_position_embeddings < max_model_len:
          raise ValueError(f"draft_model context {draft.config.max_position_embeddings} is shorter than "
                           f"max_model_len {max_model_len}")
        self.proposer: Proposer = DraftModelProposer(draft, block_manager.num_pages, self.page_size, buckets,
                                                     max_num_batched_tokens, self.k, runner.attention_backend)
      case SpeculativeMethod.NGRAM:
        if draft is not None:
          raise ValueError("draft_model is only used by EngineConfig.speculative.method='draft', got "
                           f"method={config.method.value!r}")
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)

  @property
  def num_lookahead_tokens(self) -> int:
    return self.k

  def _count(self, **increments: float) -> None:
    self.spec_stats = dataclasses.replace(
        self.spec_stats, **{k: getattr(self.spec_stats, k) + v for k, v in increments.items()})

  def execute(self, plan: StepPlan) -> StepOutcome:
    bm = self.block_manager
    budget = plan.token_budget_left
    max_drafts = []
    for w in plan.work:
      d = 0
      if w.is_decode:
        req = w.request
        d = min(self.k, req.sampling.max_tokens - req.num_generated - 1, budget)
        while d > 0 and not bm.allocate(req.request_id, w.start + 1 + d):
          d -= 1
        budget -= d
      max_drafts.append(d)
    requests = [w.request for w in plan.work]
    t0 = time.perf_counter()
    proposals = (self.proposer.propose(requests, max_drafts) if any(max_drafts)
                 else Proposals(counts=(0,) * len(plan.work)))
    t1 = time.perf_counter()
    num_drafts = proposals.counts
    chunks = [self.chunk(w) for w in plan.work]
    if any(num_drafts):
      # Guesses that stay on the device get placeholder rows here; the verification writes them in.
      guesses = proposals.token_ids or tuple((0,) * d for d in num_drafts)
      chunks = [dataclasses.replace(c, token_ids=list(c.token_ids) + list(g),
                                    page_table=bm.page_table(r.request_id)) if g else c
                for c, g, r in zip(chunks, guesses, requests)]
    batch = self.batch(plan.work, chunks=chunks)
    if any(num_drafts):
      batch = batch.replace(verify=self._verify_inputs(proposals, batch.shape[1]))
      accepted, final, draft_tokens = self.runner.call(verify_program(samples(plan.work)), batch)
    else:
      accepted, final, draft_tokens = np.zeros(batch.shape[1], np.int32), self.runner.run(batch), None
    t2 = time.perf_counter()
    results = []
    for s, w in enumerate(plan.work):
      if max_drafts[s]:
        a = int(accepted[s])
        computed = w.start + 1 + a
        bm.truncate(w.request.request_id, computed)
        self.proposer.rollback(w.request.request_id, computed)
        results.append(WorkResult(computed, (draft_tokens[s, :a].tolist() if a else []) + [int(final[s])]))
      else:
        results.append(WorkResult(w.start + w.num_tokens, [int(final[s])] if w.samples_next else []))
    self._count(num_forwards=1, num_verify_forwards=int(any(num_drafts)),
                num_generated_tokens=sum(len(r.tokens) for r in results), num_drafts=sum(d > 0 for d in num_drafts),
                num_draft_tokens=sum(num_drafts),
                num_accepted_tokens=sum(int(accepted[s]) for s, d in enumerate(num_drafts) if d),
                propose_seconds=t1 - t0, target_seconds=t2 - t1)
    return StepOutcome(plan, tuple(results))

  def _verify_inputs(self, proposals: Proposals, s_pad: int) -> VerifyInputs:
    counts = np.zeros(s_pad, np.int32)
    counts[:len(proposals.counts)] = proposals.counts
    if proposals.token_ids is None:  # On the device: where each sequence's guesses are.
      rows = np.full(s_pad, -1, np.int32)
      rows[:len(proposals.rows)] = proposals.rows
      guess_tokens, guess_probs = proposals.device
      return VerifyInputs(num_drafts=counts, draft_rows=rows, guess_tokens=guess_tokens, guess_probs=guess_probs)
    tokens = np.zeros((s_pad, self.k), np.int32)
    for s, g in enumerate(proposals.token_ids):
      tokens[s, :len(g)] = g
    return VerifyInputs(num_drafts=counts, draft_tokens=tokens)

  def release(self, request_id: str) -> None:
    self.proposer.free(request_id)

  def check_no_leaks(self, idle: bool) -> None:
    self.proposer.check_no_leaks(idle)

  def stats(self) -> dict[str, float]:
    return {**super().stats(), **self.spec_stats.as_dict()}

  def warmup_calls(self) -> list[runner_lib.WarmupCall]:
    """Verification (greedy and sampled) and the draft's passes for every shape bucket, besides the step."""
    calls = super().warmup_calls()
    shapes = self.buckets.all_shapes()
    vocab = self.runner.config.vocab_size
    for shape in shapes:
      empty = batch_lib.build([], self.page_size, shape)
      s_pad = shape[1]
      for sampled in (False, True):
        if self.config.method is SpeculativeMethod.DRAFT:
          # Placed as the draft pass's outputs are.
          guesses = (np.zeros((s_pad, self.k), np.int32), np.zeros((s_pad, self.k, vocab), np.float32))
          guesses = jax.device_put(guesses if sampled else (guesses[0], None), self.runner.output_placement)
          proposals = Proposals(counts=(), device=guesses, rows=())
        else:
          proposals = Proposals(counts=(), token_ids=())
        batch = empty.replace(verify=self._verify_inputs(proposals, s_pad))
        calls.append(runner_lib.WarmupCall(self.runner, batch, program=verify_program(sampled)))
    return calls + self.proposer.warmup_calls(shapes)

  @property
  def num_compilations(self) -> int:
    """The step's, the verification's and the draft's programs compiled so far (shared by engines of the same
    models and shapes)."""
    return self.runner.num_compilations + sum(
        runner_lib.num_compilations_of(verify_program(sampled)) +
        runner_lib.num_compilations_of(draft_program(self.k, sampled)) for sampled in (False, True))
