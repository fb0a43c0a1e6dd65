"""`fair`: virtual-token-counter fairness between priority classes and across clients (VTC: Sheng et al.,
"Fairness in Serving Large Language Models", OSDI 2024), on top of stall-free chunked batching.

Service is counted in tokens a step runs for a request: 1 per prompt token, 2 per output token (VTC's default
weights: output tokens cost more). Two families of counters add it up:
- one per priority class, divided by the class's weight (interactive 4, batch 1): while both classes have work
  queued, interactive requests get about four times the prompt service of batch ones, and batch requests still
  progress (the weights are shares, not strict priorities);
- one per client (a request's `client`, or its class when it has none), undivided: within a class, the client
  served least so far goes first, so a client that sends much cannot crowd out one that sends little.

Each step:
1. every running decode gets its token (when pages run out, batch requests are preempted before interactive
   ones, newest first within a class), so no admitted request starves;
2. the token budget left goes to prompt chunks of at most `chunk_size` tokens: running partial prefills and
   waiting requests, picked one at a time from the least-served class (ties: interactive), within it the
   least-served client's oldest request (running ones before waiting ones), counters updated as chunks are
   added; admission stops at the first pick that does not fit (no skipping ahead);
3. a class or client that comes back after having nothing queued starts at the least counter of those that
   are active, not with the credit it kept while away (VTC's lift), so idling earns no priority.

Trade: shares of service between classes and clients instead of SLOs: no request is rejected and none waits
forever, but nothing bounds a TTFT under overload (`slo_aware` rejects to bound it), and a request may wait
behind a later one of a less-served client. Uses `max_num_batched_tokens`, `max_num_seqs` and `chunk_size`.
"""

from __future__ import annotations

from pdopt.scheduling.policy import Plan, RequestView, SchedulerView, SchedulingConfig, StepBuilder, register

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
CLASS_WEIGHTS = {0: 4.0, 1: 1.0}  # priority -> share of service (interactive 4, batch 1)


@register("fair")
class Fair:
  """Args:
    config: the shared scheduling knobs.
  """

  def __init__(self, config: SchedulingConfig):
    self.config = config
    self.counters: dict[str, float] = {}  # client -> service
    self.class_counters: dict[int, float] = {}  # priority -> service / the class's weight
    self._active: set[str] = set()
    self._active_classes: set[int] = set()

  @staticmethod
  def client(request: RequestView) -> str:
    return request.client or f"class-{request.priority}"

  def _charge(self, request: RequestView, num_tokens: int) -> None:
    cost = (OUTPUT_TOKEN_COST if request.is_decoding else PROMPT_TOKEN_COST) * num_tokens
    self.counters[self.client(request)] += cost
    self.class_counters[request.priority] += cost / CLASS_WEIGHTS.get(request.priority, 1.0)

  @staticmethod
  def _lift(counters: dict, was_active: set, active: set) -> None:
    """Whoever is back (or new) starts at the least counter of those that stayed active."""
    floor = min((counters[k] for k in was_active & active if k in counters), default=0.0)
    for k in active - was_active:
      counters[k] = max(counters.get(k, floor), floor)

  def schedule(self, view: SchedulerView) -> Plan:
    queued = (*view.running, *view.waiting)
    active, classes = {self.client(r) for r in queued}, {r.priority for r in queued}
    self._lift(self.counters, self._active, active)
    self._lift(self.class_counters, self._active_classes, classes)
    self._active, self._active_classes = active, classes

    step = StepBuilder(view, self.config.max_num_batched_tokens, self.config.max_num_seqs)
    running = sorted(view.running, key=lambda r: r.priority)  # Stable: arrival order within a class.
    step.schedule_decodes(running)
    by_id = {r.request_id: r for r in view.running}
    for chunk in step.chunks:
      self._charge(by_id[chunk.request_id], chunk.num_tokens)
    limit = self.config.chunk_size or self.config.max_num_batched_tokens
    candidates = [r for r in view.running if r.request_id not in step.preempted and not step.scheduled(r.request_id)]
    if not step.preempted:  # Admitting new work while evicting old would only thrash.
      candidates += list(view.waiting)
    while candidates and step.tokens_left > 0:
      priority = min({r.priority for r in candidates}, key=lambda p: (self.class_counters[p], p))
      request = min((r for r in candidates if r.priority == priority),
                    key=lambda r: (self.counters[self.client(r)], not r.is_running, r.arrival_time))
      candidates.remove(request)
      n = step.fit_chunk(request, limit)
      if step.add(request, n):
        self._charge(request, n)
      elif not request.is_running:
        break  # The pick does not fit: nothing skips ahead of it.
    step.ensure_progress(running, limit)
    return step.plan()
