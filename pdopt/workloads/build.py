"""`make_workload`: config in, replayable `Workload` out.

Each kind has one builder that yields rows (trace row ids, lengths and, for Azure, timestamps); the shared
tail selects the slice, sets arrival times, clamps lengths to the model context and materializes prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pdopt.workloads import arrivals
from pdopt.workloads import lengths
from pdopt.workloads import prompts
from pdopt.workloads import traces
from pdopt.workloads.config import WORKLOAD_KINDS, WorkloadConfig, WorkloadKind
from pdopt.workloads.request import Workload, WorkloadRequest, mean_rate

# Independent random streams of the config's seed.
_ARRIVAL_STREAM = 0
_PROMPT_LEN_STREAM = 1
_OUTPUT_LEN_STREAM = 2
_CLASS_STREAM = 3
_CLIENT_STREAM = 4


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Selected rows, in arrival order when timestamps exist. All arrays [N]."""
  row_ids: np.ndarray
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  times: np.ndarray | None  # Real trace seconds, or None.
  source: str | None


def _select(config: WorkloadConfig, n: int) -> slice:
  """The `start` / `num_requests` slice of n rows; an empty one is an error naming the values."""
  stop = n if config.num_requests is None else min(n, config.start + config.num_requests)
  if config.start >= stop:
    raise ValueError(f"empty slice: start={config.start}, num_requests={config.num_requests} of {n} rows"
                     + (f" in time_window={config.time_window}" if config.time_window else ""))
  return slice(config.start, stop)


def _azure_rows(config: WorkloadConfig) -> _Rows:
  trace = traces.load_azure_trace(config.path or traces.AZURE_CONV_TRACE)
  order = np.argsort(trace.arrival_times, kind="stable")
  times = trace.arrival_times[order] - trace.arrival_times[order[0]] if len(order) else trace.arrival_times
  if config.time_window is not None:
    t0, t1 = config.time_window
    keep = (times >= t0) & (times < t1)
    order, times = order[keep], times[keep]
  s = _select(config, len(order))
  order = order[s]
  return _Rows(order, trace.prompt_lens[order], trace.output_lens[order], times[s], str(trace.path))


def _lengths_rows(config: WorkloadConfig) -> _Rows:
  trace = traces.load_lengths_trace(config.path or traces.ARXIV_LENGTHS_TRACE)
  s = _select(config, len(trace))
  rows = np.arange(len(trace))[s]
  return _Rows(rows, trace.prompt_lens[s], trace.output_lens[s], None, str(trace.path))


def _synthetic_rows(config: WorkloadConfig) -> _Rows:
  n = config.num_requests
  seed = config.seed
  p = lengths.synthetic_lengths(n, config.prompt_len, config.length_distribution, config.range_ratio,
                                np.random.default_rng([seed, _PROMPT_LEN_STREAM]))
  o = lengths.synthetic_lengths(n, config.output_len, config.length_distribution, config.range_ratio,
                                np.random.default_rng([seed, _OUTPUT_LEN_STREAM]))
  return _Rows(np.arange(n), p, o, None, None)


_BUILDERS: dict[WorkloadKind, Callable[[WorkloadConfig], _Rows]] = {
    "azure": _azure_rows,
    "lengths": _lengths_rows,
    "synthetic": _synthetic_rows,
}
assert set(_BUILDERS) == set(WORKLOAD_KINDS)


def make_workload(config: WorkloadConfig, *, max_model_len: int, vocab_size: int) -> Workload:
  """Builds a workload: selects rows, sets arrival times, clamps lengths, materializes prompts.

  Args:
    config: what to build (validated when it was constructed).
    max_model_len: the model context in tokens; every request gets prompt_len + max_tokens <= max_model_len.
    vocab_size: prompt ids are drawn from [config.low_token_id, vocab_size).

  Returns:
    The workload, requests sorted by arrival time (seconds, the first at 0.0), `num_clamped` counting those
    whose lengths were changed to fit.

  Raises:
    ValueError: a missing or malformed trace file, an empty slice, or a bad model size, named.
  """
  if config.kind not in _BUILDERS:  # Configs are validated, but a replaced field is not.
    raise ValueError(f"unknown workload kind {config.kind!r}; valid: {list(WORKLOAD_KINDS)}")
  if not config.low_token_id < vocab_size:
    raise ValueError(f"low_token_id={config.low_token_id} leaves no ids below vocab_size={vocab_size}")
  rows = _BUILDERS[config.kind](config)
  n = len(rows.row_ids)

  process = config.arrival_process
  if process == "trace":
    times = arrivals.scale_to_rate(rows.times, config.rate) if config.rate else rows.times - rows.times[0]
  else:
    times = arrivals.arrival_times(n, config.rate, process, config.cv,
                                   np.random.default_rng([config.seed, _ARRIVAL_STREAM]))

  p, o, num_clamped = lengths.clamp_lengths(rows.prompt_lens, rows.output_lens, max_model_len,
                                            config.max_prompt_len, config.max_output_len)
  ids = prompts.materialize_prompts(p, vocab_size, config.seed, config.low_token_id,
                                    config.shared_prefix_fraction, config.num_shared_prefixes,
                                    config.shared_prefix_len)
  name = config.name or config.kind
  order = np.argsort(times, kind="stable")
  batch = np.random.default_rng([config.seed, _CLASS_STREAM]).random(n) < config.batch_fraction
  if config.batch_min_prompt_len is not None:
    batch |= p >= config.batch_min_prompt_len
  clients = [""] * n
  if config.num_clients:
    weights = 1.0 / np.arange(1, config.num_clients + 1) ** config.client_skew
    rng = np.random.default_rng([config.seed, _CLIENT_STREAM])
    drawn = rng.choice(config.num_clients, n, p=weights / weights.sum())
    clients = [f"client-{int(c)}" for c in drawn]
  requests = tuple(
      WorkloadRequest(request_id=f"{name}-{int(rows.row_ids[i])}", arrival_time=float(times[i]),
                      prompt_token_ids=ids[i], max_tokens=int(o[i]), priority=int(batch[i]), client=clients[i])
      for i in order)
  return Workload(name=name, requests=requests, num_clamped=num_clamped, mean_rate=mean_rate(times[order]),
                  source=rows.source)
