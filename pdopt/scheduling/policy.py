"""The `Scheduler` protocol, the read-only view a policy plans from, the plan it returns, and the registry.

A policy sees plain host data (`SchedulerView`) and returns a `Plan`: which requests run how many tokens
this step, which running requests to preempt (recompute later), and which waiting requests to reject with
a reason. It never touches the device, the model or the block manager; the engine (or the simulator)
carries the plan out, so both drive the very same policy objects.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import itertools
from typing import Callable, NamedTuple, Protocol, Sequence

from pdopt.scheduling.step_cost import StepCostModel


def is_decoding(running: bool, num_tokens: int, num_computed_tokens: int, num_generated: int) -> bool:
  """The one definition of a decode, used by the engine's `Request`, the policies' `RequestView` and the
  executors: a running request that has generated a token and has K/V cached for every token but its last,
  so its next step computes exactly that one token and samples the next."""
  return running and num_generated > 0 and num_computed_tokens == num_tokens - 1


class RequestView(NamedTuple):
  """A request as a policy sees it (a named tuple, read-only: the engine builds one per request at every step,
  and a tuple is built about four times faster than a frozen dataclass).

  Attributes:
    request_id: id.
    arrival_time: seconds on the engine clock.
    prompt_len: prompt tokens.
    num_tokens: prompt plus generated tokens so far.
    num_computed_tokens: tokens whose K/V are cached (for a waiting request: the prefix-cache hit the
      engine expects, in whole pages).
    num_pages_held: KV pages the request holds now (0 while waiting).
    num_generated: generated tokens so far.
    max_tokens: generation limit.
    is_running: admitted and holding pages (False while waiting, including after preemption).
    first_token_time: when its first token came out, or None.
    priority: its class (0 interactive, 1 batch).
    client: who sent it ("" if unknown).
  """
  request_id: str
  arrival_time: float
  prompt_len: int
  num_tokens: int
  num_computed_tokens: int
  num_pages_held: int
  num_generated: int
  max_tokens: int
  is_running: bool
  first_token_time: float | None = None
  priority: int = 0
  client: str = ""

  @property
  def num_pending(self) -> int:
    """Tokens to run before the next token can be sampled (1 while decoding)."""
    return self.num_tokens - self.num_computed_tokens

  @property
  def is_decoding(self) -> bool:
    """See `is_decoding`."""
    return is_decoding(self.is_running, self.num_tokens, self.num_computed_tokens, self.num_generated)


class Decoding(NamedTuple):
  """The running requests that decode (`RequestView.is_decoding`), as columns in admission order: what their
  next tokens need, without a `RequestView` per request (the engine's steps hold tens of them).

  Attributes:
    request_ids: their ids.
    num_computed_tokens: tokens whose K/V each has cached (its next token is the one after them).
    num_pages_held: pages each holds.
    priorities: the class of each (`RequestView.priority`).
  """
  request_ids: Sequence[str]
  num_computed_tokens: Sequence[int]
  num_pages_held: Sequence[int]
  priorities: Sequence[int]

  @classmethod
  def of(cls, running: Sequence[RequestView]) -> Decoding:
    decoding = [r for r in running if r.is_decoding]
    return cls([r.request_id for r in decoding], [r.num_computed_tokens for r in decoding],
               [r.num_pages_held for r in decoding], [r.priority for r in decoding])

  def pages_needed(self, page_size: int, num_tokens: int) -> list[int]:
    """Extra pages each needs to run `num_tokens` more tokens (`SchedulerView.pages_needed`)."""
    return [max(0, -(-(c + num_tokens) // page_size) - h) for c, h in zip(self.num_computed_tokens,
                                                                        self.num_pages_held)]


class RunningViews(collections.abc.Sequence):
  """The engine's running requests for a `SchedulerView`: their views, built on first use, and the columns of
  their decodes with the views of the others, built at once (the policies plan most steps from these alone).

  Args:
    build: returns the views, in admission order, as they were when the view was made (however late it runs).
    decoding: the decoding requests (`Decoding`).
    prefilling: the other views, in order.
    decodes: per running request in admission order, whether it decodes (so that `pages_held` needs no views);
      None if not known.
  """

  def __init__(self, build: Callable[[], tuple[RequestView, ...]], decoding: Decoding,
               prefilling: tuple[RequestView, ...], decodes: Sequence[bool] | None = None):
    self._build, self._views = build, None
    self.decoding, self.prefilling, self.decodes = decoding, prefilling, decodes

  def pages_held(self) -> list[tuple[str, int]] | None:
    """(request id, pages held) of every running request in admission order, from the columns and the other
    views (no view built per decode); None without `decodes`."""
    if self.decodes is None:
      return None
    decodes = zip(self.decoding.request_ids, self.decoding.num_pages_held)
    others = iter([(r.request_id, r.num_pages_held) for r in self.prefilling])
    return [next(decodes) if d else next(others) for d in self.decodes]

  def _get(self) -> tuple[RequestView, ...]:
    if self._views is None:
      self._views = self._build()
    return self._views

  def __getitem__(self, index):
    return self._get()[index]

  def __len__(self) -> int:
    return len(self.decoding.request_ids) + len(self.prefilling)

  def __iter__(self):
    return iter(self._get())

  def __reversed__(self):
    return reversed(self._get())


@dataclasses.dataclass(frozen=True)
class SchedulerView:
  """A snapshot of the engine for one scheduling decision.

  Attributes:
    now: the engine clock (seconds).
    running: admitted requests in admission order (oldest first): any sequence; the engine's are
      `RunningViews`.
    waiting: requests waiting for admission in queue order (preempted ones first, then by arrival).
    free_pages: pages allocatable now (free plus evictable prefix-cache pages).
    page_size: tokens per page.
    num_pages: pages in the pool.
    num_lookahead_tokens: token budget to leave free per scheduled decode (speculative decoding widens a
      decode by up to this many guesses after planning, from what the plan left unused); 0 without it.
  """
  now: float
  running: Sequence[RequestView]
  waiting: tuple[RequestView, ...]
  free_pages: int
  page_size: int
  num_pages: int
  num_lookahead_tokens: int = 0

  @functools.cached_property
  def decoding(self) -> Decoding:
    """`running`'s decoding requests, as columns."""
    return self.running.decoding if isinstance(self.running, RunningViews) else Decoding.of(self.running)

  @functools.cached_property
  def prefilling(self) -> tuple[RequestView, ...]:
    """`running`'s other requests (a prompt partly computed), in order."""
    if isinstance(self.running, RunningViews):
      return self.running.prefilling
    return tuple(r for r in self.running if not r.is_decoding)

  def pages_needed(self, request: RequestView, num_tokens: int) -> int:
    """Extra pages `request` needs to run `num_tokens` more tokens."""
    return max(0, -(-(request.num_computed_tokens + num_tokens) // self.page_size) - request.num_pages_held)


class ScheduledChunk(NamedTuple):
  """Run `num_tokens` tokens of `request_id` this step (a prompt chunk, or 1 for a decode)."""
  request_id: str
  num_tokens: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """One step's decision.

  Attributes:
    chunks: what runs, in order; the engine allocates pages in this order.
    preempt: running requests to free and send back to the waiting queue (recompute later).
    reject: (request_id, reason) for waiting requests the policy gives up on.
  """
  chunks: tuple[ScheduledChunk, ...] = ()
  preempt: tuple[str, ...] = ()
  reject: tuple[tuple[str, str], ...] = ()

  @property
  def num_tokens(self) -> int:
    return sum(c.num_tokens for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulingConfig:
  """Knobs shared by the policies (each policy's docstring says which it uses).

  Attributes:
    policy: registry name.
    max_num_batched_tokens: tokens per step (the token budget).
    max_num_seqs: sequences per step.
    chunk_size: largest prompt chunk per request per step; None means the whole budget.
    ttft_slo_ms, tpot_slo_ms: targets for `slo_aware` (milliseconds).
  """
  policy: str = "chunked"
  max_num_batched_tokens: int = 512
  max_num_seqs: int = 64
  chunk_size: int | None = None
  ttft_slo_ms: float | None = None
  tpot_slo_ms: float | None = None

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"unknown scheduling policy {self.policy!r}; valid: {', '.join(sorted(POLICIES))}")
    for name in ("max_num_batched_tokens", "max_num_seqs"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"SchedulingConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"SchedulingConfig.chunk_size must be an int >= 1 or None, got {self.chunk_size!r}")
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"SchedulingConfig.{name} must be > 0 or None, got {value!r}")


class Scheduler(Protocol):
  """A scheduling policy. `schedule` must not mutate the view and must respect, for every plan: at most
  `max_num_batched_tokens` tokens, at most `max_num_seqs` chunks, one chunk per request, no chunk longer
  than the request's pending tokens, and pages needed (after its preemptions) within `free_pages`."""

  name: str

  def schedule(self, view: SchedulerView) -> Plan:
    ...


POLICIES: dict[str, Callable[[SchedulingConfig], Scheduler]] = {}


def register(name: str):
  """Class decorator adding a policy to the registry under `name`."""
  def wrap(cls):
    POLICIES[name] = cls
    cls.name = name
    return cls
  return wrap


def make_scheduler(config: SchedulingConfig, step_cost: StepCostModel | None = None) -> Scheduler:
  """Builds the policy named by `config.policy`; `step_cost` predicts step times for the policies that plan
  with it (`needs_step_cost`: `slo_aware`).

  Raises:
    ValueError: a policy that needs a step-cost model and got none.
  """
  cls = POLICIES[config.policy]
  if not getattr(cls, "needs_step_cost", False):
    return cls(config)
  if step_cost is None:
    raise ValueError(f"policy {config.policy!r} predicts step times: it needs a step_cost "
                     "(pdopt.scheduling.step_cost.StepCostModel)")
  return cls(config, step_cost=step_cost)


class StepBuilder:
  """Accumulates a plan under a token budget, a sequence limit and the free pages.

  Policies use it so that every one of them accounts pages and preemption the same way.
  """

  def __init__(self, view: SchedulerView, max_tokens: int, max_seqs: int):
    self.view = view
    self.tokens_left = max_tokens
    self.seqs_left = max_seqs
    self.free_pages = view.free_pages
    self.chunks: list[ScheduledChunk] = []
    self.preempted: list[str] = []
    self.rejected: list[tuple[str, str]] = []
    self._scheduled: set[str] = set()

  def scheduled(self, request_id: str) -> bool:
    return request_id in self._scheduled

  def add(self, request: RequestView, num_tokens: int) -> bool:
    """Schedules `num_tokens` of `request` if budget, sequences and pages allow; returns whether it did."""
    return num_tokens >= 1 and self._place(request.request_id, num_tokens, self.view.pages_needed(request, num_tokens))

  def _place(self, rid: str, num_tokens: int, need: int) -> bool:
    """`add` of a request that needs `need` more pages for its `num_tokens` (>= 1) tokens."""
    if num_tokens > self.tokens_left or self.seqs_left < 1 or rid in self._scheduled or need > self.free_pages:
      return False
    self.free_pages -= need
    self.tokens_left -= num_tokens
    self.seqs_left -= 1
    self.chunks.append(ScheduledChunk(rid, num_tokens))
    self._scheduled.add(rid)
    return True

  def fit_chunk(self, request: RequestView, limit: int) -> int:
    """The largest chunk <= limit of `request`'s pending tokens that fits the token budget and the pages."""
    n = min(request.num_pending, limit, self.tokens_left)
    if n < 1:
      return 0
    room = (request.num_pages_held + self.free_pages) * self.view.page_size - request.num_computed_tokens
    return max(0, min(n, room))

  def preempt(self, request: RequestView) -> None:
    self.preempted.append(request.request_id)
    self.free_pages += request.num_pages_held

  def schedule_decodes(self, running: Sequence[RequestView] | None = None, by_priority: bool = False) -> None:
    """Gives every decoding request in `running` (priority order; None: the view's, in admission order, or with
    `by_priority` stably sorted by `priority`) its token, preempting from the back of `running` (lowest
    priority first) when pages run out, as vLLM does. With `view.num_lookahead_tokens`, each scheduled decode
    also keeps that much of the token budget (at most what it can still generate) unplanned, for speculative
    guesses; pages are not reserved (guesses only take pages left free)."""
    view, preempted = self.view, self.preempted
    if running is None:
      if self._place_all_decodes(by_priority) or self._place_decodes_from_columns(by_priority):
        return
      running = sorted(view.running, key=lambda r: r.priority) if by_priority else view.running
    lookahead = view.num_lookahead_tokens
    for request in running:
      if not request.is_decoding or (preempted and request.request_id in preempted):
        continue
      need = view.pages_needed(request, 1)  # Preempting others frees pages, not this request's need.
      if need > self.free_pages:
        self._free_pages_for_decode(request, running)
        if need > self.free_pages:
          self.preempt(request)
          continue
      if self._place(request.request_id, 1, need) and lookahead:
        self.tokens_left -= max(0, min(lookahead, request.max_tokens - request.num_generated - 1, self.tokens_left))

  def _place_all_decodes(self, by_priority: bool) -> bool:
    """Places every decode of the view at once (from its columns, in `schedule_decodes`' order) if its
    per-request loop would place them all without preempting: nothing planned yet, no lookahead, and budget,
    sequences and pages for all. Returns whether it did."""
    decoding, view = self.view.decoding, self.view
    ids, n = decoding.request_ids, len(decoding.request_ids)
    if self.chunks or self.preempted or view.num_lookahead_tokens or n > self.tokens_left or n > self.seqs_left:
      return False
    # The loop places request i only if its need fits what the ones before it left: all fit iff their sum does.
    need = sum(decoding.pages_needed(view.page_size, 1))
    if need > self.free_pages:
      return False
    if by_priority and n and min(decoding.priorities) != max(decoding.priorities):
      ids = [ids[i] for i in sorted(range(n), key=decoding.priorities.__getitem__)]  # Stable, as `sorted` is.
    self.free_pages -= need
    self.tokens_left -= n
    self.seqs_left -= n
    # `ScheduledChunk(rid, 1)` for each, built without a Python call per request.
    self.chunks.extend(map(tuple.__new__, itertools.repeat(ScheduledChunk), zip(ids, itertools.repeat(1))))
    self._scheduled.update(ids)
    return True

  def _place_decodes_from_columns(self, by_priority: bool) -> bool:
    """`schedule_decodes`' per-request loop, from the view's columns and the running requests' pages
    (`RunningViews.pages_held`) instead of a view per running request, where it visits the decodes in
    admission order (no lookahead; with `by_priority`, every running request of one class): the same chunks,
    preemptions, pages and budget. Returns whether it ran."""
    view, decoding = self.view, self.view.decoding
    if view.num_lookahead_tokens or not isinstance(view.running, RunningViews):
      return False
    if by_priority:  # Sorted by priority, the running requests stay in admission order only if of one class.
      classes = {*decoding.priorities, *(r.priority for r in view.prefilling)}
      if len(classes) > 1:
        return False
    running, order = view.running, None  # (id, pages held) of the running requests, read once a page is short.
    if running.decodes is None:
      return False
    ps, preempted, scheduled = view.page_size, self.preempted, self._scheduled
    for rid, computed, held in zip(decoding.request_ids, decoding.num_computed_tokens, decoding.num_pages_held):
      if preempted and rid in preempted:
        continue
      need = max(0, -(-(computed + 1) // ps) - held)
      if need > self.free_pages:  # `_free_pages_for_decode`: from the back of the running requests.
        if order is None:
          order = running.pages_held()
        for victim, victim_held in reversed(order):
          if need <= self.free_pages:
            break
          if victim not in preempted and victim not in scheduled and victim != rid:
            preempted.append(victim)
            self.free_pages += victim_held
        if need > self.free_pages:
          preempted.append(rid)
          self.free_pages += held
          continue
      self._place(rid, 1, need)
    return True

  def _free_pages_for_decode(self, request: RequestView, running: Sequence[RequestView]) -> None:
    """Preempts from the back of `running` (neither preempted nor scheduled, not `request`) until the pages of
    `request`'s next token fit or no such request is left."""
    for victim in reversed(running):
      if self.view.pages_needed(request, 1) <= self.free_pages:
        return
      if (victim.request_id not in self.preempted and not self.scheduled(victim.request_id)
          and victim.request_id != request.request_id):
        self.preempt(victim)

  def ensure_progress(self, running: Sequence[RequestView], limit: int) -> None:
    """If nothing is scheduled yet, runs up to `limit` tokens of the oldest running request that is not
    preempted, preempting newer ones (from the back of `running`) until its pages fit.

    Running prompts that each hold part of the pool and each wait for more pages would otherwise wait
    for one another forever; the oldest alone always fits a pool that can hold any single request.
    """
    if self.chunks:
      return
    head = next((r for r in running if r.request_id not in self.preempted), None)
    if head is None:
      return
    n = min(head.num_pending, limit, self.tokens_left)
    for victim in reversed(running):
      if self.view.pages_needed(head, n) <= self.free_pages:
        break
      if victim.request_id != head.request_id and victim.request_id not in self.preempted:
        self.preempt(victim)
    self.add(head, n)

  def plan(self) -> Plan:
    return Plan(tuple(self.chunks), tuple(self.preempted), tuple(self.rejected))
