"""Fairness and priority metrics from request records: slowdown, Jain's index, time behind prefills, and the
serving metrics of each priority class.

- slowdown: a request's end-to-end latency over its latency alone on an idle engine (`ideal_e2el`, from the
  step-cost model of the served model and device, or a measured idle run); 1 is as fast as it can be.
- Jain's fairness index (Jain, Chiu and Hawe, 1984) over slowdowns: (sum x)^2 / (n sum x^2), 1 when every
  request is slowed alike, 1/n when one takes all the delay; overall, per priority class and per client.
- decode stall: seconds a request spent decoding in steps that also ran prompt tokens, or waiting while such
  steps ran (`RequestRecord.decode_stall_s`): the cost of prefills to the decodes they share the engine with.

Only finished requests have a slowdown; requests that did not finish are counted apart (`unfinished`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pdopt.metrics.latency import request_latency
from pdopt.metrics.records import RequestRecord
from pdopt.metrics.serving import compute_metrics, metrics_to_dict
from pdopt.metrics.slo import Slo
from pdopt.workloads.request import PRIORITY_CLASSES

CLASS_NAMES: dict[int, str] = dict(enumerate(PRIORITY_CLASSES))


def jain_index(values: Sequence[float]) -> float:
  """(sum x)^2 / (n sum x^2) of non-negative values: 1.0 for equal values; NaN for none."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan
  denominator = x.size * float(np.dot(x, x))
  return float(x.sum()) ** 2 / denominator if denominator > 0 else 1.0


def slowdowns(records: Sequence[RequestRecord], ideal_e2el: Mapping[str, float]) -> dict[str, float]:
  """Per finished request with an ideal latency: its end-to-end latency over the ideal (>= 0)."""
  out = {}
  for r in records:
    ideal = ideal_e2el.get(r.request_id)
    lat = request_latency(r)
    if r.status == "finished" and lat.e2el is not None and ideal:
      out[r.request_id] = lat.e2el / ideal
  return out


def _stats(values: Sequence[float], prefix: str) -> dict[str, float]:
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return {f"{prefix}_p50": math.nan, f"{prefix}_p99": math.nan, f"{prefix}_mean": math.nan}
  return {f"{prefix}_p50": float(np.percentile(x, 50)), f"{prefix}_p99": float(np.percentile(x, 99)),
          f"{prefix}_mean": float(x.mean())}


def fairness_metrics(records: Sequence[RequestRecord], ideal_e2el: Mapping[str, float]) -> dict[str, Any]:
  """Slowdown (P50, P99, mean), Jain's index over slowdowns (overall, per class, per client) and decode stall
  seconds (P50, P99, mean over requests that decoded), with the count of requests that did not finish.

  Returns:
    A flat dict (metrics.json names): slowdown_*, jain_slowdown, jain_slowdown_<class>,
    jain_slowdown_by_client ({client: index} of clients with 2+ finished requests, and their Jain index
    over the clients' mean slowdowns as jain_slowdown_across_clients), decode_stall_s_*, unfinished.
  """
  slow = slowdowns(records, ideal_e2el)
  out: dict[str, Any] = {**_stats(list(slow.values()), "slowdown"), "jain_slowdown": jain_index(list(slow.values()))}
  by_id = {r.request_id: r for r in records}
  for priority, name in CLASS_NAMES.items():
    out[f"jain_slowdown_{name}"] = jain_index([s for rid, s in slow.items() if by_id[rid].priority == priority])
  clients: dict[str, list[float]] = {}
  for rid, s in slow.items():
    if by_id[rid].client:
      clients.setdefault(by_id[rid].client, []).append(s)
  out["jain_slowdown_by_client"] = {c: jain_index(v) for c, v in sorted(clients.items()) if len(v) > 1}
  out["jain_slowdown_across_clients"] = jain_index([float(np.mean(v)) for v in clients.values()])
  stalls = [r.decode_stall_s for r in records if r.status == "finished" and r.output_len > 1]
  out.update(_stats(stalls, "decode_stall_s"))
  out["unfinished"] = sum(r.status != "finished" for r in records)
  return out


def class_of(record: RequestRecord) -> str:
  """The name of the record's priority class."""
  return CLASS_NAMES.get(record.priority, f"priority-{record.priority}")


def ideal_latencies(records: Sequence[RequestRecord], alone: Callable[[int, int], float]) -> dict[str, float]:
  """{request_id: seconds} of each finished request alone on an idle engine: `alone(prompt_len, output_len)`,
  e.g. `lambda p, o: step_cost.alone_seconds(p, o, chunk)`."""
  return {r.request_id: alone(r.prompt_len, r.output_len) for r in records if r.status == "finished"}


def class_metrics(records: Sequence[RequestRecord], slo: str | Slo | None, duration: float,
                  class_slos: Mapping[int, str | Slo] | None = None) -> dict[str, dict[str, Any]]:
  """{class name: every serving metric of that class's requests (vLLM's names)}, each class judged against its
  own SLO (`class_slos`, else `slo`), throughputs over the whole run's `duration`; classes in priority order."""
  class_slos = class_slos or {}
  out = {}
  for priority in sorted({r.priority for r in records}):
    subset = [r for r in records if r.priority == priority]
    m = compute_metrics(subset, slo=class_slos.get(priority, slo), duration=duration)
    out[class_of(subset[0])] = metrics_to_dict(m)
  return out
