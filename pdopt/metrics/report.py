"""Text reports: vLLM's "Serving Benchmark Result" block, a comparison table across policies, and a
per-request table (rows for requests.csv)."""

from __future__ import annotations

import csv
import pathlib
from typing import Any, Mapping, Sequence

from pdopt.metrics.latency import request_latency
from pdopt.metrics.records import RequestRecord
from pdopt.metrics.serving import LATENCY_METRICS, ServingMetrics, metrics_from_dict, metrics_to_dict

_WIDTH = 50  # vLLM's banner width.
_SECTIONS = {  # metric -> (short name, section header), as vLLM prints them.
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
_PERCENTILES = (50, 90, 99)

# Rows of the comparison table: (metrics key, label).
DEFAULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("completed", "completed"),
    ("failed", "failed"),
    ("duration", "duration (s)"),
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("request_goodput", "goodput (req/s)"),
    ("slo_attainment", "SLO attainment"),
    ("median_ttft_ms", "median TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("median_tpot_ms", "median TPOT (ms)"),
    ("p99_tpot_ms", "P99 TPOT (ms)"),
    ("median_itl_ms", "median ITL (ms)"),
    ("p99_itl_ms", "P99 ITL (ms)"),
    ("median_e2el_ms", "median E2EL (ms)"),
    ("p99_e2el_ms", "P99 E2EL (ms)"),
)


def _as_dict(metrics: ServingMetrics | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(metrics, ServingMetrics):
    return metrics_to_dict(metrics)
  return metrics_to_dict(metrics_from_dict(metrics))


def format_benchmark_result(metrics: ServingMetrics | Mapping[str, Any], policy: str | None = None,
                            percentiles: Sequence[int] = (99,),
                            sections: Sequence[str] = LATENCY_METRICS) -> str:
  """Formats one run in the layout of vLLM's `benchmark_serving` result block.

  Args:
    metrics: the run's metrics (or their dict form).
    policy: shown in the banner, " Serving Benchmark Result (chunked) "; None for vLLM's plain banner.
    percentiles: percentile rows per section, among 50, 90, 99 (vLLM prints P99 by default).
    sections: latency sections to print, among "ttft", "tpot", "itl", "e2el".

  Returns:
    The block, lines joined by newlines, without a trailing newline.

  Raises:
    ValueError: an unknown percentile or section, listing the valid ones.
  """
  for p in percentiles:
    if p not in _PERCENTILES:
      raise ValueError(f"unsupported percentile {p!r}; valid: {list(_PERCENTILES)}")
  for s in sections:
    if s not in _SECTIONS:
      raise ValueError(f"unknown section {s!r}; valid: {list(_SECTIONS)}")
  m = _as_dict(metrics)
  title = " Serving Benchmark Result " if policy is None else f" Serving Benchmark Result ({policy}) "
  lines = [f"{title:=^{_WIDTH}}"]

  def row(label: str, value: Any, fmt: str = "") -> None:
    lines.append("{:<40} {:<10}".format(label, format(value, fmt)))

  row("Successful requests:", m["completed"])
  row("Failed requests:", m["failed"])
  row("Benchmark duration (s):", m["duration"], ".2f")
  row("Total input tokens:", m["total_input_tokens"])
  row("Total generated tokens:", m["total_output_tokens"])
  row("Request throughput (req/s):", m["request_throughput"], ".2f")
  if m["slo"]:
    row("SLO (ms):", m["slo"])
    row("Request goodput (req/s):", m["request_goodput"], ".2f")
    row("SLO attainment (%):", 100.0 * m["slo_attainment"], ".2f")
  row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
  row("Total Token throughput (tok/s):", m["total_token_throughput"], ".2f")
  for key in sections:
    name, header = _SECTIONS[key]
    lines.append(f"{header:-^{_WIDTH}}")
    row(f"Mean {name} (ms):", m[f"mean_{key}_ms"], ".2f")
    row(f"Median {name} (ms):", m[f"median_{key}_ms"], ".2f")
    for p in percentiles:
      row(f"P{p} {name} (ms):", m[f"p{p}_{key}_ms"], ".2f")
  lines.append("=" * _WIDTH)
  return "\n".join(lines)


def format_comparison_table(results: Mapping[str, ServingMetrics | Mapping[str, Any]],
                            columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS) -> str:
  """Formats a table with one row per metric and one column per policy.

  Args:
    results: policy name -> its metrics (or their dict form), in the order to show.
    columns: (metrics key, label) pairs to show, top to bottom.

  Returns:
    The table, lines joined by newlines; floats with 2 decimals, counts as integers ("no results" when
    `results` is empty).

  Raises:
    ValueError: a key that the metrics do not have, named.
  """
  if not results:
    return "no results"
  dicts = {name: _as_dict(m) for name, m in results.items()}
  for key, _ in columns:
    if key not in next(iter(dicts.values())):
      raise ValueError(f"unknown metrics key {key!r}")

  def cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)

  label_width = max(len("metric"), *(len(label) for _, label in columns))
  widths = {name: max(10, len(name), *(len(cell(d[key])) for key, _ in columns)) for name, d in dicts.items()}
  header = f"{'metric':<{label_width}}  " + "  ".join(f"{name:>{widths[name]}}" for name in dicts)
  lines = [header, "-" * len(header)]
  for key, label in columns:
    lines.append(f"{label:<{label_width}}  " +
                 "  ".join(f"{cell(d[key]):>{widths[name]}}" for name, d in dicts.items()))
  return "\n".join(lines)


REQUEST_COLUMNS: tuple[str, ...] = ("request_id", "status", "reason", "prompt_len", "output_len",
                                    "arrival_time", "ttft_ms", "tpot_ms", "mean_itl_ms", "max_itl_ms",
                                    "e2el_ms", "slo_miss", "kv_transfer_bytes", "kv_transfer_ms", "priority",
                                    "client", "decode_stall_ms")
# Leading columns of requests.csv: the run's name (its metrics.json key), its policy and offered rate (req/s).
RUN_COLUMNS: tuple[str, ...] = ("run", "policy", "rate")


def request_rows(records: Sequence[RequestRecord], start: float = 0.0) -> list[dict[str, Any]]:
  """One row per request with its latencies in ms ("" where undefined), keys `REQUEST_COLUMNS`.

  Args:
    records: the run's requests.
    start: the run's start on the records' clock (s); `arrival_time` is given from there.

  Returns:
    The rows.
  """

  def ms(x: float | None) -> float | str:
    return "" if x is None else x * 1e3

  rows = []
  for r in records:
    lat = request_latency(r)
    rows.append({
        "request_id": r.request_id, "status": r.status, "reason": r.reason or "", "prompt_len": r.prompt_len,
        "output_len": r.output_len, "arrival_time": r.arrival_time - start, "ttft_ms": ms(lat.ttft),
        "tpot_ms": ms(lat.tpot), "mean_itl_ms": ms(sum(lat.itls) / len(lat.itls) if lat.itls else None),
        "max_itl_ms": ms(max(lat.itls) if lat.itls else None), "e2el_ms": ms(lat.e2el),
        "slo_miss": int(r.slo_miss), "kv_transfer_bytes": r.kv_transfer_bytes, "kv_transfer_ms": ms(r.kv_transfer_s),
        "priority": r.priority, "client": r.client, "decode_stall_ms": ms(r.decode_stall_s),
    })
  return rows


def write_requests_csv(records_by_run: Mapping[str, Sequence[RequestRecord]], path: str | pathlib.Path, *,
                       policy: Mapping[str, str] | None = None, rate: Mapping[str, float] | None = None,
                       start: Mapping[str, float] | None = None) -> pathlib.Path:
  """Writes every run's `request_rows` to one csv file, columns `RUN_COLUMNS` then `REQUEST_COLUMNS`.

  Args:
    records_by_run: run name (a policy, or "policy@rate" in a sweep) -> the run's requests.
    path: the csv file to write (parent directories are created).
    policy: run name -> its policy (default: the run name).
    rate: run name -> its offered rate in req/s (default: empty).
    start: run name -> the run's start on its records' clock (s), so that arrival times count from it
      (default: 0, the records' own times).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  policy, rate, start = policy or {}, rate or {}, start or {}
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=[*RUN_COLUMNS, *REQUEST_COLUMNS])
    writer.writeheader()
    for run, records in records_by_run.items():
      for row in request_rows(records, start.get(run, 0.0)):
        writer.writerow({"run": run, "policy": policy.get(run, run), "rate": rate.get(run, ""), **row})
  return path
