"""`RequestRecord`: the timestamps of one served request, the only input the metrics read.

The engine (or the simulator) converts its requests to records; metrics never see the engine. All times are
seconds on one clock (any origin: only differences matter).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Literal, get_args

RecordStatus = Literal["finished", "aborted", "rejected"]
RECORD_STATUSES: tuple[str, ...] = get_args(RecordStatus)


@dataclasses.dataclass(frozen=True)
class RequestRecord:
  """How one request went.

  Attributes:
    request_id: the request's id.
    prompt_len: prompt tokens.
    output_len: generated tokens (len(token_times)).
    arrival_time: when it arrived (s).
    first_scheduled_time: when a step first ran part of it (s), or None if it never ran.
    first_token_time: when its first token came out (s), or None if none did.
    token_times: when each generated token came out (s), the first included; non-decreasing.
    finish_time: when it ended (s): last token for finished requests, the abort or rejection time otherwise;
      None if unknown.
    status: "finished" (ran to its end), "aborted" (stopped early) or "rejected" (never served).
    reason: why it was aborted or rejected (required for "rejected"), or the finish reason; None if none.
    slo_miss: the server already judged it an SLO miss (e.g. `slo_aware` gave up on it); metrics count it as
      missing every SLO.
    kv_transfer_bytes: bytes of KV pages moved between instances for it (disaggregated serving; 0 if none).
    kv_transfer_s: seconds the move took (from the decode instance's pull to its arrival), or None.
    priority: its class (0 interactive, 1 batch).
    client: who sent it ("" if unknown).
    decode_stall_s: seconds it spent decoding in steps that also ran prompt tokens, or waiting while such steps
      ran (time behind prefills).

  Raises:
    ValueError: an unknown status (valid ones listed) or inconsistent fields, named.
  """
  request_id: str
  prompt_len: int
  output_len: int
  arrival_time: float
  first_scheduled_time: float | None = None
  first_token_time: float | None = None
  token_times: tuple[float, ...] = ()
  finish_time: float | None = None
  status: RecordStatus = "finished"
  reason: str | None = None
  slo_miss: bool = False
  kv_transfer_bytes: int = 0
  kv_transfer_s: float | None = None
  priority: int = 0
  client: str = ""
  decode_stall_s: float = 0.0

  def __post_init__(self):
    rid = self.request_id
    if self.status not in RECORD_STATUSES:
      raise ValueError(f"request {rid!r}: unknown status {self.status!r}; valid: {list(RECORD_STATUSES)}")
    if self.prompt_len < 0 or self.output_len < 0:
      raise ValueError(f"request {rid!r}: negative length (prompt_len={self.prompt_len}, "
                       f"output_len={self.output_len})")
    # Per-token work at C speed (map, not generator expressions): a trace's records hold millions of tokens.
    object.__setattr__(self, "token_times", tuple(map(float, self.token_times)))
    if len(self.token_times) != self.output_len:
      raise ValueError(f"request {rid!r}: {len(self.token_times)} token_times for output_len={self.output_len}")
    for name in ("arrival_time", "first_scheduled_time", "first_token_time", "finish_time"):
      t = getattr(self, name)
      if t is not None and not math.isfinite(t):
        raise ValueError(f"request {rid!r}: {name}={t!r} is not a finite time")
    if any(map(operator.gt, self.token_times, self.token_times[1:])):
      raise ValueError(f"request {rid!r}: token_times decrease: {self.token_times}")
    if self.token_times and self.first_token_time is None:
      raise ValueError(f"request {rid!r}: has token_times but first_token_time is None")
    if self.first_token_time is not None and self.first_token_time < self.arrival_time:
      raise ValueError(f"request {rid!r}: first_token_time={self.first_token_time} before "
                       f"arrival_time={self.arrival_time}")
    if self.finish_time is not None and self.finish_time < self.arrival_time:
      raise ValueError(f"request {rid!r}: finish_time={self.finish_time} before arrival_time={self.arrival_time}")
    if self.status == "finished":
      if self.output_len < 1 or self.finish_time is None:
        raise ValueError(f"request {rid!r}: a finished request needs output_len >= 1 (got {self.output_len}) "
                         f"and a finish_time (got {self.finish_time})")
      if self.finish_time < self.token_times[-1]:
        raise ValueError(f"request {rid!r}: finish_time={self.finish_time} before its last token "
                         f"{self.token_times[-1]}")
    if self.status == "rejected" and not self.reason:
      raise ValueError(f"request {rid!r}: a rejected request needs a reason")
