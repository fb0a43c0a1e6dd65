"""`SimExecutor`: the engine's executor with no model and no device.

Each plan takes the time the step-cost model predicts for it (at the padded shape the engine would compile,
`engine.batch.Buckets`), and the executor advances a `VirtualClock` by that much. Requests emit a placeholder
token, so they end by length (`ignore_eos`, as replays of traces ask). Everything else, the policy, the block
manager, preemption, prefix caching and the metrics, is the engine's own code, unchanged.

Speed: steady decoding is the bulk of a trace's steps, and between two events (an arrival, a request reaching
its length, a pool too full) every step decodes the same sequences. So, like the asynchronous executor, a
decode-only plan is "dispatched", and the engine then hands over a chained plan of the following decode
steps (`Engine._chain`, after asking the policy about the state ahead). This executor sizes each block
(`chain_length`) to end where the synchronous engine could next decide differently: before the first step
that would start at or after the next external event (`next_event`: an arrival, a request handed over from
another instance), when the first request reaches its length, or
where the pool runs out of pages. Every step gets its own predicted time and every token the end of its step,
so the outcome, the block manager's state included, is the one the synchronous engine reaches step by step
(`chain=False` runs it so; a test compares the two bit for bit).

In a simulated deployment most events reach other instances (an arrival goes to one replica of eight), so
with `interrupts` a block runs past `next_event` as far as the free pool holds its pages, and the deployment
calls `interrupt(t)` when something reaches this engine at time t: the block's steps that start at or after t
are taken back (their pages go back to the free pool; none were taken from the prefix cache) and the engine
decides at the step boundary after t, as it would have step by step.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from pdopt.cache.block_manager import BlockManager
from pdopt.engine.batch import Buckets
from pdopt.engine.executor import StepOutcome, StepPlan, SwapCounters, WorkResult
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim.clock import VirtualClock


class _Dispatched(NamedTuple):
  """A plan run ahead of the engine: its steps' seconds (counted when collected: an interrupted block counts
  only the steps it kept) and end times, and its outcome (a block's is built when collected, after any
  interrupt)."""
  plan: StepPlan
  seconds: np.ndarray
  times: list[float]
  outcome: StepOutcome | None = None


class SimExecutor:
  """Runs plans on a virtual clock (see the module docstring).

  Args:
    step_cost: predicts each step's seconds.
    clock: the engine's clock, advanced by each step.
    block_manager, buckets: the engine's (`Engine(..., executor=...)` passes them).
    token_id: the placeholder every step emits (not an EOS id of the model).
    next_event: the time (on `clock`) of the first thing after time t that may add work (an arrival), given
      t, or None if nothing will; a chained block stops before the first step that would start at or after it.
      `arrival_events` makes one from a list of arrival times. None: nothing will.
    chain: run steady decoding in blocks; False runs every step on its own (the reference the blocks must
      reproduce, and much slower).
    interrupts: the caller calls `interrupt(t)` before anything reaches the engine from outside at time t, so
      blocks may run past `next_event` (see the module docstring).
  """

  def __init__(self, step_cost: StepCostModel, clock: VirtualClock, block_manager: BlockManager, buckets: Buckets,
               token_id: int = 0, next_event: Callable[[float], float | None] | None = None, chain: bool = True,
               interrupts: bool = False):
    self.step_cost = step_cost
    self.clock = clock
    self.block_manager = block_manager
    self.buckets = buckets
    self.page_size = block_manager.page_size
    self.token_id = token_id
    self.next_event = next_event or (lambda t: None)
    self.chain = chain
    self.interrupts = interrupts
    self._dispatched: collections.deque[_Dispatched] = collections.deque()
    self.num_steps = 0  # Steps simulated, those of chained blocks included.
    self.busy_seconds = 0.0  # Virtual seconds spent in steps.
    self.swaps = SwapCounters()  # Swap preemption's copies, priced at the host bandwidth.

  num_lookahead_tokens = 0

  @property
  def in_flight(self) -> StepPlan | None:
    return self._dispatched[-1].plan if self._dispatched else None

  def chain_length(self, room: int) -> int:
    """Every step until the first request ends (`room`), until the next arrival, and as far as the pool holds
    the steps' pages: exactly the steps the synchronous engine would run before its next decision that could
    differ, so the engine allocates exactly their pages. With `interrupts`, past the next arrival too, as far
    as the free pool alone holds the pages (an interrupt gives them back; evicted cached pages could not be)."""
    bm = self.block_manager
    positions = [(w.request.request_id, w.start + w.num_tokens) for w in self.in_flight.work]  # Next positions.

    def pages(k: int) -> int:  # Pages a block of k steps takes on top of what the requests hold.
      return sum(bm.num_pages_needed(rid, pos + k) for rid, pos in positions)

    steps = min(room, self._steps_before_arrival([pos + 1 for _, pos in positions], room))
    # The longest block whose pages fit (1 if none does: the engine then tries one step).
    steps = _longest(lambda k: pages(k) <= bm.num_free_pages, 1, steps)
    if self.interrupts and steps < room:
      unused = bm.stats().free
      if pages(steps + 1) <= unused:
        steps = _longest(lambda k: pages(k) <= unused, steps + 1, room)
    return steps

  def interrupt(self, t: float) -> None:
    """Something reaches the engine from outside at time t (`interrupts`): the steps of the block in flight
    that start at or after t are taken back, with their pages, time and tokens; its first step stays (it
    started before anything at t could be seen)."""
    if not self._dispatched or not self._dispatched[-1].plan.chained:
      return
    plan, seconds, times, _ = self._dispatched[-1]
    keep = 1 + bisect.bisect_left(times, t)  # Step i > 0 starts when step i - 1 ends, at times[i - 1].
    if keep >= plan.num_steps:
      return
    for w in plan.work:
      self.block_manager.truncate(w.request.request_id, w.start + keep)
    plan = dataclasses.replace(plan, work=tuple(w._replace(num_tokens=keep) for w in plan.work), num_steps=keep)
    self._dispatched[-1] = _Dispatched(plan, seconds[:keep], times[:keep])
    self.clock.rewind_to(times[keep - 1])  # The end of the last step kept.

  def _block_seconds(self, kv0: list[int], steps: int) -> np.ndarray:
    """[steps] seconds of consecutive decode steps of sequences with `kv0` keys at the first, one more each
    step, at the padded shapes the engine picks (the page bucket follows the longest sequence); the arithmetic
    of `_step`, so that a block and its steps one at a time give the same times to the last bit."""
    n = len(kv0)
    t_pad, s_pad, _ = self.buckets.pick(n, n, 1)
    j = np.arange(steps)
    pages = np.ceil((max(kv0) + j) / self.page_size)
    p_pad = np.asarray(self.buckets.pages)[np.searchsorted(self.buckets.pages, pages)]
    keys = float(sum(kv0)) + n * j
    return self.step_cost.totals_seconds(float(t_pad), float(s_pad), keys, keys, t_pad * p_pad * self.page_size)

  def _steps_before_arrival(self, kv0: list[int], steps: int) -> int:
    """How many of `steps` consecutive decode steps (from now) start before the next arrival (at least 1)."""
    nxt = self.next_event(self.clock.now)
    if nxt is None:
      return steps
    ends = np.cumsum(np.concatenate([[self.clock.now], self._block_seconds(kv0, steps)]))
    return max(1, int(np.searchsorted(ends[:-1], nxt, side="left")))

  def execute(self, plan: StepPlan) -> StepOutcome | None:
    if plan.chained:
      self._dispatched.append(self._block(plan))
      return None
    if self._dispatched:
      raise RuntimeError("only a chained plan may run while another is in flight; collect it first")
    outcome, seconds = self._step(plan)
    if plan.decode_only and self.chain:  # "Dispatched", so that the engine may chain the steps after it.
      self._dispatched.append(_Dispatched(plan, np.asarray([seconds]), [self.clock.now], outcome))
      return None
    self._count(1, seconds)
    return outcome

  def collect(self) -> StepOutcome:
    plan, seconds, times, outcome = self._dispatched.popleft()
    self._count(len(seconds), float(seconds.sum()))
    if outcome is None:  # A block: its tokens, one per step, each at the end of its step.
      n, tokens = plan.num_steps, [self.token_id] * plan.num_steps  # Shared, as in `_step`.
      outcome = StepOutcome(plan, tuple([tuple.__new__(WorkResult, (w.start + n, tokens, times)) for w in plan.work]))
    return outcome

  def _step(self, plan: StepPlan) -> tuple[StepOutcome, float]:
    q = [w.num_tokens for w in plan.work]
    kv = [w.start + w.num_tokens for w in plan.work]
    t_pad, s_pad, p_pad = self.buckets.pick(sum(q), len(q), -(-max(kv) // self.page_size))
    seconds = self.step_cost.seconds(q, kv, t_pad, s_pad, p_pad * self.page_size, plan.num_waiting)
    self.clock.advance_to(self.clock.now + seconds)
    # One token at the step's end for every request that samples (a decode always does): the lists are shared
    # (the engine only reads them).
    sampled, none, times = [self.token_id], [], [self.clock.now]
    new = tuple.__new__  # `WorkResult(...)` without its call: a step has one per request.
    return StepOutcome(plan, tuple([new(WorkResult, (k, sampled, times) if w.is_decode or w.samples_next
                                        else (k, none, None)) for w, k in zip(plan.work, kv)])), seconds

  def _block(self, plan: StepPlan) -> _Dispatched:
    """`plan.num_steps` decode steps, each sequence one token per step (`chain_length` chose how many)."""
    seconds = self._block_seconds([w.start + 1 for w in plan.work], plan.num_steps)
    times = np.cumsum(np.concatenate([[self.clock.now], seconds]))[1:].tolist()  # Added in turn, as step by step.
    self.clock.advance_to(times[-1])
    return _Dispatched(plan, seconds, times)

  def _count(self, steps: int, seconds: float) -> None:
    self.num_steps += steps
    self.busy_seconds += seconds

  def release(self, request_id: str) -> None:
    pass

  def swap_out(self, request_id: str, num_tokens: int) -> int:
    """Prices the copy of the request's pages to host memory (`DeviceSpec.host_bandwidth`); returns its bytes."""
    pages = -(-num_tokens // self.page_size)
    num_bytes = pages * self.page_size * self.step_cost.sizes.kv_bytes_per_token * self.step_cost.sizes.tensor_parallel
    seconds = num_bytes / self.step_cost.device.host_bandwidth
    self._swap(seconds)
    self.swaps.out_bytes += num_bytes
    self.swaps.out_s += seconds
    return num_bytes

  def swap_in(self, request_id: str, swapped: int) -> None:
    seconds = swapped / self.step_cost.device.host_bandwidth
    self._swap(seconds)
    self.swaps.in_bytes += swapped
    self.swaps.in_s += seconds

  def _swap(self, seconds: float) -> None:
    """A copy to or from host memory: busy time, no step."""
    self._count(0, seconds)
    self.clock.advance_to(self.clock.now + seconds)

  def import_pages(self, request_id: str, kv, num_pages: int) -> None:
    """A request handed over from another simulated instance: its pages are allocated; there is no K/V."""

  def warmup(self) -> int:
    return 0

  num_compilations = 0

  def check_no_leaks(self, idle: bool) -> None:
    if idle and self._dispatched:
      raise AssertionError(f"{len(self._dispatched)} simulated steps were never collected")

  def stats(self) -> dict[str, float]:
    return {"sim_steps": self.num_steps, "sim_busy_s": self.busy_seconds, **self.swaps.stats()}


def _longest(fits: Callable[[int], bool], low: int, high: int) -> int:
  """The largest k in [low, high] with fits(k), for a `fits` that holds up to some k and fails above it; low if
  none does."""
  if fits(high):
    return high
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if fits(mid) else (low, mid - 1)
  return low


def arrival_events(arrivals: Sequence[float]) -> Callable[[float], float | None]:
  """`next_event` of a fixed list of arrival times: the first one after t, or None."""
  times = sorted(float(a) for a in arrivals)

  def next_event(t: float) -> float | None:
    i = bisect.bisect_right(times, t)
    return times[i] if i < len(times) else None

  return next_event


def placeholder_token(vocab_size: int, eos_token_ids: Sequence[int]) -> int:
  """The smallest token id that is not an EOS id of the model."""
  return next(t for t in range(vocab_size) if t not in set(eos_token_ids))

