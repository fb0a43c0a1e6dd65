"""Plots to PNG files: latency CDFs per policy (every request counted, SLO drawn) and goodput against
arrival rate.

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


def cdf_population(records: Sequence[RequestRecord], metric: CdfMetric) -> int:
  """How many requests (or, for "itl", token gaps) the CDF of `metric` is a fraction of.

  Every request counts, whatever its status: one that was rejected, aborted or never finished has no
  latency, and so keeps the curve below 1.0. Only finished requests whose value is undefined are left out
  (TPOT of a one-token output). ITL is a fraction of the token gaps of finished requests.
  """
  if metric == "itl":
    return int(latency_values_ms(records, "itl").size)
  if metric == "tpot":
    return sum(1 for r in records if r.status != "finished" or r.output_len > 1)
  return len(records)


def plot_latency_cdf(records_by_policy: Mapping[str, Sequence[RequestRecord]], path: str | pathlib.Path,
                     metric: CdfMetric = "ttft", title: str | None = None, log_x: bool | None = False,
                     slo_ms: float | None = None) -> pathlib.Path:
  """Plots the empirical CDF of a latency over every request, one line per policy (`plot_latency_cdfs` with
  one panel).

  Args:
    records_by_policy: policy name -> the run's requests (every status).
    path: the PNG file to write (parent directories are created).
    metric: "ttft", "tpot", "itl" or "e2el".
    title: figure title; defaults to "<metric> CDF".
    log_x: logarithmic latency axis; None chooses it when the latencies span more than 50x.
    slo_ms: the SLO bound of this latency (ms), drawn as a vertical line; None draws none.

  Returns:
    The path written.

  Raises:
    ValueError: an unknown metric, listing the valid ones.
  """
  return plot_latency_cdfs({"": records_by_policy}, path, metric=metric, title=title, log_x=log_x, slo_ms=slo_ms)


def plot_latency_cdfs(panels: Mapping[str, Mapping[str, Sequence[RequestRecord]]], path: str | pathlib.Path,
                      metric: CdfMetric = "ttft", title: str | None = None, log_x: bool | None = False,
                      slo_ms: float | None = None) -> pathlib.Path:
  """Plots empirical latency CDFs side by side: one panel per key of `panels` (a rate of a sweep, say), one
  line per policy.

  Each curve is a fraction of every request of its run (`cdf_population`, shown as n in the legend):
  requests that never finished (rejected, aborted, or cut off) have no latency and keep it below 1.0, at
  the fraction that finished.

  Args:
    panels: panel title (e.g. "4 req/s"; "" for none) -> policy name -> the run's requests.
    path: the PNG file to write (parent directories are created).
    metric: "ttft", "tpot", "itl" or "e2el".
    title: figure title; defaults to "<metric> CDF".
    log_x: logarithmic latency axis (tick labels in plain ms); None chooses it when the latencies span more
      than 50x.
    slo_ms: the SLO bound of this latency (ms), drawn as a vertical line in every panel; None draws none.

  Returns:
    The path written.

  Raises:
    ValueError: an unknown metric, listing the valid ones, or no panel.
  """
  if metric not in CDF_METRICS:
    raise ValueError(f"unknown latency metric {metric!r}; valid: {list(CDF_METRICS)}")
  if not panels:
    raise ValueError("plot_latency_cdfs needs at least one panel")
  curves = {name: {policy: (np.sort(latency_values_ms(records, metric)), cdf_population(records, metric))
                   for policy, records in by_policy.items()}
            for name, by_policy in panels.items()}
  values = np.concatenate([v for by_policy in curves.values() for v, _ in by_policy.values()] + [np.zeros(0)])
  positive = values[values > 0]
  if log_x is None:
    log_x = positive.size == values.size and positive.size > 1 and positive.max() > 50 * positive.min()
  x_max = max(float(values.max()) if values.size else 1.0, slo_ms or 0.0)

  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.0 * len(panels) + 1.0, 4.2), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
  for ax, (name, by_policy) in zip(axes, curves.items()):
    for policy, (v, n) in by_policy.items():
      if v.size == 0:
        ax.plot([], [], label=f"{policy} (n={n}, none finished)")
        continue
      finished = f", {v.size} finished" if v.size != n and metric != "itl" else ""
      label = f"{policy} (n={n}{finished})"
      y = np.arange(1, v.size + 1) / max(n, 1)
      # Carry the last level to the right edge: the requests that never finished stay missing there too.
      ax.step(np.append(v, x_max * 1.05), np.append(y, y[-1]), where="post", label=label)
    if slo_ms is not None:
      ax.axvline(slo_ms, color="0.3", linestyle="--", linewidth=1.0, label=f"SLO {slo_ms:g} ms")
    if log_x and positive.size:
      ax.set_xscale("log")
      # Plain numbers at 1, 2, 5 x 10^k: a latency axis spanning less than a decade otherwise has no labels.
      ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(_LABELS[metric])
    ax.set_ylim(0.0, 1.02)
    if name:
      ax.set_title(name)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
  axes[0].set_ylabel("fraction of requests" if metric != "itl" else "fraction of token gaps")
  fig.suptitle(title or f"{metric.upper()} CDF")
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
