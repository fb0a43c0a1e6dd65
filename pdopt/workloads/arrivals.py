"""Arrival processes: when requests arrive, in seconds from the start of the run.

A renewal process draws i.i.d. gaps between arrivals. Poisson: exponential gaps (coefficient of variation 1).
Gamma: gaps of shape k = 1 / cv**2 and mean 1 / rate, so cv > 1 is burstier than Poisson and cv < 1 smoother;
cv = 1 is exactly the exponential. vLLM's `--burstiness` is the shape k, i.e. 1 / cv**2.

The first request arrives at 0.0 and each later one after a gap, as vLLM's benchmark sends them, so n arrivals
span n - 1 gaps and (n - 1) / span estimates the rate without bias.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

ArrivalProcess = Literal["poisson", "gamma"]
ARRIVAL_PROCESSES: tuple[str, ...] = get_args(ArrivalProcess)


def check_arrival_process(process: str) -> None:
  """Raises ValueError listing the valid names when `process` is not one of them."""
  if process not in ARRIVAL_PROCESSES:
    raise ValueError(f"unknown arrival process {process!r}; valid: {list(ARRIVAL_PROCESSES)}")


def arrival_times(num_requests: int, rate: float, process: ArrivalProcess = "poisson", cv: float = 1.0,
                  seed: int | np.random.Generator = 0) -> np.ndarray:
  """Draws arrival times of a renewal process.

  Args:
    num_requests: N >= 0 arrivals to draw.
    rate: mean arrival rate in requests/s (> 0).
    process: "poisson" (exponential gaps; `cv` must be 1) or "gamma" (gamma gaps with coefficient of variation
      `cv`).
    cv: coefficient of variation of the gaps (std / mean, > 0); 1 is Poisson, larger is burstier.
    seed: an int seed or a numpy Generator.

  Returns:
    [N] float64 non-decreasing arrival times in seconds, the first at 0.0.

  Raises:
    ValueError: an unknown process, rate <= 0, cv <= 0, cv != 1 with "poisson", or N < 0.
  """
  check_arrival_process(process)
  if not rate > 0 or not np.isfinite(rate):
    raise ValueError(f"rate must be a positive number of requests/s, got {rate!r}")
  if not cv > 0 or not np.isfinite(cv):
    raise ValueError(f"cv must be positive, got {cv!r}")
  if process == "poisson" and cv != 1.0:
    raise ValueError(f"cv={cv!r} needs process='gamma' (a Poisson process has cv 1)")
  if num_requests < 0:
    raise ValueError(f"num_requests must be >= 0, got {num_requests!r}")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  if num_requests == 0:
    return np.zeros((0,), np.float64)
  if process == "poisson":
    gaps = rng.exponential(1.0 / rate, size=num_requests - 1)
  else:
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num_requests - 1)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def scale_to_rate(times: np.ndarray, rate: float) -> np.ndarray:
  """Rebases sorted arrival times to start at 0 and stretches them to a mean rate, keeping their shape.

  Args:
    times: [N] sorted arrival times in seconds.
    rate: target mean rate in requests/s (> 0), as (N - 1) / span.

  Returns:
    [N] float64 seconds from the first arrival; unchanged gaps (only rebased) when N < 2 or the span is zero.

  Raises:
    ValueError: rate <= 0.
  """
  if not rate > 0 or not np.isfinite(rate):
    raise ValueError(f"rate must be a positive number of requests/s, got {rate!r}")
  times = np.asarray(times, np.float64)
  if times.size == 0:
    return times.copy()
  rebased = times - times[0]
  span = rebased[-1]
  if times.size < 2 or span <= 0:
    return rebased
  return rebased * ((times.size - 1) / span / rate)
