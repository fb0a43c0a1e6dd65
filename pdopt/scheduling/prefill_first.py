"""`prefill_first`: whole-prompt admission ahead of decoding (vLLM v0's original default scheduler).

Each step is either a prefill step or a decode step, never both:
1. Prefill step, when any prompt can start. Candidates in order: running requests whose prompt is only
   partly computed (they finish before anything new is admitted), then the waiting queue in its order
   (FCFS: preempted requests first, then by arrival). Each candidate runs its whole remainder, no
   chunking, while the token budget, `max_num_seqs` and the free pages allow; the first one that does
   not fit ends the admission (no skipping ahead, as in vLLM v0). Running decodes stall for the step.
   A remainder longer than the token budget can never run whole, so it runs alone, `max_num_batched_tokens`
   tokens per step, on consecutive steps (it becomes a running partial prefill, which goes first); it is
   started only when pages fit its whole remainder, so that it is not stopped half way for lack of pages.
2. Otherwise a decode step: every running decode gets its token; when pages run out the newest running
   requests are preempted (recompute later), as vLLM does.

Trade: the first token comes as early as possible (largest prefill batches, no decode in the way, the best
median TTFT under load), but every admission stalls all running decodes for a whole prefill, so the
inter-token latency has long tails that grow with prompt length and arrival rate. Uses
`max_num_batched_tokens` and `max_num_seqs`; ignores `chunk_size` and the SLOs.
"""

from __future__ import annotations

from pdopt.scheduling.policy import Plan, RequestView, SchedulerView, SchedulingConfig, StepBuilder, register


@register("prefill_first")
class PrefillFirst:

  def __init__(self, config: SchedulingConfig):
    self.config = config

  def schedule(self, view: SchedulerView) -> Plan:
    budget = self.config.max_num_batched_tokens
    step = StepBuilder(view, budget, self.config.max_num_seqs)
    for request in (*view.prefilling, *view.waiting):
      if not self._add_whole(step, request, budget):
        break
    if step.chunks:
      return step.plan()  # A prefill step: running decodes wait.
    step.schedule_decodes()
    step.ensure_progress(view.running, budget)
    return step.plan()

  @staticmethod
  def _add_whole(step: StepBuilder, request: RequestView, budget: int) -> bool:
    """Schedules the whole remainder of `request`, or a budget-sized piece of it alone in the step when the
    remainder exceeds the budget and its pages fit; returns whether it did."""
    n = request.num_pending
    if n <= budget:
      return step.add(request, n)
    if step.chunks or step.view.pages_needed(request, n) > step.free_pages:
      return False
    return step.add(request, budget)
