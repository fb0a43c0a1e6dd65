"""Timing helpers shared by the benchmarks: warm-up, then the median of repeated device-synchronized runs."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_jax(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time of `fn()` in seconds, blocking on its outputs each run.

  Args:
    fn: a no-argument callable returning JAX arrays (usually a jitted function closed over its inputs).
    warmup: untimed runs first (compilation, autotuning).
    iters: timed runs.

  Returns:
    The median time of one call, in seconds.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_torch(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 20) -> float:
  """Median time of `fn()` in seconds, measured with CUDA events (torch must be importable)."""
  import torch  # pylint: disable=import-outside-toplevel

  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return statistics.median(times)
