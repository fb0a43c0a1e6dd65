"""Plots to PNG files: latency CDFs per policy and goodput against arrival rate.

Figures are drawn on matplotlib's Agg canvas created inside each function: importing this module touches no
matplotlib state, and a caller's pyplot backend (a notebook's, say) is left alone.
"""

from __future__ import annotations

import pathlib
from typing import Literal, Mapping, Sequence, get_args

import numpy as np

from pdopt.metrics.latency import request_latency
from pdopt.metrics.records import RequestRecord

CdfMetric = Literal["ttft", "tpot", "itl", "e2el"]
CDF_METRICS: tuple[str, ...] = get_args(CdfMetric)
_LABELS = {"ttft": "TTFT (ms)", "tpot": "TPOT (ms)", "itl": "ITL (ms)", "e2el": "E2E latency (ms)"}


def _new_figure(width: float = 6.0, height: float = 4.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def latency_values_ms(records: Sequence[RequestRecord], metric: CdfMetric) -> np.ndarray:
  """Latencies of finished requests in ms (every gap for "itl"; requests with TPOT undefined skipped)."""
  if metric not in CDF_METRICS:
    raise ValueError(f"unknown latency metric {metric!r}; valid: {list(CDF_METRICS)}")
  values: list[float] = []
  for r in records:
    if r.status != "finished":
      continue
    lat = request_latency(r)
    if metric == "itl":
      values.extend(lat.itls)
    elif getattr(lat, metric) is not None:
      values.append(getattr(lat, metric))
  return np.asarray(values, np.float64) * 1e3


def plot_latency_cdf(records_by_policy: Mapping[str, Sequence[RequestRecord]], path: str | pathlib.Path,
                     metric: CdfMetric = "ttft", title: str | None = None, log_x: bool = False) -> pathlib.Path:
  """Plots the empirical CDF of a latency, one line per policy (finished requests).

  Args:
    records_by_policy: policy name -> the run's requests.
    path: the PNG file to write (parent directories are created).
    metric: "ttft", "tpot", "itl" or "e2el".
    title: figure title; defaults to "<metric> CDF".
    log_x: logarithmic latency axis.

  Returns:
    The path written.

  Raises:
    ValueError: an unknown metric, listing the valid ones.
  """
  if metric not in CDF_METRICS:
    raise ValueError(f"unknown latency metric {metric!r}; valid: {list(CDF_METRICS)}")
  fig, ax = _new_figure()
  for policy, records in records_by_policy.items():
    values = np.sort(latency_values_ms(records, metric))
    if values.size == 0:
      ax.plot([], [], label=f"{policy} (no data)")
      continue
    ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=policy)
  if log_x and any(line.get_xdata().size for line in ax.get_lines()):
    ax.set_xscale("log")
  ax.set_xlabel(_LABELS[metric])
  ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of tokens")
  ax.set_ylim(0.0, 1.02)
  ax.set_title(title or f"{metric.upper()} CDF")
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower right")
  return _save(fig, path)


def plot_goodput_vs_rate(points_by_policy: Mapping[str, Sequence[tuple[float, float]]],
                         path: str | pathlib.Path, ylabel: str = "goodput (req/s)",
                         title: str | None = None) -> pathlib.Path:
  """Plots goodput (or any per-rate value) against the offered arrival rate, one line per policy.

  Args:
    points_by_policy: policy name -> [(rate in req/s, goodput in req/s)], any order.
    path: the PNG file to write (parent directories are created).
    ylabel: the y-axis label (e.g. "SLO attainment" when plotting fractions).
    title: figure title; defaults to "goodput vs rate".

  Returns:
    The path written.
  """
  fig, ax = _new_figure()
  for policy, points in points_by_policy.items():
    pts = sorted((float(r), float(g)) for r, g in points)
    ax.plot([r for r, _ in pts], [g for _, g in pts], marker="o", label=policy)
  ax.set_xlabel("arrival rate (req/s)")
  ax.set_ylabel(ylabel)
  ax.set_title(title or "goodput vs rate")
  ax.grid(True, alpha=0.3)
  ax.legend(loc="best")
  return _save(fig, path)


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path
