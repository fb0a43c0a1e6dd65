"""Scheduling policies behind one protocol; `make_scheduler(SchedulingConfig(policy=...))` picks one."""

from pdopt.scheduling import chunked, decode_first, fair, prefill_first, slo_aware  # noqa: F401  (register them)
from pdopt.scheduling.policy import (POLICIES, Decoding, Plan, RequestView, RunningViews, ScheduledChunk, Scheduler,
                                     SchedulerView, SchedulingConfig, StepBuilder, is_decoding, make_scheduler,
                                     register)

__all__ = ["POLICIES", "Decoding", "Plan", "RequestView", "RunningViews", "ScheduledChunk", "Scheduler",
           "SchedulerView", "SchedulingConfig", "StepBuilder", "is_decoding", "make_scheduler", "register"]
