"""`decode_first`: running decodes first, prompts take whatever is left of the step, uncapped.

Follows the default scheduler of vLLM V1 (running requests before waiting ones, chunked prefill always on,
`long_prefill_token_threshold=0`, i.e. no per-prompt cap on a chunk), with decodes placed strictly ahead of
running partial prefills as in Sarathi-Serve's stall-free ordering. Each step:
1. every running decode gets its token; when pages run out the newest running requests are preempted
   (recompute later);
2. prompts fill what is left of `max_num_batched_tokens`: first the running requests whose prompt is only
   partly computed, then the waiting queue in its order (FCFS, no skipping ahead). A prompt runs whole if
   it fits what is left, otherwise it gets a chunk of exactly what is left (or of what its pages allow);
3. prompts only get pages left over after holding back the pages the scheduled decodes will need on the
   next step, so that a prompt started now never forces a running decode to be preempted next step;
   nothing new is admitted in a step that had to preempt.

How it differs from `chunked` (Sarathi-Serve): `chunked` caps every prompt chunk at `chunk_size`, so
with one long prompt queued a step holds the decodes plus at most `chunk_size` prompt tokens (a bounded
step time, hence a low ITL for the running decodes), and with several queued they share the step's prompt
tokens. `decode_first` ignores `chunk_size` and gives the head of the queue all that is left, so that
prompt finishes in the fewest steps (lower TTFT for it, fewer half-computed prompts holding pages) at the
price of steps that are as large as the budget allows whenever any prompt is queued (a longer step, hence
a higher ITL for every running decode while prompts are served). The decode page reserve also makes it
admit later than `chunked` when the pool is nearly full, trading TTFT for fewer preemptions of running
decodes. With `chunk_size=None` and ample pages the two plan the same step.
Uses `max_num_batched_tokens` and `max_num_seqs`.
"""

from __future__ import annotations

from pdopt.scheduling.policy import Plan, SchedulerView, SchedulingConfig, StepBuilder, register


@register("decode_first")
class DecodeFirst:

  def __init__(self, config: SchedulingConfig):
    self.config = config

  def schedule(self, view: SchedulerView) -> Plan:
    budget = self.config.max_num_batched_tokens
    step = StepBuilder(view, budget, self.config.max_num_seqs)
    step.schedule_decodes()
    # Pages the scheduled decodes will need for their next token; prompts may not take them.
    decoding = view.decoding
    reserve = sum(two - one for rid, one, two in zip(decoding.request_ids, decoding.pages_needed(view.page_size, 1),
                                                     decoding.pages_needed(view.page_size, 2))
                  if step.scheduled(rid))
    step.free_pages -= reserve
    # A decode left out above cannot fit later either (it lacked budget or a sequence, or was preempted).
    for request in view.prefilling:
      if request.request_id not in step.preempted:
        step.add(request, step.fit_chunk(request, budget))
    if not step.preempted:  # Admitting new work while evicting old would only thrash.
      for request in view.waiting:
        if not step.add(request, step.fit_chunk(request, budget)):
          break
    step.free_pages += reserve
    step.ensure_progress(view.running, budget)
    return step.plan()
