"""`slo_aware`: earliest-TTFT-deadline-first admission, TPOT-sized steps, early rejection.

Follows earliest-deadline-first scheduling (Liu and Layland, 1973) over TTFT deadlines, with admission
control that rejects up front what can no longer meet its deadline, on top of Sarathi-Serve's stall-free
batching (Agrawal et al., OSDI 2024), which picks its per-step token budget from the TPOT (TBT) target by
profiling. Here both decisions predict step times with the step-cost model of the served model on its
device (`pdopt.scheduling.step_cost`: roofline terms fitted to profiled steps, or the roofline alone), the
same model the simulator runs on.

Each step:
1. every running decode gets its token (when pages run out, batch requests are preempted before interactive
   ones, newest first within a class);
2. prompt chunks may add as many tokens as keep the step's predicted time within `tpot_slo_ms` (the
   decodes already in it, plus one chunk of fresh prompt tokens), at most what the token budget leaves;
   without a TPOT target, the whole token budget. When the decodes alone take the TPOT, prompts wait;
3. waiting requests without a first token have the TTFT deadline `arrival_time + ttft_slo_ms`. Walking
   them in deadline order, a request is rejected (with a reason naming its deadline) when the deadline
   has passed, or when even running nothing but the prompt tokens queued ahead of it (running partial
   prefills, earlier-deadline waiting requests not rejected) and then its own, in steps of fresh prompt
   chunks as large as an empty step may hold, would end after the deadline. Later chunks attend to more
   keys and share steps with decodes, so this is a lower bound on its TTFT under the cost model: only
   requests that cannot make it are rejected. Requests preempted after their first token are never
   rejected, nor are batch requests (`priority` 1): they have no TTFT deadline, come after every
   interactive request, in arrival order, and their prompt tokens do not count as queued ahead;
4. prompt chunks fill the prompt budget: first running partial prefills, then waiting requests,
   each in deadline order (preempted requests that already emitted a token go first); a prompt takes
   all of the budget left (no per-prompt cap), and admission stops at the first request that does not fit
   (no skipping ahead). Nothing new is admitted in a step that had to preempt.

With one `ttft_slo_ms` for every request, deadline order is arrival order; it differs from the engine's
queue order only for preempted requests, which the engine puts first and this policy puts back in
arrival order (unless they already emitted a token).

Trade: under the cost model the TPOT target bounds the step size (and so the ITL), and rejecting hopeless
requests early leaves capacity to those that can still meet their TTFT, which is meant to raise goodput
under overload; the price is requests rejected outright (each an SLO miss, counted by the metrics) and a
behaviour only as good as the cost model: predictions too fast over-admit and miss deadlines, too slow
reject requests that would have made it. The prediction ignores prefix-cache hits (a waiting request's
whole prompt is counted) and the engine's padding. Without `ttft_slo_ms` it orders by arrival and never
rejects; without `tpot_slo_ms` it uses the plain budget. Uses `max_num_batched_tokens`, `max_num_seqs`,
`ttft_slo_ms` and `tpot_slo_ms`; ignores `chunk_size`.
"""

from __future__ import annotations

import math

from pdopt.scheduling.policy import Plan, RequestView, SchedulerView, SchedulingConfig, StepBuilder, register
from pdopt.scheduling.step_cost import StepCostModel


@register("slo_aware")
class SloAware:
  """Args:
    config: the shared scheduling knobs.
    step_cost: predicts step times (seconds).
  """

  needs_step_cost = True

  def __init__(self, config: SchedulingConfig, step_cost: StepCostModel):
    if not isinstance(step_cost, StepCostModel):
      raise ValueError(f"slo_aware needs a StepCostModel (pdopt.scheduling.step_cost), got {step_cost!r:.80}")
    self.config = config
    self.step_cost = step_cost

  def prompt_budget(self, decode_kv_lens: list[int], tokens_left: int) -> int:
    """The most prompt tokens (one fresh chunk) a step with these decodes may add and still take at most
    `tpot_slo_ms` under the cost model, within `tokens_left`; `tokens_left` without a TPOT target."""
    if self.config.tpot_slo_ms is None or tokens_left <= 0:
      return max(0, tokens_left)
    limit = self.config.tpot_slo_ms / 1e3
    d, kv = len(decode_kv_lens), float(sum(decode_kv_lens))
    longest = max(decode_kv_lens, default=0)

    def seconds(n: int) -> float:
      tokens = d + n
      return self.step_cost.totals_seconds(tokens, d + (n > 0), kv + n * (n + 1) / 2, kv + n,
                                           tokens * max(longest, n))

    if seconds(1) > limit:
      return 0
    low, high = 1, tokens_left  # seconds(low) <= limit; find the largest such n.
    while low < high:
      mid = (low + high + 1) // 2
      low, high = (mid, high) if seconds(mid) <= limit else (low, mid - 1)
    return low

  def deadline(self, request: RequestView) -> float:
    """The TTFT deadline in seconds on the engine clock (the arrival time without a TTFT target; infinite
    for a batch request)."""
    if request.priority > 0:
      return math.inf
    slo_s = (self.config.ttft_slo_ms or 0.0) / 1e3
    return request.arrival_time + slo_s

  def _priority(self, request: RequestView) -> tuple[bool, float, float]:
    return (request.first_token_time is None, self.deadline(request), request.arrival_time)

  def schedule(self, view: SchedulerView) -> Plan:
    step = StepBuilder(view, self.config.max_num_batched_tokens, self.config.max_num_seqs)
    step.schedule_decodes(by_priority=True)  # Stable: arrival order within a class.
    decoding = view.decoding
    decode_kv = [c + 1 for rid, c in zip(decoding.request_ids, decoding.num_computed_tokens) if step.scheduled(rid)]
    prompt_budget = self.prompt_budget(decode_kv, step.tokens_left)
    # Running requests neither scheduled nor preempted: the partly computed prompts, and any decode left out.
    left_out = any(not step.scheduled(r) and r not in step.preempted for r in decoding.request_ids)
    partial = sorted((r for r in (view.running if left_out else view.prefilling)
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
    if not step.chunks:
      step.ensure_progress(sorted(view.running, key=lambda r: r.priority),
                           max(1, self.prompt_budget([], self.config.max_num_batched_tokens)))
    return step.plan()

  def _reject(self, view: SchedulerView, partial: list[RequestView], waiting: list[RequestView],
              step: StepBuilder) -> set[str]:
    """Adds to `step` a rejection, with its reason, for every waiting request whose TTFT deadline cannot be
    met; returns their ids."""
    if self.config.ttft_slo_ms is None:
      return set()
    rejected = set()
    chunk = max(1, self.prompt_budget([], self.config.max_num_batched_tokens))  # Prompt tokens per step, at best.

    def prefill_seconds(tokens: int) -> float:  # Fresh prompt tokens in steps of `chunk`, alone.
      full, rest = divmod(tokens, chunk)
      return (full * self.step_cost.totals_seconds(chunk, 1, chunk * (chunk + 1) / 2, chunk, chunk * chunk)
              + (rest > 0) * self.step_cost.totals_seconds(rest, 1, rest * (rest + 1) / 2, rest, rest * rest))

    ahead = sum(r.num_pending for r in partial)
    for request in waiting:
      if request.first_token_time is not None:
        ahead += request.num_pending
        continue
      deadline = self.deadline(request)
      if deadline == math.inf:
        continue
      eta = view.now + prefill_seconds(ahead + request.num_pending)
      if deadline <= view.now:
        reason = (f"TTFT deadline missed: deadline {deadline:.3f} s (arrival {request.arrival_time:.3f} s + "
                  f"ttft_slo {self.config.ttft_slo_ms:g} ms) has passed at {view.now:.3f} s")
      elif eta > deadline:
        reason = (f"TTFT deadline cannot be met: deadline {deadline:.3f} s, earliest first token "
                  f"{eta:.3f} s ({ahead} prompt tokens queued ahead + {request.num_pending} own, at most {chunk} "
                  f"per step, under the cost model of {self.step_cost.source})")
      else:
        ahead += request.num_pending
        continue
      rejected.add(request.request_id)
      step.rejected.append((request.request_id, reason))
    return rejected
