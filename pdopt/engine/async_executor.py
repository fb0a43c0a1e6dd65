"""`AsyncExecutor`: decode steps dispatched before the previous step's tokens are read, several per program
(`EngineConfig.async_decode`, `EngineConfig.num_scheduler_steps`).

In steady decoding the host's work per step (asking the policy, packing, the transfer, launching a couple
hundred kernels, reading the tokens and the bookkeeping) can take longer than the step itself, and then
the device waits for the host however well the two overlap. So a decode-only plan is dispatched without
waiting for its tokens (`execute` returns None), and while it runs the engine may plan the next step as if
it had finished and hand over a chained plan (`StepPlan.chained`), which this executor dispatches at once
as one program of `num_steps` decode steps (vLLM's multi-step scheduling):

- the chained program's input token for row s is the token the program in flight sampled for row s,
  taken from that program's output on the device (`batch.ChainInputs`);
- step i feeds each sequence the token step i - 1 sampled, at position + i, writing its K/V into the slot
  the page table gives for that position (the engine allocates the pages of all steps before handing the
  plan over) and attending over kv_len + i keys;
- sampled requests draw step i's token with `token_index + i`, so the tokens are the ones one-step
  decoding would draw.

The program returns the tokens of every step, `[num_steps, S]`, and the last step's on their own (the next
program's input, without a slice on the host). `collect` reads the oldest program's tokens.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pdopt.cache.block_manager import BlockManager
from pdopt.engine import batch as batch_lib
from pdopt.engine import runner as runner_lib
from pdopt.engine import sampler
from pdopt.engine.batch import Buckets, ChainInputs, StepBatch
from pdopt.engine.device_executor import DeviceExecutor, samples
from pdopt.engine.executor import StepOutcome, StepPlan, WorkResult
from pdopt.engine.runner import ModelRunner
from pdopt.models.layers import AttentionMetadata


@functools.cache
def multi_step_program(num_steps: int, sampled: bool):
  """The program of `num_steps` chained decode steps (for `ModelRunner.call`); `sampled`: some request
  samples (otherwise the greedy variant skips the sampler). Returns ({"tokens": [num_steps, S] int32,
  "last": [S] int32}, cache)."""
  def program(model, cache, batch: StepBatch, attention_backend: str):
    page_size = cache[0][0].shape[2]
    page_table, kv_lens, sampling = batch.page_table, batch.kv_lens, batch.sampling
    num_tokens, num_seqs = batch.token_ids.shape[0], kv_lens.shape[0]
    rows = jnp.arange(num_tokens)
    seq = jnp.minimum(rows, num_seqs - 1)  # Row r is sequence r's token (decode-only layout).
    real = batch.slot_mapping >= 0  # Rows of padding write nothing, at every step.
    prev_rows = batch.chain.prev_rows
    token_ids = jnp.where(prev_rows >= 0, batch.chain.prev_tokens[jnp.maximum(prev_rows, 0)], batch.token_ids)
    outputs = []
    for i in range(num_steps):
      pos = batch.positions + i
      page = page_table[seq, jnp.minimum(pos // page_size, page_table.shape[1] - 1)]
      meta = AttentionMetadata(positions=pos, slot_mapping=jnp.where(real, page * page_size + pos % page_size, -1),
                               cu_q_lens=batch.cu_q_lens, kv_lens=jnp.where(kv_lens > 0, kv_lens + i, 0),
                               page_table=page_table, num_seqs=batch.num_seqs, decode_only=True)
      logits, cache = model(token_ids, meta, cache, logits_indices=batch.logits_indices,
                            attention_backend=attention_backend)
      if sampled:
        tokens = sampler.sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds,
                                sampling.token_index + i)
      else:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      outputs.append(tokens)
      token_ids = jnp.where(rows < num_seqs, tokens[seq], 0)
    return {"tokens": jnp.stack(outputs), "last": outputs[-1]}, cache

  program.__name__ = program.__qualname__ = f"_multi_step_{num_steps}_{'sampled' if sampled else 'greedy'}"
  return program


class AsyncExecutor(DeviceExecutor):
  """Dispatches decode-only plans without waiting and runs chained plans (see the module docstring); any
  other plan runs synchronously, as `DeviceExecutor` runs it.

  Args:
    runner, block_manager, buckets, max_num_seqs: as for `DeviceExecutor`.
    num_scheduler_steps: the most decode steps of one chained program (>= 1).
  """

  def __init__(self, runner: ModelRunner, block_manager: BlockManager, buckets: Buckets, max_num_seqs: int,
               num_scheduler_steps: int):
    super().__init__(runner, block_manager, buckets, max_num_seqs)
    self.num_scheduler_steps = num_scheduler_steps
    # Dispatched plans, oldest first: (plan, tokens [S] or [steps, S], the last step's tokens [S]).
    self._dispatched: collections.deque[tuple[StepPlan, jax.Array, jax.Array]] = collections.deque()

  @property
  def in_flight(self) -> StepPlan | None:
    return self._dispatched[-1][0] if self._dispatched else None

  def chain_length(self, room: int) -> int:
    """A block of `num_scheduler_steps` (one compiled program per length), or one step where a request has
    no room for a block."""
    return self.num_scheduler_steps if room >= self.num_scheduler_steps else 1

  def execute(self, plan: StepPlan) -> StepOutcome | None:
    if plan.chained:
      if not self._dispatched:
        raise RuntimeError("a chained plan needs a plan in flight to take its input tokens from")
      # Row s starts from the last token the plan in flight samples for row s (placeholder 0 here).
      batch = self.batch(plan.work, chunks=[self.chunk(w, token_ids=[0]) for w in plan.work])
      prev_rows = np.full(batch.shape[0], -1, np.int32)
      prev_rows[:len(plan.work)] = np.arange(len(plan.work))
      batch = batch.replace(chain=ChainInputs(prev_rows=prev_rows, prev_tokens=self._dispatched[-1][2]))
      out = self.runner.call(multi_step_program(plan.num_steps, samples(plan.work)), batch, fetch=False)
      self._dispatched.append((plan, out["tokens"], out["last"]))
      return None
    if self._dispatched:
      raise RuntimeError("only a chained plan may run while another is in flight; collect it first")
    if plan.decode_only:
      tokens = self.runner.dispatch(self.batch(plan.work, decode_only=True))
      self._dispatched.append((plan, tokens, tokens))
      return None
    return super().execute(plan)

  def collect(self) -> StepOutcome:
    plan, tokens, _ = self._dispatched.popleft()
    per_seq = np.asarray(tokens).reshape(plan.num_steps, -1).T.tolist()  # [S][steps]
    return StepOutcome(plan, tuple(WorkResult(w.start + w.num_tokens, per_seq[s]) for s, w in enumerate(plan.work)))

  def _programs(self) -> list:
    """The chained programs: one step and, with `num_scheduler_steps` > 1, blocks; greedy and sampled variants."""
    return [multi_step_program(steps, sampled) for steps in sorted({1, self.num_scheduler_steps})
            for sampled in (False, True)]

  def warmup_calls(self) -> list[runner_lib.WarmupCall]:
    calls = super().warmup_calls()
    for program in self._programs():
      # Steady decoding's shapes, the previous tokens placed as serving has them.
      for shape in self.buckets.decode_shapes(self.max_num_seqs):
        chain = ChainInputs(prev_rows=np.full(shape[0], -1, np.int32),
                            prev_tokens=jax.device_put(np.zeros(shape[1], np.int32), self.runner.output_placement))
        batch = batch_lib.build([], self.page_size, shape).replace(chain=chain)
        calls.append(runner_lib.WarmupCall(self.runner, batch, program=program))
    return calls

  @property
  def num_compilations(self) -> int:
    return self.runner.num_compilations + sum(runner_lib.num_compilations_of(p) for p in self._programs())
