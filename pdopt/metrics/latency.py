"""Per-request latencies from a `RequestRecord`: TTFT, TPOT, every inter-token gap, end-to-end latency."""

from __future__ import annotations

import dataclasses
import operator

from pdopt.metrics.records import RequestRecord


@dataclasses.dataclass(frozen=True)
class RequestLatency:
  """Latencies of one request, in seconds; None where the record lacks the timestamps.

  Attributes:
    request_id: the request's id.
    ttft: time to first token, first_token_time - arrival_time.
    tpot: time per output token after the first, (e2el - ttft) / (output_len - 1); None when
      output_len <= 1 (undefined) or a time is missing.
    itls: every inter-token gap, the differences of consecutive token_times (output_len - 1 of them).
    e2el: end-to-end latency, finish_time - arrival_time.
  """
  request_id: str
  ttft: float | None
  tpot: float | None
  itls: tuple[float, ...]
  e2el: float | None


def request_latency(record: RequestRecord) -> RequestLatency:
  """Computes the latencies of one request (any status; the aggregates use finished requests only).

  Args:
    record: the request's timestamps (seconds).

  Returns:
    Its latencies in seconds.
  """
  ttft = None if record.first_token_time is None else record.first_token_time - record.arrival_time
  e2el = None if record.finish_time is None else record.finish_time - record.arrival_time
  tpot = None
  if ttft is not None and e2el is not None and record.output_len > 1:
    tpot = (e2el - ttft) / (record.output_len - 1)
  times = record.token_times
  itls = tuple(map(operator.sub, times[1:], times))  # times[i + 1] - times[i], at C speed (one per token).
  return RequestLatency(request_id=record.request_id, ttft=ttft, tpot=tpot, itls=itls, e2el=e2el)
