"""`DeviceExecutor`: each plan runs as one compiled forward pass on the model's runner, synchronously.

It packs the plan into a `StepBatch` padded to the smallest shape bucket that holds it, runs the step
program, and reads the sampled tokens back. The asynchronous and speculative executors extend it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax

from pdopt.cache.block_manager import BlockManager
from pdopt.engine import batch as batch_lib
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import Buckets, ChunkSpec, StepBatch
from pdopt.engine.executor import StepOutcome, StepPlan, SwapCounters, Work, WorkResult
from pdopt.engine.runner import ModelRunner


@dataclasses.dataclass(frozen=True)
class Swapped:
  """A preempted request's pages on the host: per layer the cache arrays cut to its pages (padded to a power
  of two), how many are real, and the bytes."""
  kv: list
  num_pages: int
  num_bytes: int


class DeviceExecutor:
  """Runs plans on `runner`, one step program per plan.

  Args:
    runner: the model and its KV cache on the device.
    block_manager: the engine's allocator (page tables; speculation also allocates and truncates pages).
    buckets: the padded shapes a step may take.
    max_num_seqs: the most sequences in one step (the decode shapes warm-up compiles).
  """

  def __init__(self, runner: ModelRunner, block_manager: BlockManager, buckets: Buckets, max_num_seqs: int):
    self.runner = runner
    self.block_manager = block_manager
    self.buckets = buckets
    self.max_num_seqs = max_num_seqs
    self.page_size = block_manager.page_size
    self.swaps = SwapCounters()

  in_flight: StepPlan | None = None
  num_lookahead_tokens = 0

  def chain_length(self, room: int) -> int:
    del room
    return 0

  def execute(self, plan: StepPlan) -> StepOutcome | None:
    sampled = self.runner.run(self.batch(plan.work, decode_only=plan.decode_only))
    return StepOutcome(plan, tuple(WorkResult(w.start + w.num_tokens, [int(sampled[s])] if w.samples_next else [])
                                   for s, w in enumerate(plan.work)))

  def collect(self) -> StepOutcome:
    raise RuntimeError(f"{type(self).__name__} runs every plan synchronously: there is nothing to collect")

  def chunk(self, work: Work, token_ids: Sequence[int] | None = None) -> ChunkSpec:
    """The `ChunkSpec` of `work`: its tokens (or `token_ids`, e.g. placeholders for tokens still on the
    device), its page table and its sampling parameters."""
    req = work.request
    if token_ids is None:
      token_ids = req.all_token_ids[work.start:work.start + work.num_tokens]
    # The chunk samples output token number (its end - the prompt) when it reaches its sequence's end.
    return ChunkSpec(token_ids=token_ids, start=work.start, page_table=self.block_manager.page_table(req.request_id),
                     temperature=float(req.sampling.temperature), top_k=req.sampling.top_k,
                     top_p=float(req.sampling.top_p), seed=req.seed,
                     token_index=max(0, work.start + len(token_ids) - req.prompt_len))

  def batch(self, work: Sequence[Work], decode_only: bool = False,
            chunks: Sequence[ChunkSpec] | None = None) -> StepBatch:
    """The host `StepBatch` of `work` (or of `chunks` made from it), in the smallest bucket that holds it."""
    chunks = [self.chunk(w) for w in work] if chunks is None else chunks
    shape = self.buckets.pick(sum(len(c.token_ids) for c in chunks), len(chunks),
                              max(len(c.page_table) for c in chunks))
    return batch_lib.build(chunks, self.page_size, shape, decode_only=decode_only)

  def release(self, request_id: str) -> None:
    pass

  def swap_out(self, request_id: str, num_tokens: int) -> Swapped:
    start = time.perf_counter()
    pages = self.block_manager.page_table(request_id)[:math.ceil(num_tokens / self.page_size)]
    host = jax.device_get(self.runner.gather_pages(pages))
    num_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(host))
    self.swaps.out_bytes += num_bytes
    self.swaps.out_s += time.perf_counter() - start
    return Swapped(host, len(pages), num_bytes)

  def swap_in(self, request_id: str, swapped: Swapped) -> None:
    start = time.perf_counter()
    pages = self.block_manager.page_table(request_id)[:swapped.num_pages]
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, self.runner.cache)
    self.runner.scatter_pages(pages, jax.device_put(swapped.kv, shardings))
    jax.block_until_ready(self.runner.cache)
    self.swaps.in_bytes += swapped.num_bytes
    self.swaps.in_s += time.perf_counter() - start

  def check_no_leaks(self, idle: bool) -> None:
    pass

  def stats(self) -> dict[str, float]:
    """Swapping's bytes and seconds each way, and the bandwidths they give (GB/s), once it has happened."""
    return self.swaps.stats()

  def warmup_calls(self) -> list[runner_lib.WarmupCall]:
    """The step program for every shape bucket and, where the runner compiles it, the decode-only variant
    for every shape a decode-only step can take."""
    empty = lambda shape, decode_only=False: batch_lib.build([], self.page_size, shape, decode_only)  # noqa: E731
    calls = [runner_lib.WarmupCall(self.runner, empty(shape)) for shape in self.buckets.all_shapes()]
    if self.runner.decode_variant:
      calls += [runner_lib.WarmupCall(self.runner, empty(shape, True))
                for shape in self.buckets.decode_shapes(self.max_num_seqs)]
    return calls

  def warmup(self) -> int:
    """Compiles `warmup_calls` in parallel (`runner_lib.warm_up`), then the sampler for every sequence
    bucket; returns how many programs were compiled (or loaded from the persistent compilation cache),
    samplers aside."""
    before = self.num_compilations
    runner_lib.warm_up(self.warmup_calls())
    for num_seqs in self.buckets.seqs:
      self.runner.compile_sampler(num_seqs)
    return self.num_compilations - before

  @property
  def num_compilations(self) -> int:
    return self.runner.num_compilations

  # Disaggregated serving: a prefilled request's pages leave one engine and enter another.

  def export_pages(self, request_id: str, num_tokens: int) -> tuple[list, int]:
    """The K/V of a request's first `num_tokens` tokens (`ModelRunner.gather_pages`: per layer, the cache
    arrays cut to its n pages, n padded to a power of two) and the number of real pages."""
    pages = self.block_manager.page_table(request_id)[:math.ceil(num_tokens / self.page_size)]
    return self.runner.gather_pages(pages), len(pages)

  def import_pages(self, request_id: str, kv: list, num_pages: int) -> None:
    """Writes `kv` from `export_pages` (already on this runner's devices) into the request's pages."""
    pages = self.block_manager.page_table(request_id)
    if len(pages) != num_pages:
      raise ValueError(f"request {request_id!r} holds {len(pages)} pages here, the K/V has {num_pages}")
    self.runner.scatter_pages(pages, kv)


def samples(work: Sequence[Work]) -> bool:
  """Whether some request of the step samples (temperature > 0): the step then needs the sampled programs."""
  return any(w.request.sampling.temperature > 0 for w in work)
