"""`WorkloadConfig`: one small frozen description of a workload, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from pdopt.workloads import lengths

WorkloadKind = Literal["azure", "lengths", "synthetic"]
WORKLOAD_KINDS: tuple[str, ...] = get_args(WorkloadKind)

# "trace" replays the trace's own timestamps (Azure only); the others draw arrivals from a process.
Arrival = Literal["trace", "poisson", "gamma"]
ARRIVALS: tuple[str, ...] = get_args(Arrival)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  """What workload to build; model-dependent sizes (context, vocabulary) are arguments of `make_workload`.

  Attributes:
    kind: "azure" (Azure trace: timestamps and lengths), "lengths" (length-only trace such as arXiv, arrivals
      from a process), "synthetic" (drawn lengths, arrivals from a process).
    name: label for reports and request ids; defaults to `kind`.
    path: trace file for "azure" / "lengths" (absolute, or relative to the working directory or the repo);
      None takes the trace in `data/traces/`. Must be None for "synthetic".
    start: first trace row (in arrival order for "azure") to use.
    num_requests: how many requests (rows from `start`; all the rest when None). Required for "synthetic".
    time_window: (t0, t1) seconds of real trace time since the trace's first row; "azure" keeps rows with
      t0 <= t < t1 before `start` / `num_requests` apply.
    rate: mean arrival rate in requests/s. "azure" with "trace" arrivals: the trace's timestamps are scaled to
      this rate, None keeps real time. Otherwise the rate of the arrival process (required).
    arrival: "trace" (Azure timestamps), "poisson" or "gamma"; None means "trace" for "azure", else "poisson".
    cv: coefficient of variation of gamma inter-arrival gaps (1 is Poisson; > 1 burstier).
    prompt_len, output_len: synthetic lengths in tokens (the centre of the range when uniform).
    length_distribution: synthetic "fixed" or "uniform".
    range_ratio: synthetic uniform half-width relative to the length, in [0, 1].
    max_prompt_len, max_output_len: optional caps in tokens, applied with the context clamp.
    seed: seeds arrivals, synthetic lengths and prompt ids.
    low_token_id: prompt ids are drawn from [low_token_id, vocab_size), keeping special ids out.
    shared_prefix_fraction, num_shared_prefixes, shared_prefix_len: that fraction of requests start with one
      of the shared prefixes of that many tokens (prefix-cache experiments).
    batch_fraction: that fraction of requests, drawn at random, are of the batch class (priority 1); the rest
      are interactive (priority 0).
    batch_min_prompt_len: requests with prompts of at least this many tokens are batch too (None: none by length).
    num_clients: requests come from this many clients ("client-0", ...; 0: none), drawn with a Zipf-like skew
      `client_skew` (0: uniform; 1: client k sends in proportion to 1 / (k + 1)).
  """
  kind: WorkloadKind = "synthetic"
  name: str | None = None
  path: str | None = None
  start: int = 0
  num_requests: int | None = None
  time_window: tuple[float, float] | None = None
  rate: float | None = None
  arrival: Arrival | None = None
  cv: float = 1.0
  prompt_len: int = 128
  output_len: int = 128
  length_distribution: lengths.LengthDistribution = "fixed"
  range_ratio: float = 0.0
  max_prompt_len: int | None = None
  max_output_len: int | None = None
  seed: int = 0
  low_token_id: int = 0
  shared_prefix_fraction: float = 0.0
  num_shared_prefixes: int = 1
  shared_prefix_len: int = 0
  batch_fraction: float = 0.0
  batch_min_prompt_len: int | None = None
  num_clients: int = 0
  client_skew: float = 0.0

  def __post_init__(self):
    if self.kind not in WORKLOAD_KINDS:
      raise ValueError(f"unknown workload kind {self.kind!r}; valid: {list(WORKLOAD_KINDS)}")
    if self.arrival is not None and self.arrival not in ARRIVALS:
      raise ValueError(f"unknown arrival {self.arrival!r}; valid: {list(ARRIVALS)}")
    if self.arrival_process == "trace" and self.kind != "azure":
      raise ValueError(f"arrival='trace' needs timestamps, which only kind='azure' has (kind={self.kind!r})")
    if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
      raise ValueError(f"rate must be a positive number of requests/s or None, got {self.rate!r}")
    if self.rate is None and self.arrival_process != "trace":
      raise ValueError(f"kind={self.kind!r} with arrival={self.arrival_process!r} needs a rate (requests/s)")
    if not (self.cv > 0 and math.isfinite(self.cv)):
      raise ValueError(f"cv must be positive, got {self.cv!r}")
    if self.arrival_process == "poisson" and self.cv != 1.0:
      raise ValueError(f"cv={self.cv!r} needs arrival='gamma' (a Poisson process has cv 1)")
    if self.start < 0:
      raise ValueError(f"start must be >= 0, got {self.start!r}")
    if self.num_requests is not None and self.num_requests < 1:
      raise ValueError(f"num_requests must be >= 1 or None, got {self.num_requests!r}")
    if self.kind == "synthetic":
      if self.num_requests is None:
        raise ValueError("kind='synthetic' needs num_requests")
      if self.path is not None:
        raise ValueError(f"kind='synthetic' reads no file, got path={self.path!r}")
    if self.time_window is not None:
      if self.kind != "azure":
        raise ValueError(f"time_window needs timestamps, which only kind='azure' has (kind={self.kind!r})")
      window = tuple(float(t) for t in self.time_window)
      if len(window) != 2 or not 0 <= window[0] < window[1]:
        raise ValueError(f"time_window must be (t0, t1) seconds with 0 <= t0 < t1, got {self.time_window!r}")
      object.__setattr__(self, "time_window", window)  # ml_collections hands lists.
    if self.length_distribution not in lengths.LENGTH_DISTRIBUTIONS:
      raise ValueError(f"unknown length_distribution {self.length_distribution!r}; "
                       f"valid: {list(lengths.LENGTH_DISTRIBUTIONS)}")
    for field in ("prompt_len", "output_len"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1 token, got {getattr(self, field)!r}")
    if not 0.0 <= self.range_ratio <= 1.0:
      raise ValueError(f"range_ratio must be in [0, 1], got {self.range_ratio!r}")
    for field in ("max_prompt_len", "max_output_len"):
      value = getattr(self, field)
      if value is not None and value < 1:
        raise ValueError(f"{field} must be >= 1 or None, got {value!r}")
    if self.low_token_id < 0:
      raise ValueError(f"low_token_id must be >= 0, got {self.low_token_id!r}")
    if not 0.0 <= self.shared_prefix_fraction <= 1.0:
      raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {self.shared_prefix_fraction!r}")
    if self.num_shared_prefixes < 1:
      raise ValueError(f"num_shared_prefixes must be >= 1, got {self.num_shared_prefixes!r}")
    if self.shared_prefix_len < 0:
      raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len!r}")
    if not 0.0 <= self.batch_fraction <= 1.0:
      raise ValueError(f"batch_fraction must be in [0, 1], got {self.batch_fraction!r}")
    if self.batch_min_prompt_len is not None and self.batch_min_prompt_len < 1:
      raise ValueError(f"batch_min_prompt_len must be >= 1 or None, got {self.batch_min_prompt_len!r}")
    if self.num_clients < 0:
      raise ValueError(f"num_clients must be >= 0, got {self.num_clients!r}")
    if not (self.client_skew >= 0 and math.isfinite(self.client_skew)):
      raise ValueError(f"client_skew must be >= 0, got {self.client_skew!r}")

  @property
  def arrival_process(self) -> Arrival:
    """The arrival actually used: `arrival`, or its default for the kind."""
    if self.arrival is not None:
      return self.arrival
    return "trace" if self.kind == "azure" else "poisson"
