"""What a workload hands to the engine: requests with arrival times, prompt ids and output lengths."""

from __future__ import annotations

import dataclasses

import numpy as np


# Priority classes, by `WorkloadRequest.priority`: lower runs first where a policy orders by class.
PRIORITY_CLASSES: tuple[str, ...] = ("interactive", "batch")


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
  """One request of a workload.

  Attributes:
    request_id: unique within the workload; for traces it names the trace row (`"azure-1234"`), so the same row
      keeps its id whatever the slice.
    arrival_time: seconds from the start of the run (the first request of a workload arrives at 0.0).
    prompt_token_ids: the prompt, `prompt_len` token ids.
    max_tokens: how many tokens to generate (the trace's output length, after clamping).
    priority: its class: 0 interactive, 1 batch (`PRIORITY_CLASSES`).
    client: who sent it ("" when the workload has no clients).
  """
  request_id: str
  arrival_time: float
  prompt_token_ids: tuple[int, ...]
  max_tokens: int
  priority: int = 0
  client: str = ""

  @property
  def prompt_len(self) -> int:
    """Prompt length in tokens."""
    return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A replayable workload: requests sorted by arrival plus how they were made.

  Attributes:
    name: a label for reports (the config's name, or the kind).
    requests: sorted by `arrival_time` (ties keep trace order).
    num_clamped: how many requests had a length changed to fit the model context or the caps.
    mean_rate: mean arrival rate in requests/s, (n - 1) / (last arrival - first arrival); 0.0 with fewer than
      two requests or when all arrive at once.
    source: the trace file read, or None for synthetic workloads.
  """
  name: str
  requests: tuple[WorkloadRequest, ...]
  num_clamped: int
  mean_rate: float
  source: str | None = None

  def __len__(self) -> int:
    return len(self.requests)

  def __iter__(self):
    return iter(self.requests)

  @property
  def duration(self) -> float:
    """Seconds from the first arrival to the last."""
    if not self.requests:
      return 0.0
    return self.requests[-1].arrival_time - self.requests[0].arrival_time

  @property
  def total_prompt_tokens(self) -> int:
    return sum(r.prompt_len for r in self.requests)

  @property
  def total_output_tokens(self) -> int:
    return sum(r.max_tokens for r in self.requests)


def mean_rate(arrival_times: np.ndarray) -> float:
  """Mean arrival rate of sorted arrival times.

  Args:
    arrival_times: [N] seconds, sorted.

  Returns:
    (N - 1) / (last - first) in requests/s; 0.0 when N < 2 or the span is zero.
  """
  if len(arrival_times) < 2:
    return 0.0
  span = float(arrival_times[-1] - arrival_times[0])
  return (len(arrival_times) - 1) / span if span > 0 else 0.0
