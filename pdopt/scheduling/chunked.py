"""`chunked`: stall-free batching with chunked prefill (Sarathi-Serve, Agrawal et al., OSDI 2024).

Every step first gives each running decode its token, then fills what is left of the token budget with
prompt chunks: first the unfinished prompts of running requests, then new ones in arrival order. Long
prompts are split across steps, so decodes never wait behind a whole prefill (low inter-token latency),
at the price of a somewhat later first token for long prompts and of re-reading the prompt's KV once per
chunk. Uses `max_num_batched_tokens`, `max_num_seqs` and `chunk_size`.
"""

from __future__ import annotations

from pdopt.scheduling.policy import Plan, SchedulerView, SchedulingConfig, StepBuilder, register


@register("chunked")
class ChunkedPrefill:

  def __init__(self, config: SchedulingConfig):
    self.config = config

  def schedule(self, view: SchedulerView) -> Plan:
    step = StepBuilder(view, self.config.max_num_batched_tokens, self.config.max_num_seqs)
    step.schedule_decodes()
    limit = self.config.chunk_size or self.config.max_num_batched_tokens
    # A decode left out above cannot fit later either (it lacked budget or a sequence, or was preempted).
    for request in view.prefilling:
      if request.request_id not in step.preempted:
        step.add(request, step.fit_chunk(request, limit))
    if not step.preempted:  # Admitting new work while evicting old would only thrash.
      for request in view.waiting:
        n = step.fit_chunk(request, limit)
        if not step.add(request, n):
          break
    step.ensure_progress(view.running, limit)
    return step.plan()
