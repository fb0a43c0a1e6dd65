"""Service-level objectives written as vLLM's and SGLang's `--goodput`: `"ttft:2000 tpot:100"` (ms).

A request meets the SLO when it finished and each named latency is at most its bound (inclusive, as vLLM).
As in vLLM, a single-token output has TPOT 0 for this test (its TPOT is otherwise undefined). Bounds get
1 ns of slack so that float rounding of timestamp differences (1.3 - 1.0 > 0.3) does not decide a tie.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Mapping, get_args

from pdopt.metrics.latency import RequestLatency
from pdopt.metrics.records import RequestRecord

SloMetric = Literal["ttft", "tpot", "e2el"]
SLO_METRICS: tuple[str, ...] = get_args(SloMetric)
_SLACK_MS = 1e-6


@dataclasses.dataclass(frozen=True)
class Slo:
  """Latency bounds in milliseconds; None leaves that latency unconstrained.

  Attributes:
    ttft_ms: bound on time to first token.
    tpot_ms: bound on time per output token (after the first).
    e2el_ms: bound on end-to-end latency.
  """
  ttft_ms: float | None = None
  tpot_ms: float | None = None
  e2el_ms: float | None = None

  def __post_init__(self):
    for key in SLO_METRICS:
      value = getattr(self, f"{key}_ms")
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"SLO {key}:{value!r} must be a finite number of milliseconds >= 0")

  @property
  def is_empty(self) -> bool:
    return all(getattr(self, f"{k}_ms") is None for k in SLO_METRICS)

  def __str__(self) -> str:
    """The `--goodput` spelling, e.g. "ttft:2000 tpot:100"; "" when empty."""
    return " ".join(f"{k}:{getattr(self, f'{k}_ms'):g}" for k in SLO_METRICS
                    if getattr(self, f"{k}_ms") is not None)

  def met_by(self, record: RequestRecord, latency: RequestLatency) -> bool:
    """Whether the request finished within every bound (never for unfinished or `slo_miss` requests)."""
    if record.status != "finished" or record.slo_miss:
      return False
    # A finished record always has its first token and finish time, so ttft and e2el are set.
    values = {"ttft": latency.ttft, "tpot": latency.tpot if latency.tpot is not None else 0.0,
              "e2el": latency.e2el}
    return all(getattr(self, f"{k}_ms") is None or values[k] * 1e3 <= getattr(self, f"{k}_ms") + _SLACK_MS
               for k in SLO_METRICS)


def parse_slo(spec: str | Mapping[str, float] | Slo | None) -> Slo:
  """Reads an SLO.

  Args:
    spec: "KEY:MS" pairs separated by spaces or commas ("ttft:2000 tpot:100"), a mapping {"ttft": 2000.0},
      an `Slo`, or None / "" for no SLO. Keys: ttft, tpot, e2el; values in milliseconds.

  Returns:
    The SLO.

  Raises:
    ValueError: an unknown key (valid ones listed), a repeated key, a malformed pair or a value that is not a
      number >= 0, named.
  """
  if spec is None:
    return Slo()
  if isinstance(spec, Slo):
    return spec
  if isinstance(spec, str):
    pairs: list[tuple[str, str]] = []
    for item in re.split(r"[\s,]+", spec.strip()):
      if not item:
        continue
      key, sep, value = item.partition(":")
      if not sep or not key or not value or ":" in value:
        raise ValueError(f"malformed SLO item {item!r}: expected KEY:MILLISECONDS such as 'ttft:2000'")
      pairs.append((key.strip(), value.strip()))
  else:
    pairs = [(str(k), v) for k, v in spec.items()]
  bounds: dict[str, float] = {}
  for key, value in pairs:
    if key not in SLO_METRICS:
      raise ValueError(f"unknown SLO metric {key!r}; valid: {list(SLO_METRICS)}")
    if key in bounds:
      raise ValueError(f"SLO metric {key!r} given twice")
    try:
      ms = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"SLO {key}:{value!r} is not a number of milliseconds") from None
    if not (math.isfinite(ms) and ms >= 0):
      raise ValueError(f"SLO {key}:{value!r} must be a finite number of milliseconds >= 0")
    bounds[key] = ms
  return Slo(**{f"{k}_ms": v for k, v in bounds.items()})
