"""`slo_aware`: earliest-TTFT-deadline-first admission, TPOT-sized steps, early rejection.

Follows earliest-deadline-first scheduling (Liu and Layland, 1973) over TTFT deadlines, with admission
control that rejects up front what can no longer meet its deadline, on top of Sarathi-Serve's stall-free
batching (Agrawal et al., OSDI 2024), which picks its per-step token budget from the TPOT (TBT) target by
profiling; here that budget comes from one explicit, deliberately simple cost model: a step of `T`
tokens takes `T * ms_per_token` milliseconds.

Each step:
1. every running decode gets its token (newest running requests preempted when pages run out);
2. the step's token budget is `min(max_num_batched_tokens, tpot_slo_ms / ms_per_token)` (the plain
   `max_num_batched_tokens` without a TPOT target); prompt chunks get that budget minus the decodes, so
   a step stays within one TPOT under the cost model. When the decodes alone use it up, prompts wait;
3. waiting requests without a first token have the TTFT deadline `arrival_time + ttft_slo_ms`. Walking
   them in deadline order, a request is rejected (with a reason naming its deadline) when the deadline
   has passed, or when even running nothing but the prompt tokens queued ahead of it (running partial
   prefills, earlier-deadline waiting requests not rejected) and then its own would end after the
   deadline. This estimate is a lower bound on its TTFT under the cost model, so only requests that
   cannot make it are rejected. Requests preempted after their first token are never rejected;
4. prompt chunks fill the prompt budget: first running partial prefills, then waiting requests,
   each in deadline order (preempted requests that already emitted a token go first); a prompt takes
   all of the budget left (no per-prompt cap), and admission stops at the first request that does not fit
   (no skipping ahead). Nothing new is admitted in a step that had to preempt.

With one `ttft_slo_ms` for every request, deadline order is arrival order; it differs from the engine's
queue order only for preempted requests, which the engine puts first and this policy puts back in
arrival order (unless they already emitted a token).

Trade: under the cost model the TPOT target bounds the step size (and so the ITL), and rejecting hopeless
requests early leaves capacity to those that can still meet their TTFT, which is meant to raise goodput
under overload; the price is requests rejected outright (each an SLO miss, counted by the metrics) and a behaviour
only as good as `ms_per_token` is calibrated: too low over-admits and misses deadlines, too high rejects
requests that would have made it. The cost model ignores the fixed cost of a step and prefix-cache hits
(a waiting request's whole prompt is counted). Without `ttft_slo_ms` it orders by arrival and never
rejects; without `tpot_slo_ms` it uses the plain budget. `ms_per_token` is a constructor argument
(`make_scheduler` uses `DEFAULT_MS_PER_TOKEN`). Uses `max_num_batched_tokens`, `max_num_seqs`,
`ttft_slo_ms` and `tpot_slo_ms`; ignores `chunk_size`.
"""

from __future__ import annotations

import math

from pdopt.scheduling.policy import Plan, RequestView, SchedulerView, SchedulingConfig, StepBuilder, register

# Milliseconds per scheduled token: a rough figure for a 7-8B model in bf16 on one H100 at a few hundred
# tokens per step (~50 ms for a 512-token step). Calibrate it for other models and devices.
DEFAULT_MS_PER_TOKEN = 0.1


@register("slo_aware")
class SloAware:
  """Args:
    config: the shared scheduling knobs.
    ms_per_token: the cost model's milliseconds per token of a step (> 0).
  """

  def __init__(self, config: SchedulingConfig, ms_per_token: float = DEFAULT_MS_PER_TOKEN):
    if not ms_per_token > 0:
      raise ValueError(f"slo_aware ms_per_token must be > 0, got {ms_per_token!r}")
    self.config = config
    self.ms_per_token = ms_per_token

  @property
  def step_token_budget(self) -> int:
    """Tokens a step may hold so that it lasts at most `tpot_slo_ms` under the cost model."""
    budget = self.config.max_num_batched_tokens
    if self.config.tpot_slo_ms is not None:
      budget = min(budget, max(1, math.floor(self.config.tpot_slo_ms / self.ms_per_token)))
    return budget

  def deadline(self, request: RequestView) -> float:
    """The TTFT deadline in seconds on the engine clock (the arrival time without a TTFT target)."""
    slo_s = (self.config.ttft_slo_ms or 0.0) / 1e3
    return request.arrival_time + slo_s

  def _priority(self, request: RequestView) -> tuple[bool, float, float]:
    return (request.first_token_time is None, self.deadline(request), request.arrival_time)

  def schedule(self, view: SchedulerView) -> Plan:
    step = StepBuilder(view, self.config.max_num_batched_tokens, self.config.max_num_seqs)
    step.schedule_decodes(view.running)
    prompt_budget = max(0, self.step_token_budget - (self.config.max_num_batched_tokens - step.tokens_left))
    partial = sorted((r for r in view.running
                      if r.request_id not in step.preempted and not step.scheduled(r.request_id)),
                     key=self._priority)
    waiting = sorted(view.waiting, key=self._priority)
    rejected = self._reject(view, partial, waiting, step)
    for request in partial:
      n = step.fit_chunk(request, prompt_budget)
      if step.add(request, n):
        prompt_budget -= n
    if not step.preempted:  # Admitting new work while evicting old would only thrash.
      for request in waiting:
        if request.request_id in rejected:
          continue
        n = step.fit_chunk(request, prompt_budget)
        if not step.add(request, n):
          break
        prompt_budget -= n
    step.ensure_progress(view.running, self.step_token_budget)
    return step.plan()

  def _reject(self, view: SchedulerView, partial: list[RequestView], waiting: list[RequestView],
              step: StepBuilder) -> set[str]:
    """Adds to `step` a rejection, with its reason, for every waiting request whose TTFT deadline cannot be
    met; returns their ids."""
    if self.config.ttft_slo_ms is None:
      return set()
    rejected = set()
    ahead = sum(r.num_pending for r in partial)
    for request in waiting:
      if request.first_token_time is not None:
        ahead += request.num_pending
        continue
      deadline = self.deadline(request)
      eta = view.now + (ahead + request.num_pending) * self.ms_per_token / 1e3
      if deadline <= view.now:
        reason = (f"TTFT deadline missed: deadline {deadline:.3f} s (arrival {request.arrival_time:.3f} s + "
                  f"ttft_slo {self.config.ttft_slo_ms:g} ms) has passed at {view.now:.3f} s")
      elif eta > deadline:
        reason = (f"TTFT deadline cannot be met: deadline {deadline:.3f} s, earliest first token "
                  f"{eta:.3f} s ({ahead} prompt tokens queued ahead + {request.num_pending} own at "
                  f"{self.ms_per_token:g} ms/token)")
      else:
        ahead += request.num_pending
        continue
      rejected.add(request.request_id)
      step.rejected.append((request.request_id, reason))
    return rejected
