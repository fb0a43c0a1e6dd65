"""Replays a workload against one engine, the way `benchmark_serving` drives a server.

The replay owns the arrival schedule; the engine owns everything else:

* Time starts when `replay` is called (`start = engine.clock()`). A request whose trace time is `t` is
  submitted once the engine clock passes `start + t`, with `arrival_time=start + t`, so the time it spends
  queued behind a busy engine counts in its TTFT even though it was handed over late.
* While the engine has work it steps back to back, as fast as it can (one `advance()` per loop turn, new
  arrivals submitted between steps). When it is idle and the next arrival is in the future, the replay
  sleeps until then, on the real clock or on a `VirtualClock` (tests).
* Every workload request ends exactly once in `ReplayResult.records`, in workload order: the engine's
  own record (finished, aborted, or rejected with its reason), or, for a request the engine refused at
  submission (`ValueError`: a bad prompt or length, or more pages than the pool), a "rejected" record carrying
  the error as its reason.
  A replay cut short by `max_duration` aborts what is left, with a reason. Nothing is silently dropped.

Greedy sampling with `ignore_eos` replays the trace's output lengths exactly (vLLM's `--ignore-eos`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import tqdm

from pdopt.engine.engine import Engine
from pdopt.engine.request import SamplingParams
from pdopt.metrics import RequestRecord
from pdopt.workloads import Workload, WorkloadRequest


@dataclasses.dataclass(frozen=True)
class ReplayResult:
  """What one replay produced.

  Attributes:
    records: one record per workload request, in workload order (arrival times on the engine clock).
    outputs: request id -> generated token ids (requests the engine accepted).
    start: the engine-clock time the replay started (s); trace time 0.
    duration: seconds from `start` until every request had ended, by the engine clock (vLLM's benchmark
      duration, the denominator of the throughputs).
    num_steps: engine steps taken during the replay.
    num_preemptions: preemptions during the replay.
    num_compilations: step shapes compiled during the replay (0 after a complete warm-up).
    num_rejected_at_submit: requests `add_request` refused with a ValueError.
    num_aborted_at_deadline: requests aborted (or never submitted) because `max_duration` passed.
  """
  records: tuple[RequestRecord, ...]
  outputs: dict[str, tuple[int, ...]]
  start: float
  duration: float
  num_steps: int
  num_preemptions: int
  num_compilations: int
  num_rejected_at_submit: int
  num_aborted_at_deadline: int


def sampling_params(request: WorkloadRequest, *, temperature: float = 0.0, ignore_eos: bool = True,
                    seed: int | None = None) -> SamplingParams:
  """The sampling parameters a replay uses for one request: its trace output length, greedy by default."""
  return SamplingParams(max_tokens=request.max_tokens, temperature=temperature, ignore_eos=ignore_eos, seed=seed)


def replay(engine: Engine, workload: Workload, *, progress: bool = True, desc: str | None = None,
           temperature: float = 0.0, ignore_eos: bool = True, max_duration: float | None = None,
           sleep: Callable[[float], None] | None = None) -> ReplayResult:
  """Replays `workload` against `engine` in (engine-clock) real time.

  Args:
    engine: a fresh engine (warmed up if the replay is timed); its request ids must not collide with the
      workload's.
    workload: requests with arrival times relative to the start (s).
    progress: show a tqdm progress bar of ended requests (on stderr).
    desc: the progress bar's label.
    temperature: sampling temperature for every request (0 is greedy, what benchmarks use).
    ignore_eos: generate exactly the trace's output length.
    max_duration: seconds after the start at which whatever has not ended is aborted (with a reason);
      None waits for everything.
    sleep: how to wait for the next arrival when idle; defaults to the clock's own `sleep` (a
      `VirtualClock`) or `time.sleep`.

  Returns:
    The `ReplayResult`; `records` holds exactly one record per workload request.
  """
  clock = engine.clock
  if sleep is None:
    sleep = getattr(clock, "sleep", time.sleep)
  steps0, preemptions0 = engine.num_steps, engine.num_preemptions
  compilations0 = engine.num_compilations
  # Each entry is an engine request id (str) or a record made here (submission refused, deadline).
  slots: list[str | RequestRecord] = []
  in_engine: set[str] = set()
  num_refused = num_deadline = 0
  next_index = 0
  requests = workload.requests
  bar = tqdm.tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)

  def ended(request_id: str) -> None:
    if request_id in in_engine:
      in_engine.discard(request_id)
      bar.update(1)

  start = clock()
  try:
    while next_index < len(requests) or engine.has_unfinished():
      now = clock()
      while next_index < len(requests) and start + requests[next_index].arrival_time <= now:
        request = requests[next_index]
        next_index += 1
        arrival = start + request.arrival_time
        try:
          rid = engine.add_request(request.prompt_token_ids,
                                   sampling_params(request, temperature=temperature, ignore_eos=ignore_eos),
                                   request_id=request.request_id, arrival_time=arrival,
                                   priority=request.priority, client=request.client)
        except ValueError as e:
          num_refused += 1
          slots.append(RequestRecord(request_id=request.request_id, prompt_len=request.prompt_len, output_len=0,
                                     arrival_time=arrival, finish_time=max(arrival, clock()), status="rejected",
                                     reason=f"refused at submission: {e}", slo_miss=True,
                                     priority=request.priority, client=request.client))
          bar.update(1)
          continue
        slots.append(rid)
        in_engine.add(rid)
      if max_duration is not None and now - start >= max_duration:
        num_deadline += _abort_rest(engine, requests[next_index:], start, now, slots, ended)
        next_index = len(requests)
        break
      if engine.has_unfinished():
        for req in engine.advance():  # The engine's own requests (no outputs built: only their ends count here).
          if req.status.done:
            ended(req.request_id)
      elif next_index < len(requests):
        wait = start + requests[next_index].arrival_time - clock()
        if wait > 0:
          sleep(wait)
  finally:
    bar.close()
  end = clock()

  engine_records = {r.request_id: r for r in engine.records()}
  records = tuple(engine_records[s] if isinstance(s, str) else s for s in slots)
  outputs = {s: tuple(engine.requests[s].output_token_ids) for s in slots if isinstance(s, str)}
  if len(records) != len(requests):
    raise AssertionError(f"replay lost requests: {len(requests)} in the workload, {len(records)} records")
  return ReplayResult(
      records=records, outputs=outputs, start=start,
      duration=end - start, num_steps=engine.num_steps - steps0,
      num_preemptions=engine.num_preemptions - preemptions0,
      num_compilations=engine.num_compilations - compilations0, num_rejected_at_submit=num_refused,
      num_aborted_at_deadline=num_deadline)


def _abort_rest(engine: Engine, unsubmitted, start: float, now: float, slots: list, ended) -> int:
  """Ends everything still open at the replay deadline; returns how many requests that was."""
  reason = "replay deadline passed"
  count = 0
  for rid in [r for r in (*engine.waiting, *engine.running)]:
    if engine.abort(rid):  # The engine records the reason as "abort".
      ended(rid)
      count += 1
  for request in unsubmitted:
    arrival = start + request.arrival_time
    slots.append(RequestRecord(request_id=request.request_id, prompt_len=request.prompt_len, output_len=0,
                               arrival_time=arrival, finish_time=max(arrival, now), status="aborted",
                               reason=f"{reason} before it was submitted", slo_miss=True,
                               priority=request.priority, client=request.client))
    count += 1
  return count
