"""Property tests for every registered scheduling policy (pdopt/scheduling/), on seeded random queues, and a
toy host-side simulation that checks liveness under page pressure."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from pdopt.scheduling import (POLICIES, Decoding, Plan, RequestView, RunningViews, SchedulerView, SchedulingConfig,
                              StepBuilder, make_scheduler)
from pdopt.scheduling.step_cost import DeviceSpec, ModelSizes, StepCostModel

NUM_VIEWS = 400
NOW = 10.0  # Seconds on the engine clock of the random views.


def _toy_cost(step_ms: float = 2.0, token_ms: float = 0.1) -> StepCostModel:
  """A step of T tokens takes `step_ms` + `token_ms` * T milliseconds (what the toy simulation below charges)."""
  return StepCostModel(ModelSizes(0.0, 0.0, 0.0, 0.0, 0.0), DeviceSpec("toy", 1.0, 1.0),
                       (step_ms / 1e3, token_ms / 1e3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), source="toy")


def _scheduler(config: SchedulingConfig):
  return make_scheduler(config, step_cost=_toy_cost())


# ----------------------------------------------------------------- random views


def _random_config(rng: random.Random, policy: str) -> SchedulingConfig:
  return SchedulingConfig(
      policy=policy,
      max_num_batched_tokens=rng.choice([1, 3, 8, 32, 128, 512]),
      max_num_seqs=rng.randint(1, 12),
      chunk_size=rng.choice([None, rng.randint(1, 64)]),
      ttft_slo_ms=rng.choice([None, rng.uniform(1.0, 20_000.0)]),
      tpot_slo_ms=rng.choice([None, rng.uniform(0.05, 100.0)]))


def _random_request(rng: random.Random, i: int, page_size: int, running: bool) -> RequestView:
  prompt_len = rng.randint(1, rng.choice([8, 64, 600]))
  kind = rng.choice(["decode", "prompt", "recompute"] if running else ["new", "new", "preempted"])
  generated = 0 if kind in ("prompt", "new") else rng.randint(1, 30)
  num_tokens = prompt_len + generated
  if kind == "decode":
    computed = num_tokens - 1
  elif running:
    computed = rng.randint(0, num_tokens - 1)
    if computed == num_tokens - 1 and computed >= prompt_len:
      computed -= 1  # Keep it a prompt (recompute) rather than a decode.
  else:  # Waiting: nothing computed, or the prefix-cache hit the engine expects, in whole pages.
    computed = rng.choice([0, (rng.randint(0, num_tokens - 1) // page_size) * page_size])
  return RequestView(
      request_id=f"{'r' if running else 'w'}{i}", arrival_time=rng.uniform(0.0, NOW), prompt_len=prompt_len,
      num_tokens=num_tokens, num_computed_tokens=computed,
      num_pages_held=math.ceil(computed / page_size) if running else 0, num_generated=generated,
      max_tokens=generated + rng.randint(1, 50), is_running=running,
      first_token_time=rng.uniform(0.0, NOW) if generated else None)


def _random_view(rng: random.Random) -> SchedulerView:
  page_size = rng.choice([1, 2, 4, 16])
  running = tuple(_random_request(rng, i, page_size, True) for i in range(rng.randint(0, 8)))
  waiting = tuple(_random_request(rng, i, page_size, False) for i in range(rng.randint(0, 8)))
  free_pages = rng.choice([0, rng.randint(0, 8), rng.randint(0, 200)])
  held = sum(r.num_pages_held for r in running)
  return SchedulerView(now=NOW, running=running, waiting=waiting, free_pages=free_pages, page_size=page_size,
                       num_pages=held + free_pages + rng.randint(0, 10))


def _cases(seed: int, policy: str, **overrides):
  rng = random.Random(seed)
  for _ in range(NUM_VIEWS):
    config = dataclasses.replace(_random_config(rng, policy), **overrides)
    view = _random_view(rng)
    yield config, view, _scheduler(config).schedule(view)


def _check_plan(config: SchedulingConfig, view: SchedulerView, plan: Plan) -> None:
  """The protocol's guarantees, for any policy."""
  running = {r.request_id: r for r in view.running}
  waiting = {r.request_id: r for r in view.waiting}
  ids = [c.request_id for c in plan.chunks]
  assert plan.num_tokens <= config.max_num_batched_tokens
  assert len(plan.chunks) <= config.max_num_seqs
  assert len(ids) == len(set(ids)), "one chunk per request"
  assert len(plan.preempt) == len(set(plan.preempt))
  assert set(plan.preempt) <= running.keys(), "only running requests are preempted"
  assert not set(ids) & set(plan.preempt), "no chunk for a preempted request"
  rejected = [rid for rid, _ in plan.reject]
  assert set(rejected) <= waiting.keys(), "only waiting requests are rejected"
  assert not set(ids) & set(rejected), "no chunk for a rejected request"
  for rid, reason in plan.reject:
    assert isinstance(reason, str) and reason.strip(), f"{rid} rejected without a reason"
  pages = 0
  for chunk in plan.chunks:
    request = running.get(chunk.request_id) or waiting[chunk.request_id]
    assert 1 <= chunk.num_tokens <= request.num_pending, chunk
    pages += view.pages_needed(request, chunk.num_tokens)
  freed = sum(running[rid].num_pages_held for rid in plan.preempt)
  assert pages <= view.free_pages + freed


# ----------------------------------------------------------------- every policy


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_plan_respects_budget_sequences_and_pages(policy):
  for config, view, plan in _cases(0, policy):
    _check_plan(config, view, plan)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_schedule_is_deterministic(policy):
  for config, view, plan in _cases(1, policy):
    assert _scheduler(config).schedule(view) == plan


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_empty_view_gives_empty_plan(policy):
  view = SchedulerView(now=0.0, running=(), waiting=(), free_pages=8, page_size=4, num_pages=8)
  assert _scheduler(SchedulingConfig(policy=policy)).schedule(view) == Plan()


def test_unknown_policy_lists_valid_ones():
  with pytest.raises(ValueError) as info:
    SchedulingConfig(policy="shortest_job_first")
  for name in ("chunked", "decode_first", "prefill_first", "slo_aware"):
    assert name in POLICIES
    assert name in str(info.value)


# ----------------------------------------------------------------- decodes first


def _decodes_fit(config: SchedulingConfig, view: SchedulerView) -> bool:
  decodes = [r for r in view.running if r.is_decoding]
  return (len(decodes) <= min(config.max_num_batched_tokens, config.max_num_seqs)
          and sum(view.pages_needed(r, 1) for r in decodes) <= view.free_pages)


@pytest.mark.parametrize("policy", ["chunked", "decode_first", "slo_aware"])
def test_decodes_never_starved(policy):
  checked = 0
  for config, view, plan in _cases(2, policy):
    if not _decodes_fit(config, view) or not any(r.is_decoding for r in view.running):
      continue
    checked += 1
    chunks = {c.request_id: c.num_tokens for c in plan.chunks}
    for r in view.running:
      if r.is_decoding:
        assert chunks.get(r.request_id) == 1, (r, plan)
        assert r.request_id not in plan.preempt
  assert checked > NUM_VIEWS // 4


def test_decodes_placed_at_once_leave_the_step_as_the_loop_does():
  """`schedule_decodes()` places every decode from the view's columns at once when the per-request loop would
  preempt nothing, and otherwise runs the loop from the columns where the view says which running requests
  decode (the engine's views do); either way the step must end as the loop over views leaves it (in admission
  order, or stably by priority): chunks in order, preemptions, pages, budget."""
  rng = random.Random(5)
  at_once = looped = by_columns = 0
  for _ in range(NUM_VIEWS):
    view = _random_view(rng)
    running = tuple(r._replace(priority=rng.choice([0, 0, 1])) for r in view.running)
    if rng.random() < 0.3:  # One class, as most runs have.
      running = tuple(r._replace(priority=0) for r in running)
    view = dataclasses.replace(view, running=running, num_lookahead_tokens=rng.choice([0, 0, 0, 2]))
    # The engine's kind of `running`: columns, the other views, and which running requests decode.
    columns = dataclasses.replace(view, running=RunningViews(
        lambda running=running: running, Decoding.of(running), tuple(r for r in running if not r.is_decoding),
        [r.is_decoding for r in running]))
    budget, seqs, by_priority = rng.choice([1, 3, 8, 512]), rng.randint(1, 12), rng.random() < 0.5
    fast, from_columns = StepBuilder(view, budget, seqs), StepBuilder(columns, budget, seqs)
    loop = StepBuilder(view, budget, seqs)
    # Sometimes the policy has already preempted some running requests and planned prompt chunks.
    victims = [r for r in running if rng.random() < 0.2]
    prompts = [(r, rng.choice([1, 8])) for r in running
               if not r.is_decoding and r not in victims and rng.random() < 0.5]
    for step in (fast, from_columns, loop):
      for r in victims:
        step.preempt(r)
      for r, limit in prompts:
        step.add(r, step.fit_chunk(r, limit))
    fast.schedule_decodes(by_priority=by_priority)
    from_columns.schedule_decodes(by_priority=by_priority)
    loop.schedule_decodes(sorted(running, key=lambda r: r.priority) if by_priority else running)
    want = (loop.chunks, loop.preempted, loop.free_pages, loop.tokens_left, loop.seqs_left)
    assert (fast.chunks, fast.preempted, fast.free_pages, fast.tokens_left, fast.seqs_left) == want, view
    assert (from_columns.chunks, from_columns.preempted, from_columns.free_pages, from_columns.tokens_left,
            from_columns.seqs_left) == want, view
    if view.decoding.request_ids:
      placed = StepBuilder(view, budget, seqs)._place_all_decodes(by_priority)  # pylint: disable=protected-access
      at_once += placed
      looped += not placed
      # pylint: disable-next=protected-access
      by_columns += not placed and StepBuilder(columns, budget, seqs)._place_decodes_from_columns(by_priority)
  assert at_once > NUM_VIEWS // 8 and looped > NUM_VIEWS // 8 and by_columns > NUM_VIEWS // 16, \
      (at_once, looped, by_columns)


def test_decode_first_takes_what_is_left_and_ignores_chunk_size():
  view = SchedulerView(
      now=0.0,
      running=(RequestView("d", 0.0, 4, 6, 5, 2, 2, 10, True, 0.1),),
      waiting=(RequestView("a", 0.0, 100, 100, 0, 0, 0, 10, False),
               RequestView("b", 0.0, 5, 5, 0, 0, 0, 10, False)),
      free_pages=100, page_size=4, num_pages=102)
  config = dict(max_num_batched_tokens=64, max_num_seqs=8, chunk_size=8)
  plan = make_scheduler(SchedulingConfig(policy="decode_first", **config)).schedule(view)
  assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("d", 1), ("a", 63)]
  plan = make_scheduler(SchedulingConfig(policy="chunked", **config)).schedule(view)
  assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("d", 1), ("a", 8), ("b", 5)]


def test_decode_first_holds_back_the_decodes_next_pages():
  # "d" fills its 2 pages with this token, so it needs a 3rd page next step: the prompt may not take it.
  view = SchedulerView(
      now=0.0,
      running=(RequestView("d", 0.0, 4, 8, 7, 2, 4, 10, True, 0.1),),
      waiting=(RequestView("a", 0.0, 8, 8, 0, 0, 0, 10, False),),
      free_pages=2, page_size=4, num_pages=4)
  config = dict(max_num_batched_tokens=64, max_num_seqs=8)
  plan = make_scheduler(SchedulingConfig(policy="decode_first", **config)).schedule(view)
  assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("d", 1), ("a", 4)]
  plan = make_scheduler(SchedulingConfig(policy="chunked", **config)).schedule(view)
  assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("d", 1), ("a", 8)]


# ----------------------------------------------------------------- prefill_first


def test_prefill_first_admits_whole_prompts_and_stalls_decodes():
  prefill_steps = 0
  for config, view, plan in _cases(3, "prefill_first"):
    pending = {r.request_id: r.num_pending for r in (*view.running, *view.waiting)}
    decoding = {r.request_id for r in view.running if r.is_decoding}
    prompts = [c for c in plan.chunks if c.request_id not in decoding]
    if not prompts:
      continue
    prefill_steps += 1
    assert not any(c.request_id in decoding for c in plan.chunks), "decodes stall during a prefill step"
    for c in prompts:
      alone = len(plan.chunks) == 1 and c.num_tokens == config.max_num_batched_tokens
      assert c.num_tokens == pending[c.request_id] or alone, (c, pending[c.request_id])
    # FCFS: the admitted waiting requests are a prefix of the queue.
    admitted = {c.request_id for c in prompts}
    order = [r.request_id in admitted for r in view.waiting]
    assert order == sorted(order, reverse=True)
  assert prefill_steps > NUM_VIEWS // 4


def test_prefill_first_prefers_an_admissible_prompt_over_decodes():
  for config, view, plan in _cases(4, "prefill_first"):
    partial = [r for r in view.running if not r.is_decoding]
    head = (partial or view.waiting or [None])[0]
    if head is None or head.num_pending > config.max_num_batched_tokens:
      continue
    if view.pages_needed(head, head.num_pending) <= view.free_pages:
      assert plan.chunks[0].request_id == head.request_id
      assert plan.chunks[0].num_tokens == head.num_pending


def test_prefill_first_runs_a_long_prompt_alone_in_budget_pieces():
  decode = RequestView("d", 0.0, 4, 6, 5, 2, 2, 10, True, 0.1)
  long = RequestView("a", 1.0, 100, 100, 0, 0, 0, 10, False)
  short = RequestView("b", 2.0, 5, 5, 0, 0, 0, 10, False)
  policy = make_scheduler(SchedulingConfig(policy="prefill_first", max_num_batched_tokens=32, max_num_seqs=8))
  view = SchedulerView(now=3.0, running=(decode,), waiting=(long, short), free_pages=30, page_size=4,
                       num_pages=32)
  assert [(c.request_id, c.num_tokens) for c in policy.schedule(view).chunks] == [("a", 32)]
  # Not enough pages for the whole remainder: it does not start, and the decode runs.
  view = dataclasses.replace(view, free_pages=20)
  assert [(c.request_id, c.num_tokens) for c in policy.schedule(view).chunks] == [("d", 1)]
  # Started: it goes on alone before anything new is admitted.
  started = long._replace(num_computed_tokens=32, num_pages_held=8, is_running=True)
  view = SchedulerView(now=3.0, running=(decode, started), waiting=(short,), free_pages=22, page_size=4,
                       num_pages=32)
  assert [(c.request_id, c.num_tokens) for c in policy.schedule(view).chunks] == [("a", 32)]
  # A short prompt behind the budget-sized one waits for the next step.
  view = dataclasses.replace(view, running=(decode,), waiting=(short, long), free_pages=30)
  assert [(c.request_id, c.num_tokens) for c in policy.schedule(view).chunks] == [("b", 5)]


# ----------------------------------------------------------------- slo_aware


def _priority(policy, request: RequestView):
  return (request.first_token_time is None, policy.deadline(request), request.arrival_time)


def test_slo_aware_rejects_with_reasons_and_orders_by_deadline():
  rejections = 0
  for config, view, plan in _cases(5, "slo_aware", ttft_slo_ms=2000.0):
    policy = _scheduler(config)
    waiting = {r.request_id: r for r in view.waiting}
    rejected = {rid for rid, _ in plan.reject}
    rejections += len(rejected)
    for rid, reason in plan.reject:
      assert "deadline" in reason
      assert waiting[rid].first_token_time is None, "a request past its first token is never rejected"
    for r in view.waiting:  # Past its deadline and no first token yet: rejected.
      if r.first_token_time is None and policy.deadline(r) <= view.now:
        assert r.request_id in rejected
    admitted = {c.request_id for c in plan.chunks} & waiting.keys()
    for rid in admitted:
      for other in view.waiting:
        if other.request_id not in rejected and _priority(policy, other) < _priority(policy, waiting[rid]):
          assert other.request_id in admitted, "earliest deadline first"
  assert rejections > 0


def test_slo_aware_never_rejects_without_a_ttft_target():
  for _, _, plan in _cases(6, "slo_aware", ttft_slo_ms=None):
    assert not plan.reject


def test_slo_aware_keeps_steps_within_the_tpot_budget():
  for config, view, plan in _cases(7, "slo_aware"):
    running = {r.request_id: r for r in view.running}
    decodes = sum(1 for c in plan.chunks if c.request_id in running and running[c.request_id].is_decoding)
    prompt = plan.num_tokens - decodes
    if config.tpot_slo_ms is None or prompt == 0:
      continue
    # The toy cost charges 2 ms + 0.1 ms per token: the prompt tokens fit the TPOT beside the decodes, or the
    # step is the one that keeps a lone running prompt going.
    fits = 2.0 + 0.1 * plan.num_tokens <= config.tpot_slo_ms + 1e-9
    assert fits or (decodes == 0 and len(plan.chunks) == 1), (config, plan)


def test_slo_aware_prompt_budget_is_the_largest_chunk_within_the_tpot():
  policy = make_scheduler(SchedulingConfig(policy="slo_aware", tpot_slo_ms=10.0), step_cost=_toy_cost())
  # 2 ms + 0.1 ms * (3 decodes + n) <= 10 ms: n = 77.
  assert policy.prompt_budget([100, 7, 30], 512) == 77
  assert policy.prompt_budget([100, 7, 30], 50) == 50
  assert policy.prompt_budget([5] * 79, 512) == 1 and policy.prompt_budget([5] * 80, 512) == 0
  assert make_scheduler(SchedulingConfig(policy="slo_aware"), step_cost=_toy_cost()).prompt_budget([1], 33) == 33


def test_slo_aware_never_rejects_batch_requests_and_serves_them_after_interactive_ones():
  policy = make_scheduler(SchedulingConfig(policy="slo_aware", ttft_slo_ms=100.0, max_num_batched_tokens=64),
                          step_cost=_toy_cost())

  def waiting(rid, arrival, priority):
    return RequestView(rid, arrival, 32, 32, 0, 0, 0, 8, False, priority=priority)

  # At t=10 s every interactive deadline (arrival + 0.1 s) has passed; batch requests have none.
  late = [waiting("b0", 0.0, 1), waiting("i0", 1.0, 0), waiting("b1", 2.0, 1), waiting("i1", 9.95, 0)]
  plan = policy.schedule(SchedulerView(now=10.0, running=(), waiting=tuple(late), free_pages=100, page_size=16,
                                       num_pages=200))
  assert [rid for rid, _ in plan.reject] == ["i0"]
  # The interactive request that can still make its deadline goes first; batch ones follow in arrival order.
  assert [c.request_id for c in plan.chunks] == ["i1", "b0"]


def test_slo_aware_needs_a_step_cost_model():
  with pytest.raises(ValueError, match="slo_aware.*step_cost"):
    make_scheduler(SchedulingConfig(policy="slo_aware"))


def test_slo_aware_rejects_what_the_queue_ahead_makes_late():
  policy = make_scheduler(SchedulingConfig(policy="slo_aware", ttft_slo_ms=100.0), step_cost=_toy_cost(0.0, 1.0))
  early = RequestView("early", 0.00, 60, 60, 0, 0, 0, 10, False)
  late = RequestView("late", 0.01, 60, 60, 0, 0, 0, 10, False)   # 120 ms of prompts ahead of its deadline.
  gone = RequestView("gone", -1.0, 5, 5, 0, 0, 0, 10, False)      # Deadline long passed.
  view = SchedulerView(now=0.0, running=(), waiting=(late, gone, early), free_pages=100, page_size=4,
                       num_pages=100)
  plan = policy.schedule(view)
  reasons = dict(plan.reject)
  assert set(reasons) == {"late", "gone"}
  assert "deadline" in reasons["late"] and "deadline" in reasons["gone"]
  assert [(c.request_id, c.num_tokens) for c in plan.chunks] == [("early", 60)]


# ----------------------------------------------------------------- liveness under page pressure


@dataclasses.dataclass
class _Req:
  request_id: str
  arrival_time: float
  prompt_len: int
  max_tokens: int
  num_tokens: int = 0
  num_computed_tokens: int = 0
  num_pages_held: int = 0
  first_token_time: float | None = None
  state: str = "future"  # future, waiting, running, finished, rejected
  reason: str = ""

  def view(self) -> RequestView:
    running = self.state == "running"
    return RequestView(self.request_id, self.arrival_time, self.prompt_len, self.num_tokens,
                       self.num_computed_tokens, self.num_pages_held, self.num_tokens - self.prompt_len,
                       self.max_tokens, running, self.first_token_time)


def _simulate(config: SchedulingConfig, seed: int, num_pages: int = 40,
              page_size: int = 4) -> tuple[list[_Req], int]:
  """Runs plans on a toy host-side engine until every request ends; returns the requests and the
  preemption count. A step of T tokens takes 2 ms + 0.1 ms * T."""
  rng = random.Random(seed)
  reqs = []
  t = 0.0
  for i in range(40):
    t += rng.expovariate(200.0)
    prompt_len, max_tokens = rng.randint(1, 120), rng.randint(1, 40)
    assert math.ceil((prompt_len + max_tokens) / page_size) <= num_pages  # Any one request fits the pool.
    reqs.append(_Req(f"q{i}", t, prompt_len, max_tokens, num_tokens=prompt_len))
  by_id = {r.request_id: r for r in reqs}
  policy = _scheduler(config)
  running: list[str] = []
  waiting: list[str] = []
  now, preemptions, idle = 0.0, 0, 0
  for _ in range(20_000):
    for r in reqs:
      if r.state == "future" and r.arrival_time <= now:
        r.state = "waiting"
        waiting.append(r.request_id)
    if not running and not waiting:
      future = [r.arrival_time for r in reqs if r.state == "future"]
      if not future:
        break
      now = min(future)
      continue
    view = SchedulerView(now=now, running=tuple(by_id[i].view() for i in running),
                         waiting=tuple(by_id[i].view() for i in waiting),
                         free_pages=num_pages - sum(by_id[i].num_pages_held for i in running),
                         page_size=page_size, num_pages=num_pages)
    plan = policy.schedule(view)
    _check_plan(config, view, plan)
    for rid, reason in plan.reject:
      waiting.remove(rid)
      by_id[rid].state, by_id[rid].reason = "rejected", reason
    for rid in plan.preempt:
      r = by_id[rid]
      running.remove(rid)
      waiting.insert(0, rid)
      r.state, r.num_computed_tokens, r.num_pages_held = "waiting", 0, 0
      preemptions += 1
    for chunk in plan.chunks:
      r = by_id[chunk.request_id]
      if r.state == "waiting":
        waiting.remove(r.request_id)
        running.append(r.request_id)
        r.state = "running"
      r.num_computed_tokens += chunk.num_tokens
      r.num_pages_held = max(r.num_pages_held, math.ceil(r.num_computed_tokens / page_size))
    assert sum(by_id[i].num_pages_held for i in running) <= num_pages
    now += 0.002 + 0.0001 * plan.num_tokens
    for chunk in plan.chunks:
      r = by_id[chunk.request_id]
      if r.num_computed_tokens < r.num_tokens:
        continue
      r.num_tokens += 1  # Sampled a token.
      if r.first_token_time is None:
        r.first_token_time = now
      if r.num_tokens - r.prompt_len == r.max_tokens:
        running.remove(r.request_id)
        r.state, r.num_pages_held = "finished", 0
    idle = 0 if plan.chunks or plan.reject else idle + 1
    assert idle < 50, f"no progress: running={running} waiting={waiting} free={view.free_pages}"
  return reqs, preemptions


SIM_CASES = [
    dict(policy="chunked"),
    dict(policy="chunked", chunk_size=16),
    dict(policy="decode_first"),
    dict(policy="prefill_first"),
    dict(policy="slo_aware"),
    dict(policy="slo_aware", tpot_slo_ms=5.0),
    dict(policy="fair"),
    dict(policy="fair", chunk_size=16),
]


@pytest.mark.parametrize("kwargs", SIM_CASES, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_every_request_finishes_under_page_pressure(kwargs):
  assert {k["policy"] for k in SIM_CASES} == set(POLICIES), "a registered policy is missing here"
  preemptions = 0
  for seed in range(4):
    config = SchedulingConfig(max_num_batched_tokens=64, max_num_seqs=8, **kwargs)
    reqs, n = _simulate(config, seed)
    preemptions += n
    for r in reqs:
      assert r.state == "finished", r
  assert preemptions > 0, "the pool should be small enough to force preemption"


def test_slo_aware_ends_every_request_finished_or_rejected_with_a_reason():
  config = SchedulingConfig(policy="slo_aware", max_num_batched_tokens=64, max_num_seqs=8, ttft_slo_ms=150.0,
                            tpot_slo_ms=5.0)
  outcomes = {"finished": 0, "rejected": 0}
  for seed in range(4):
    reqs, _ = _simulate(config, seed)
    for r in reqs:
      assert r.state in outcomes, r
      outcomes[r.state] += 1
      if r.state == "rejected":
        assert "deadline" in r.reason
      else:
        assert r.first_token_time is not None
  assert outcomes["finished"] > 0 and outcomes["rejected"] > 0, outcomes
