"""`fair`: virtual-token-counter fairness across clients and priority classes (VTC: Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024), on top of stall-free chunked batching.

Every client (a request's `client`, or its priority class when it has none) has a counter of the service it
got: each token of its requests a step runs adds 1 for a prompt token and 2 for an output token (VTC's
default weights: output tokens cost more), divided by its class's weight (interactive 4, batch 1), so an
interactive client may get four times a batch client's service before it counts as served as much. Each step:

1. every running decode gets its token (when pages run out, batch requests are preempted before interactive
   ones, newest first within a class), so no admitted request starves;
2. the token budget left goes to prompt chunks of at most `chunk_size` tokens: running partial prefills and
   waiting requests, the least-served client's oldest request first, counters updated as chunks are added;
3. a client that comes back after having nothing queued starts at the least counter of the clients that are
   active, not with the credit it kept while away (VTC's lift), so idling earns no priority.

Trade: a client that sends much cannot crowd out one that sends little (the counters), and interactive work is
preferred without starving batch work (the weights are ratios, not strict priorities); the price is prefix
and arrival order: a request may wait behind a later one of a less-served client. Uses
`max_num_batched_tokens`, `max_num_seqs` and `chunk_size`.
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
    self.counters: dict[str, float] = {}
    self._active: set[str] = set()

  @staticmethod
  def client(request: RequestView) -> str:
    return request.client or f"class-{request.priority}"

  def _charge(self, request: RequestView, num_tokens: int) -> None:
    cost = OUTPUT_TOKEN_COST if request.is_decoding else PROMPT_TOKEN_COST
    key = self.client(request)
    self.counters[key] += cost * num_tokens / CLASS_WEIGHTS.get(request.priority, 1.0)

  def schedule(self, view: SchedulerView) -> Plan:
    active = {self.client(r) for r in (*view.running, *view.waiting)}
    floor = min((self.counters[c] for c in self._active & active if c in self.counters), default=0.0)
    for c in active - self._active:  # Back (or new): no credit for the time away.
      self.counters[c] = max(self.counters.get(c, floor), floor)
    self._active = active

    step = StepBuilder(view, self.config.max_num_batched_tokens, self.config.max_num_seqs)
    running = sorted(view.running, key=lambda r: r.priority)  # Stable: arrival order within a class.
    step.schedule_decodes(running)
    for chunk in step.chunks:
      self._charge(next(r for r in view.running if r.request_id == chunk.request_id), chunk.num_tokens)
    limit = self.config.chunk_size or self.config.max_num_batched_tokens
    candidates = [r for r in view.running if r.request_id not in step.preempted and not step.scheduled(r.request_id)]
    if not step.preempted:  # Admitting new work while evicting old would only thrash.
      candidates += list(view.waiting)
    while candidates and step.tokens_left > 0:
      request = min(candidates, key=lambda r: (self.counters[self.client(r)], not r.is_running, r.arrival_time))
      candidates.remove(request)
      n = step.fit_chunk(request, limit)
      if step.add(request, n):
        self._charge(request, n)
      elif not request.is_running:
        break  # The least-served client's request does not fit: nothing skips ahead of it.
    step.ensure_progress(running, limit)
    return step.plan()
