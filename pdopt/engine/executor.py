"""The one seam between the engine's host bookkeeping and the execution of a step.

The engine asks its policy what runs, updates the block manager, and hands the result to its executor as
a `StepPlan`: per request, the tokens this step computes (`Work`). The executor runs the plan and returns
a `StepOutcome`: per request, how many of its tokens now have K/V cached and which tokens it emitted. The
engine then does all the bookkeeping (appending tokens, stop conditions, timestamps, prefix-cache commits)
from that outcome alone; it never knows which executor it has.

Executors (each its own module):
- `device_executor.DeviceExecutor`: one compiled forward pass per plan, synchronous.
- `async_executor.AsyncExecutor`: dispatches decode-only plans without waiting for their tokens and runs
  chained plans (`StepPlan.chained`) of several decode steps per program.
- `speculative.executor.SpeculativeExecutor`: widens decodes with guesses and verifies them.
- `pdopt.sim`'s simulated executor: no model and no device; a step-cost model advances a virtual clock.

An executor may hold per-request state (a draft model's KV pages) and its own pages of the engine's
block manager (a speculative guess's); `release` drops them when a request ends or is preempted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

from pdopt.engine.request import Request


class Work(NamedTuple):
  """One request's part of a step: positions [start, start + num_tokens) of its sequence (a named tuple: one is
  built per request at every step).

  Attributes:
    request: the request (read-only for executors, except through the engine's block manager).
    start: the first position computed.
    num_tokens: positions computed (1 for a decode; `StepPlan.num_steps` of them for a chained block).
    is_decode: the request decodes (`Request.is_decoding` when the work was planned).
  """
  request: Request
  start: int
  num_tokens: int
  is_decode: bool

  @property
  def samples_next(self) -> bool:
    """The work reaches the end of the request's known tokens, so the step samples its next token (a prompt
    chunk that does not reach the end of its prompt samples nothing)."""
    return self.start + self.num_tokens >= self.request.num_tokens


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What one step runs.

  Attributes:
    work: per request, in the order the engine allocated pages.
    token_budget_left: step tokens the policy left unused (speculative guesses may take them).
    num_steps: decode steps per sequence (> 1 only for a chained block).
    num_waiting: requests left waiting when the step was planned (the host's work grows with them; the
      simulator charges it).
    chained: a decode-only plan whose input tokens are the last tokens of the plan in flight, which the
      host has not read yet; its `Work.start` is each request's position after the in-flight steps. An
      executor may run fewer than `num_steps` of it (the simulator stops a block where a request arrives);
      each `WorkResult` then says how far it got.
  """
  work: tuple[Work, ...]
  token_budget_left: int = 0
  num_waiting: int = 0
  num_steps: int = 1
  chained: bool = False

  @property
  def num_tokens(self) -> int:
    return sum(w.num_tokens for w in self.work)

  @property
  def decode_only(self) -> bool:
    return bool(self.work) and all(w.is_decode for w in self.work)


class WorkResult(NamedTuple):
  """What one `Work` left behind (a named tuple: one is built per request at every step).

  Attributes:
    num_computed: tokens of the sequence with K/V in the cache now.
    tokens: tokens emitted, in order (none for a prompt chunk short of its prompt's end; several for
      accepted speculative guesses or a block of chained steps).
    times: when each token came out, on the engine's clock (seconds), where the executor knows it (the
      simulator: each step of a block ends at its own time); None: when the engine applies the outcome.
  """
  num_computed: int
  tokens: list[int]
  times: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class StepOutcome:
  """A plan and, per `plan.work` entry, its result."""
  plan: StepPlan
  results: tuple[WorkResult, ...]


class Executor(Protocol):
  """Runs the engine's plans (see the module docstring)."""

  @property
  def in_flight(self) -> StepPlan | None:
    """The plan dispatched and not collected yet, or None (always None for synchronous executors)."""

  def chain_length(self, room: int) -> int:
    """How many decode steps a chained plan should hold when every request may still generate `room` more
    tokens after the plan in flight (>= 1); 0 if this executor does not chain plans."""

  @property
  def num_lookahead_tokens(self) -> int:
    """Step tokens to leave unplanned per decode, for guesses (`SchedulerView.num_lookahead_tokens`)."""

  def execute(self, plan: StepPlan) -> StepOutcome | None:
    """Runs `plan`; returns its outcome, or None if it was dispatched and `collect` returns the outcome.
    Only a chained plan may be executed while another is in flight."""

  def collect(self) -> StepOutcome:
    """Waits for the oldest dispatched plan and returns its outcome."""

  def release(self, request_id: str) -> None:
    """The request ended or was preempted: drop whatever the executor keeps for it."""

  def swap_out(self, request_id: str, num_tokens: int) -> Any:
    """Copies the K/V of the request's first `num_tokens` tokens to host memory (before the engine frees its
    pages, to preempt it by swapping); returns what `swap_in` needs."""

  def swap_in(self, request_id: str, swapped: Any) -> None:
    """Writes `swapped` (from `swap_out`) back into the request's newly allocated pages."""

  def warmup(self) -> int:
    """Compiles every program serving can run; returns how many were compiled."""

  @property
  def num_compilations(self) -> int:
    """Programs compiled so far."""

  def check_no_leaks(self, idle: bool) -> None:
    """Raises if the executor's own state is inconsistent (or, when `idle`, not empty)."""

  def stats(self) -> dict[str, float]:
    """Counters for the run's results (e.g. speculation's acceptance rate); may be empty."""


@dataclasses.dataclass
class SwapCounters:
  """Bytes and seconds of swap preemption's copies each way (device to host: out; back: in)."""
  out_bytes: int = 0
  out_s: float = 0.0
  in_bytes: int = 0
  in_s: float = 0.0

  def stats(self) -> dict[str, float]:
    """`swap_{out,in}_{bytes,s}` and the bandwidths `swap_{out,in}_gbps` (GB/s), once a swap happened; else {}."""
    if not self.out_bytes:
      return {}
    out: dict[str, float] = {"swap_out_bytes": self.out_bytes, "swap_out_s": self.out_s,
                             "swap_in_bytes": self.in_bytes, "swap_in_s": self.in_s}
    for way, (num_bytes, seconds) in (("out", (self.out_bytes, self.out_s)), ("in", (self.in_bytes, self.in_s))):
      if seconds > 0:
        out[f"swap_{way}_gbps"] = num_bytes / seconds / 1e9
    return out
