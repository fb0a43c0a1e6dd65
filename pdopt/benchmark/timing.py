"""Timing helpers shared by the benchmarks: warm-up, then the median of repeated device-synchronized runs."""

from __future__ import annotations

import collections
import glob
import os
import statistics
import tempfile
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


def time_jax_per_call(fn: Callable[[], Any], *, short: int = 5, long: int = 45, iters: int = 9) -> float:
  """Seconds per call of `fn()` in steady state, by difference: (median wall time of `long` calls queued back
  to back - the same for `short` calls) / (long - short).

  A wall-clock run of n calls also pays once for the first launch and the final synchronization (about
  0.3 ms on the H200 host used so far, even for a plain XLA reduction), which divided by n inflates every
  call: at n = 10 a 250 us kernel read as 280 us. The difference cancels that fixed cost, as CUDA events
  around the calls do for torch (`time_torch`), and keeps any device idle time between calls (a host that
  cannot keep up) in the result.
  """
  def run(n: int) -> float:
    return time_jax(lambda: [fn() for _ in range(n)], warmup=1, iters=iters)

  jax.block_until_ready(fn())
  return max(run(long) - run(short), 0.0) / (long - short)


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


def device_profile(fn: Callable[[], Any], *, calls: int = 10, top: int = 12) -> dict[str, Any] | None:
  """What the accelerator runs for `fn()`, from a `jax.profiler` trace of `calls` back-to-back calls.

  Kernel times come from the device's own timestamps, so unlike wall-clock timing they separate the work
  the device does from the time it waits for the host to launch it.

  Args:
    fn: a no-argument callable returning JAX arrays; called once untraced first.
    calls: calls dispatched back to back inside the trace (blocked on at the end only).
    top: how many kernel names to list.

  Returns:
    None when the trace holds no device activity (a CPU backend); `{"lines": [...]}` when the device
    planes hold no stream lines (the trace's line names, to adapt the reader). Otherwise a dict, per call: `kernels`
    (kernel launches), `busy_us` (time with at least one kernel running), `span_us` (first kernel start to
    last kernel end, divided by `calls`), `idle_us` (span - busy: the device waiting); `top_kernels`,
    the `top` names with the most total time as (name, launches per call, us per call); and `top_host`,
    the same for the host's traced events ("thread: event"; nested events each count their own time).
  """
  from jax._src import profiler as profiler_lib  # pylint: disable=import-outside-toplevel

  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      jax.block_until_ready([fn() for _ in range(calls)])
    paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      return None
    data = profiler_lib.ProfileData.from_file(paths[0])
  spans, lines = [], []
  per_name = collections.defaultdict(lambda: [0, 0.0])
  host = collections.defaultdict(lambda: [0, 0.0])
  for plane in data.planes:
    if plane.name.startswith("/host:"):
      for line in plane.lines:
        for event in line.events:
          host[f"{line.name}: {event.name}"][0] += 1
          host[f"{line.name}: {event.name}"][1] += event.duration_ns
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      lines.append(f"{plane.name} {line.name}")
      if not line.name.startswith("Stream"):  # the others (XLA Ops, Modules, ...) restate the kernels
        continue
      for event in line.events:
        start, duration = event.start_ns, event.duration_ns
        spans.append((start, start + duration))
        per_name[event.name][0] += 1
        per_name[event.name][1] += duration
  if not spans:
    return {"lines": lines} if lines else None
  spans.sort()
  busy, cur_start, cur_end = 0.0, *spans[0]
  for start, end in spans[1:]:
    if start > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  span = max(end for _, end in spans) - spans[0][0]
  def ranked(table):
    return [(name, n / calls, ns / calls / 1e3)
            for name, (n, ns) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]]
  return dict(kernels=len(spans) / calls, busy_us=busy / calls / 1e3, span_us=span / calls / 1e3,
              idle_us=(span - busy) / calls / 1e3, top_kernels=ranked(per_name), top_host=ranked(host))
