"""Aggregate serving metrics under the names of vLLM's `benchmark_serving`.

As in vLLM, latency statistics and token totals cover finished requests only; aborted and rejected requests
count as `failed` and as SLO misses. Statistics use numpy (population std, linearly interpolated
percentiles). An empty set of values gives 0.0 for every statistic (vLLM's convention), never NaN, so the
result always serializes to strict JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from pdopt.metrics.latency import request_latency
from pdopt.metrics.records import RequestRecord
from pdopt.metrics.slo import Slo, parse_slo

LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
STATISTICS: tuple[str, ...] = ("mean", "median", "std", "p50", "p90", "p99")


@dataclasses.dataclass(frozen=True)
class ServingMetrics:
  """Results of one run (one policy on one workload).

  Counts are requests or tokens; `duration` is seconds; throughputs are per second of `duration`; latency
  statistics are milliseconds over finished requests (`itl` over every inter-token gap of them).

  Attributes:
    num_requests: all requests submitted.
    completed: finished requests.
    failed: aborted + rejected.
    aborted, rejected: the two kinds of failure.
    total_input_tokens, total_output_tokens: prompt and generated tokens of finished requests.
    duration: seconds from the first arrival to the last event of any request (or as given).
    request_throughput: completed / duration (req/s).
    output_throughput: total_output_tokens / duration (tok/s).
    total_token_throughput: (total_input_tokens + total_output_tokens) / duration (tok/s).
    request_goodput: requests meeting every SLO / duration (req/s); with no SLO, finished requests not
      flagged `slo_miss`.
    slo_attainment: requests meeting every SLO / num_requests (fraction; 0.0 with no requests).
    slo: the SLO in `--goodput` form ("" for none).
    {mean,median,std,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms: latency statistics (ms); 0.0 with no values.
  """
  num_requests: int
  completed: int
  failed: int
  aborted: int
  rejected: int
  total_input_tokens: int
  total_output_tokens: int
  duration: float
  request_throughput: float
  output_throughput: float
  total_token_throughput: float
  request_goodput: float
  slo_attainment: float
  slo: str
  mean_ttft_ms: float
  median_ttft_ms: float
  std_ttft_ms: float
  p50_ttft_ms: float
  p90_ttft_ms: float
  p99_ttft_ms: float
  mean_tpot_ms: float
  median_tpot_ms: float
  std_tpot_ms: float
  p50_tpot_ms: float
  p90_tpot_ms: float
  p99_tpot_ms: float
  mean_itl_ms: float
  median_itl_ms: float
  std_itl_ms: float
  p50_itl_ms: float
  p90_itl_ms: float
  p99_itl_ms: float
  mean_e2el_ms: float
  median_e2el_ms: float
  std_e2el_ms: float
  p50_e2el_ms: float
  p90_e2el_ms: float
  p99_e2el_ms: float


def latency_stats(values_s: Sequence[float]) -> dict[str, float]:
  """Mean, median, std and percentiles of latencies.

  Args:
    values_s: latencies in seconds.

  Returns:
    {"mean", "median", "std", "p50", "p90", "p99"} in milliseconds; all 0.0 when `values_s` is empty.
  """
  if len(values_s) == 0:
    return {s: 0.0 for s in STATISTICS}
  ms = np.asarray(values_s, np.float64) * 1e3
  p50, p90, p99 = np.percentile(ms, [50, 90, 99])
  return {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
          "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def run_duration(records: Sequence[RequestRecord]) -> float:
  """Seconds from the first arrival to the last timestamp of any request; 0.0 with no records."""
  if not records:
    return 0.0
  start = min(r.arrival_time for r in records)
  end = max(max(t for t in (r.arrival_time, r.first_scheduled_time, r.first_token_time, r.finish_time,
                            r.token_times[-1] if r.token_times else None) if t is not None)
            for r in records)
  return end - start


def compute_metrics(records: Sequence[RequestRecord], slo: str | Mapping[str, float] | Slo | None = None,
                    duration: float | None = None,
                    class_slos: Mapping[int, str | Mapping[str, float] | Slo] | None = None) -> ServingMetrics:
  """Aggregates a run's request records.

  Args:
    records: every request submitted in the run, whatever its status.
    slo: the SLO for goodput and attainment ("ttft:2000 tpot:100", ms; see `parse_slo`), or None.
    duration: the run's length in seconds; None measures it from the records (`run_duration`).
    class_slos: {priority: SLO} for classes judged against their own SLO (e.g. {1: "e2el:600000"} for batch
      requests); the others are judged against `slo`. `slo` in the result names `slo` alone.

  Returns:
    The metrics; throughputs are 0.0 when the duration is 0.

  Raises:
    ValueError: a bad SLO (named) or a negative duration.
  """
  bounds = parse_slo(slo)
  class_bounds = {int(k): parse_slo(v) for k, v in (class_slos or {}).items()}
  if duration is None:
    duration = run_duration(records)
  if duration < 0:
    raise ValueError(f"duration must be >= 0 seconds, got {duration!r}")

  series: dict[str, list[float]] = {m: [] for m in LATENCY_METRICS}
  completed = aborted = rejected = good = 0
  total_input = total_output = 0
  for record in records:
    latency = request_latency(record)
    good += class_bounds.get(record.priority, bounds).met_by(record, latency)
    if record.status == "aborted":
      aborted += 1
    elif record.status == "rejected":
      rejected += 1
    else:
      completed += 1
      total_input += record.prompt_len
      total_output += record.output_len
      series["ttft"].append(latency.ttft)
      series["e2el"].append(latency.e2el)
      series["itl"].extend(latency.itls)
      if latency.tpot is not None:
        series["tpot"].append(latency.tpot)

  def per_second(x: float) -> float:
    return x / duration if duration > 0 else 0.0

  stats = {}
  for metric, values in series.items():
    for stat, value in latency_stats(values).items():
      stats[f"{stat}_{metric}_ms"] = value
  return ServingMetrics(
      num_requests=len(records), completed=completed, failed=aborted + rejected, aborted=aborted,
      rejected=rejected, total_input_tokens=total_input, total_output_tokens=total_output,
      duration=float(duration), request_throughput=per_second(completed),
      output_throughput=per_second(total_output), total_token_throughput=per_second(total_input + total_output),
      request_goodput=per_second(good), slo_attainment=good / len(records) if records else 0.0,
      slo=str(bounds), **stats)


def metrics_to_dict(metrics: ServingMetrics) -> dict[str, Any]:
  """The metrics as a flat JSON-serializable dict under vLLM's names (plus pdopt's few extra keys)."""
  return dataclasses.asdict(metrics)


def metrics_from_dict(d: Mapping[str, Any]) -> ServingMetrics:
  """Reads back `metrics_to_dict` output (e.g. from metrics.json); unknown keys are ignored.

  Raises:
    ValueError: a missing key, named.
  """
  names = [f.name for f in dataclasses.fields(ServingMetrics)]
  missing = [n for n in names if n not in d]
  if missing:
    raise ValueError(f"metrics dict lacks keys {missing}")
  return ServingMetrics(**{n: d[n] for n in names})
