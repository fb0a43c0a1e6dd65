"""The continuous-batching engine: the loop that turns a policy's decisions into steps.

Each `step()`:
1. builds a read-only `SchedulerView` and asks the policy for a `Plan`;
2. carries it out on the host: rejections, preemptions (pages freed, the request goes back to the front
   of the waiting queue and will recompute), admissions (the longest cached prefix is matched, pages are
   allocated for exactly the scheduled tokens);
3. hands the result to its executor as a `StepPlan` (`pdopt.engine.executor`): on a device one compiled
   forward pass that writes K/V into the pages and samples, in the simulator a step-cost model;
4. from the executor's `StepOutcome`, appends tokens, stamps times, registers newly full pages in the
   prefix cache, and frees the pages of finished requests.

An executor may dispatch a decode-only step and return its outcome later (`AsyncExecutor`); the next
`step()` then asks the policy about the state after the step in flight and, if it decodes the same
sequences again, hands over a chained plan before collecting the outcome (`_chain`).

Every request ends exactly once (finished, aborted or rejected); the engine never silently drops work.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from pdopt.cache.block_manager import BlockManager
from pdopt.engine.batch import Buckets
from pdopt.engine.config import EngineConfig
from pdopt.engine.costs import default_step_cost
from pdopt.engine.executor import Executor, StepOutcome, StepPlan, Work
from pdopt.engine.executors import make_executor
from pdopt.engine.handoff import Handoffs
from pdopt.engine.request import (Request, RequestOutput, RequestStatus, SamplingParams, checked_int,
                                  validate_request)
from pdopt.metrics import RequestRecord
from pdopt.models.config import ModelConfig
from pdopt.models.transformer import Transformer
from pdopt.scheduling import Decoding, Plan, RequestView, RunningViews, SchedulerView, make_scheduler
from pdopt.scheduling.step_cost import StepCostModel


class Engine(Handoffs):
  """Serves requests on one model with continuous batching over a paged KV cache.

  Args:
    model: the Transformer; or, with `executor`, only its `ModelConfig` (the simulator runs no model).
    config: EngineConfig.
    clock: returns seconds; injectable so tests, replays and the simulator control time.
    mesh: a device mesh (`pdopt.sharding.make_mesh`); the model is sharded onto it (tensor parallelism
      over its `model` axis) and the KV cache with its KV heads. None runs on the default device.
    draft_model: the draft of `EngineConfig.speculative` with method "draft" (same vocabulary; it gets
      its own KV pool of `num_pages` pages).
    executor: runs the steps; None builds the device executor `config` asks for (`executors.make_executor`).
      A given executor must use this engine's `block_manager`, so it is passed as a function of it.
    step_cost: predicts step times for the policies that plan with them (`slo_aware`); None takes the
      shipped fitted model of this model shape and device, else the device's roofline (`costs`).

  Settings that do not fit the model or each other raise ValueError, named.
  """

  def __init__(self, model: Transformer | ModelConfig, config: EngineConfig | None = None,
               clock: Callable[[], float] = time.perf_counter, mesh: Mesh | None = None,
               draft_model: Transformer | None = None,
               executor: Callable[[BlockManager, Buckets], Executor] | None = None,
               step_cost: StepCostModel | None = None):
    self.config = config = config or EngineConfig()
    self.model_config, self.clock = model if isinstance(model, ModelConfig) else model.config, clock
    self.max_model_len = config.model_len(self.model_config.max_position_embeddings)
    self.block_manager = BlockManager(config.num_pages, config.page_size, config.enable_prefix_caching)
    self.buckets = config.buckets(self.max_model_len)
    self.executor = (executor(self.block_manager, self.buckets) if executor is not None else
                     make_executor(model, config, self.block_manager, self.buckets, self.max_model_len, mesh,
                                   draft_model))
    self.step_cost = step_cost or default_step_cost(  # Its device: the mesh's, or the default one.
        self.model_config, config.kv_cache_dtype, mesh.shape.get("model", 1) if mesh else 1,
        (mesh.devices.flat[0] if mesh else jax.devices()[0]).device_kind)
    self.policy = make_scheduler(config.scheduling(), self.step_cost)
    self._eos, self._ids = frozenset(self.model_config.eos_token_id), itertools.count()
    self._seed_rng = np.random.default_rng(config.seed)
    self.requests: dict[str, Request] = {}
    self.waiting: collections.deque[str] = collections.deque()
    # The policy's views of the waiting requests, in the queue's order, built as each enters the queue: nothing
    # a view shows changes while a request waits, and under overload the queue is long (the view of a step
    # copies this deque instead of reading every waiting request).
    self._waiting_views: collections.deque[RequestView] = collections.deque()
    self.running: list[str] = []
    self.num_steps = self.num_preemptions = 0
    self._handoffs: list[Request] = []

  # ------------------------------------------------------------------ API

  def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                  request_id: str | None = None, arrival_time: float | None = None, priority: int = 0,
                  client: str = "") -> str:
    """Queues a request.

    Args:
      prompt_token_ids: the prompt (integer token ids).
      sampling_params: defaults to SamplingParams().
      request_id: unique id; generated when None.
      arrival_time: its arrival on the engine clock (seconds); now when None.
      priority, client: its class (0 interactive, 1 batch) and sender, for policies and metrics.

    Returns:
      The request id.

    Raises:
      ValueError: a bad prompt, a length over `max_model_len`, a request whose pages can never fit the pool,
        or a duplicate id (named); the engine is unchanged.
    """
    params = sampling_params or SamplingParams()
    prompt = validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                              self.config.page_size, self.config.num_pages)
    rid = str(next(self._ids)) if request_id is None else str(request_id)
    if rid in self.requests:
      raise ValueError(f"request_id {rid!r} is already in use")
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**32))
    req = self.requests[rid] = Request(rid, prompt, params, seed,
                                       self.clock() if arrival_time is None else arrival_time,
                                       checked_int("priority", priority, low=0), str(client))
    self.waiting.append(rid)
    self._waiting_views.append(req.view())
    return rid

  def abort(self, request_id: str) -> bool:
    """Ends a waiting or running request; returns False if it is unknown or already ended."""
    req = self.requests.get(request_id)
    if req is None or req.status.done:
      return False
    self._end(req, RequestStatus.ABORTED, self.clock(), "abort")
    return True

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running or self.executor.in_flight)

  def step(self) -> list[RequestOutput]:
    """Runs one scheduling decision and at most one step; returns the outputs of the requests that got a token
    or ended. With an executor that dispatches steps (`async_decode`), a call may instead collect the outcome
    of the step dispatched by the previous call (after chaining the next one, or before scheduling again)."""
    return [RequestOutput(r) for r in self.advance()]

  def advance(self) -> Sequence[Request]:
    """`step`, returning the engine's own requests that got a token or ended (read-only for the caller) instead
    of their outputs: for callers in this process that look at few of them (a simulated deployment)."""
    touched: dict[str, Request] = {}
    if self.executor.in_flight is not None:
      chained = self._chain(self.clock())
      self._apply(self.executor.collect(), touched)
      if chained is not None:
        self.num_steps += 1
        return list(touched.values())
    now = self.clock()
    view, decoding = self._view(now)
    work = self._carry_out(self.policy.schedule(view), now, touched, view.running.decoding, decoding)
    if work:
      budget_left = self.config.max_num_batched_tokens - sum(w.num_tokens for w in work)
      # Decoding requests wait on the prompt tokens of a step that has some.
      prefills = not all(w.is_decode for w in work)
      decoding = self._decoding(work) if prefills else []
      outcome = self.executor.execute(StepPlan(work, token_budget_left=budget_left, num_waiting=len(self.waiting)))
      if outcome is not None:
        self._apply(outcome, touched)
      if prefills:
        stall = self.clock() - now
        for req in decoding:
          req.decode_stall_s += stall
    self.num_steps += 1
    return list(touched.values())

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
    """Runs the prompts to completion (with anything already queued) and returns their outputs in order."""
    one = sampling_params is None or isinstance(sampling_params, SamplingParams)
    params = [sampling_params] * len(prompts) if one else list(sampling_params)
    if len(params) != len(prompts):
      raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
    while self.has_unfinished():
      self.step()
    return [RequestOutput(self.requests[i]) for i in ids]

  def warmup(self) -> int:
    """Compiles every program the executor can run; returns how many were compiled."""
    return self.executor.warmup()

  @property
  def num_compilations(self) -> int:
    return self.executor.num_compilations

  def records(self) -> list[RequestRecord]:
    """Metrics records of every ended request, in submission order."""
    return [r.to_record() for r in self.requests.values() if r.status.done]

  def check_no_leaks(self) -> None:
    """Raises if a request that has ended still holds pages, the allocator is inconsistent, or the waiting views
    are not those of the waiting queue."""
    self.block_manager.check_invariants()
    if [v.request_id for v in self._waiting_views] != list(self.waiting):
      raise AssertionError("the waiting views are not those of the waiting queue, in its order")
    idle = not self.has_unfinished()
    if idle:
      self.block_manager.assert_no_leaks()
    self.executor.check_no_leaks(idle)

  # ------------------------------------------------------------------ internals

  def _view(self, now: float, ahead: int = 0) -> tuple[SchedulerView, list[Request]]:
    """What the policy sees; `ahead` > 0 shows running requests as they will be after that many more decode
    tokens (the steps in flight). The decoding requests come as columns, and their views are built only if the
    policy reads `running` (most steps are planned from the columns), from the columns' values. Returns the view
    and the decoding requests, in the columns' order."""
    bm, requests = self.block_manager, self.requests
    held = bm.num_pages_held
    running = [requests[r] for r in self.running]
    decoding, prefilling, decodes = [], [], []
    for req in running:  # `Request.is_decoding` inlined (each is RUNNING): this runs for every request every step.
      n = len(req.all_token_ids)
      d = req.num_computed_tokens == n - 1 and n > len(req.prompt_token_ids)
      decodes.append(d)
      (decoding if d else prefilling).append(req)
    ids = [r.request_id for r in decoding]
    columns = Decoding(ids, [r.num_computed_tokens + ahead for r in decoding], bm.pages_held(ids),
                       [r.priority for r in decoding])
    others = tuple([r.view(held(r.request_id), ahead) for r in prefilling])

    def build() -> tuple[RequestView, ...]:  # In admission order.
      decode_views = map(Request.decode_view, decoding, columns.num_computed_tokens, columns.num_pages_held)
      other_views = iter(others)
      return tuple([next(decode_views) if d else next(other_views) for d in decodes])

    return SchedulerView(
        now=now, running=RunningViews(build, columns, others, decodes),
        waiting=tuple(self._waiting_views),
        free_pages=bm.num_free_pages, page_size=self.config.page_size, num_pages=self.config.num_pages,
        num_lookahead_tokens=self.executor.num_lookahead_tokens), decoding

  def _carry_out(self, plan: Plan, now: float, touched: dict[str, Request], columns: Decoding,
                 decoding: list[Request]) -> tuple[Work, ...]:
    """Rejections, preemptions and admissions of `plan`; pages for exactly the scheduled tokens. Returns
    the work of the step (a chunk whose pages do not fit after all is dropped: an admission waits, a running
    request is preempted). `columns` and `decoding` are the view's decoding requests the plan was made from."""
    for rid, reason in plan.reject:
      req = self.requests[rid]
      if req.status is RequestStatus.WAITING:
        self._end(req, RequestStatus.REJECTED, now, reason)
        touched[rid] = req
    for rid in plan.preempt:
      self._preempt(self.requests[rid])
    bm, requests, new_work = self.block_manager, self.requests, tuple.__new__  # `Work(...)` without its call.
    chunks, work = plan.chunks, self._carry_out_decodes(plan, columns, decoding)
    if work is None:
      work = []
    else:  # The decodes are done (each run or preempted), also if none is left to run.
      chunks = chunks[len(columns.request_ids):]
    for rid, num_tokens in chunks:
      req = requests[rid]
      status = req.status
      if status is RequestStatus.RUNNING:  # Most chunks (decodes): no prefix to match, nothing swapped.
        start, num_ids = req.num_computed_tokens, len(req.all_token_ids)
        n = min(num_tokens, num_ids - start)
        if n < 1 or not bm.allocate(rid, start + n):
          self._preempt(req)
          continue
        # `Request.is_decoding`, inlined.
        work.append(new_work(Work, (req, start, n, start == num_ids - 1 and num_ids > len(req.prompt_token_ids))))
        continue
      if status.done:
        continue
      if req.swapped is None:  # Admitting: the longest cached prefix first.
        keys = req.prompt_keys(bm.page_size) if bm.enable_prefix_caching else ()
        req.num_computed_tokens = bm.match_prefix(rid, req.all_token_ids, keys)
        req.num_cached_tokens = req.num_computed_tokens
      n = min(num_tokens, len(req.all_token_ids) - req.num_computed_tokens)
      if n < 1 or not bm.allocate(rid, req.num_computed_tokens + n):
        bm.free(rid)
        req.num_computed_tokens = req.num_computed_tokens if req.swapped is not None else 0
        continue
      if req.swapped is not None:  # Back from host memory into its new pages.
        self.executor.swap_in(rid, req.swapped)
        req.swapped = None
      self._leave_waiting(rid)
      self.running.append(rid)
      req.status = RequestStatus.RUNNING
      if req.first_scheduled_time is None:
        req.first_scheduled_time = now
      work.append(Work(req, req.num_computed_tokens, n, req.is_decoding))
    return tuple(work)

  def _carry_out_decodes(self, plan: Plan, columns: Decoding, decoding: list[Request]) -> list[Work] | None:
    """The work of the view's decodes if the plan starts with all of them, in the columns' order, one token
    each, and preempts nothing (most steps): pages only for the decodes whose next token starts a page (a
    decode whose page does not fit is preempted, as the per-chunk loop of `_carry_out` does, so the list may
    be empty). Else None, and `_carry_out` takes every chunk in turn."""
    ids, n = columns.request_ids, len(columns.request_ids)
    prefix = plan.chunks[:n]
    if not n or plan.preempt or len(prefix) < n or [c[1] for c in prefix].count(1) != n \
        or [c[0] for c in prefix] != ids:
      return None
    bm, ps, starts = self.block_manager, self.config.page_size, columns.num_computed_tokens
    # Pages held cover the next token unless it starts a page: start >= held * page_size.
    starts_page = [i for i, (c, h) in enumerate(zip(starts, columns.num_pages_held)) if c >= h * ps]
    failed = []
    for i in starts_page:  # In order, as the per-chunk loop: a preempted decode's pages may serve the next.
      if not bm.allocate(ids[i], starts[i] + 1):
        self._preempt(decoding[i])
        failed.append(i)
    one, true = itertools.repeat(1), itertools.repeat(True)
    items = map(tuple.__new__, itertools.repeat(Work), zip(decoding, starts, one, true))  # `Work(...)`, no call each.
    if failed:
      drop = set(failed)
      return [w for i, w in enumerate(items) if i not in drop]
    return list(items)

  def _decoding(self, work: Sequence[Work]) -> list[Request]:
    """The running requests that decode (`Request.is_decoding`) once `work` is carried out: its decodes, and
    any running request it left out that decodes (`work` holds running requests only, one item each)."""
    decoding = [w.request for w in work if w.is_decode]
    if len(work) < len(self.running):
      scheduled = {w.request.request_id for w in work}
      decoding += [r for r in map(self.requests.__getitem__, self.running)
                   if r.request_id not in scheduled and r.is_decoding]
    return decoding

  def _chain(self, now: float) -> StepPlan | None:
    """Hands the executor the decode steps after the ones in flight if the policy, shown the state after
    them, decodes the same sequences one token each; returns the chained plan, or None."""
    inflight, ahead = self.executor.in_flight, self.executor.in_flight.num_steps
    if self.waiting or self.running != [w.request.request_id for w in inflight.work]:
      return None
    running = [w.request for w in inflight.work]
    lengths = [len(req.all_token_ids) for req in running]
    # Tokens each request may still generate after the in-flight ones: a block must not pass a length limit.
    room = min(min([req.length_limit - n for req, n in zip(running, lengths)]),
               self.max_model_len - max(lengths)) - ahead
    steps = self.executor.chain_length(room) if room >= 1 else 0
    if steps < 1:
      return None
    plan = self.policy.schedule(self._view(now, ahead=ahead)[0])
    if (plan.reject or plan.preempt or len(plan.chunks) != len(running)
        or {c.request_id for c in plan.chunks} != set(self.running) or min(c.num_tokens for c in plan.chunks) < 1):
      return None
    bm = self.block_manager
    # The block decodes positions num_tokens + ahead - 1 onwards, `steps` of them; a pool too full for a
    # block may still hold one more step. Pages taken so far stay with their requests, which need them soon.
    starts = [n + ahead - 1 for n in lengths]
    if not all(map(bm.allocate, self.running, [s + steps for s in starts])):
      steps = 1
      if not all(map(bm.allocate, self.running, [s + 1 for s in starts])):
        return None
    # `Work(req, start, steps, True)` for each, built without a Python call per request.
    chained = StepPlan(tuple(map(tuple.__new__, itertools.repeat(Work),
                                 zip(running, starts, itertools.repeat(steps), itertools.repeat(True)))),
                       num_steps=steps, chained=True)
    self.executor.execute(chained)
    return chained

  def _preempt(self, req: Request) -> None:
    if req.status is RequestStatus.RUNNING:
      if self.config.preemption_mode == "swap":  # Its pages to host memory; it resumes where it stopped.
        req.swapped = self.executor.swap_out(req.request_id, req.num_computed_tokens)
      self._release(req)
      req.status = RequestStatus.WAITING
      req.num_computed_tokens = req.num_computed_tokens if req.swapped is not None else 0
      req.num_preemptions += 1
      self.num_preemptions += 1
      self.waiting.appendleft(req.request_id)
      self._waiting_views.appendleft(req.view())

  def _end(self, req: Request, status: RequestStatus, now: float, reason: str) -> None:
    self._release(req)
    req.status, req.finish_time, req.finish_reason, req.swapped = status, now, reason, None

  def _release(self, req: Request) -> None:
    """Takes the request out of the queues and frees its pages and its executor state."""
    if req.request_id in self.running:
      self.running.remove(req.request_id)
    elif req.request_id in self.waiting:
      self._leave_waiting(req.request_id)
    self.block_manager.free(req.request_id)
    self.executor.release(req.request_id)

  def _leave_waiting(self, request_id: str) -> None:
    """Takes the request out of the waiting queue, and its view with it (it may come back changed)."""
    i = self.waiting.index(request_id)
    del self.waiting[i]
    del self._waiting_views[i]

  def _apply(self, outcome: StepOutcome, touched: dict[str, Request]) -> None:
    """Per work item of the outcome's plan: its tokens now in the KV cache and the tokens it emits. A request
    that ended while its step was in flight (aborted) drops its tokens."""
    bm, eos, max_model_len = self.block_manager, self._eos, self.max_model_len
    handoff = self.config.handoff_after_prefill
    now = self.clock()
    for work, result in zip(outcome.plan.work, outcome.results):
      req, num_computed, tokens = work.request, result.num_computed, result.tokens
      if req.status.done:
        continue
      if not work.is_decode:
        req.num_prefill_tokens_computed += work.num_tokens
      # Tokens after a stop (later accepted guesses, the rest of a block of decode steps) are dropped, and so
      # is their K/V: the prefix cache only learns what the request keeps. One token that ends nothing is most
      # steps' case (`Request.stop` inlined for it: no stop ids, no EOS that counts, room for more).
      sampling, ids = req.sampling, req.all_token_ids
      if (len(tokens) == 1 and not sampling.stop_token_ids and (sampling.ignore_eos or tokens[0] not in eos)
          and min(req.length_limit, max_model_len) - len(ids) > 1):
        reason = None
      else:
        stop, reason = req.stop(tokens, eos, max_model_len)
        if reason is not None:
          num_computed -= len(tokens) - stop - 1
          tokens = tokens[:stop + 1]
      req.num_computed_tokens = num_computed
      # The pages of every token but the last emitted one are computed: commit them with those tokens appended
      # (in place: a copy of the whole sequence per request per step would cost more than the rest).
      num_tokens = len(tokens)
      if num_tokens > 1:
        ids.extend(tokens[:-1])
      bm.commit(req.request_id, ids, num_computed)
      if num_tokens:
        ids.append(tokens[-1])
        times = result.times
        if times is None:
          times = [now] * num_tokens
        elif len(times) > num_tokens:
          times = times[:num_tokens]
        req.token_times.extend(times)
        if req.first_token_time is None:
          req.first_token_time = times[0]
        touched[req.request_id] = req
      if reason is not None:
        self._end(req, RequestStatus.FINISHED, req.token_times[-1], reason)
        continue
      if num_tokens and handoff:
        self.running.remove(req.request_id)
        req.status = RequestStatus.HANDED_OFF
        self._handoffs.append(req)
