"""The vLLM-layout result block, the comparison table, the per-request csv, and plots."""

import csv
import pathlib
import subprocess
import sys

import pytest

from pdopt import metrics
from pdopt.metrics import RequestRecord


def _run(offset=0.0):
  return [
      RequestRecord("a", 10, 3, arrival_time=0.0, first_token_time=0.2 + offset,
                    token_times=(0.2 + offset, 0.3 + offset, 0.5 + offset), finish_time=0.5 + offset),
      RequestRecord("b", 12, 2, arrival_time=0.1, first_token_time=0.4 + offset,
                    token_times=(0.4 + offset, 0.6 + offset), finish_time=0.6 + offset),
      RequestRecord("c", 8, 0, arrival_time=0.2, finish_time=0.2, status="rejected", reason="too long"),
  ]


def test_benchmark_result_layout():
  text = metrics.format_benchmark_result(metrics.compute_metrics(_run(), slo="ttft:250"), policy="chunked")
  lines = text.splitlines()
  assert lines[0] == "======= Serving Benchmark Result (chunked) =======" and len(lines[0]) == 50
  assert lines[1] == "{:<40} {:<10}".format("Successful requests:", 2)
  assert "{:<40} {:<10.2f}".format("Request throughput (req/s):", 2 / 0.6) in lines
  assert "{:<40} {:<10.2f}".format("Request goodput (req/s):", 1 / 0.6) in lines
  assert "---------------Time to First Token----------------" in lines
  assert "-----Time per Output Token (excl. 1st token)------" in lines
  assert "{:<40} {:<10.2f}".format("P99 TTFT (ms):", 299.0) in lines
  assert lines[-1] == "=" * 50
  for label in ("Benchmark duration (s):", "Output token throughput (tok/s):", "Total Token throughput (tok/s):",
                "Mean TPOT (ms):", "Median ITL (ms):", "Mean E2EL (ms):"):
    assert any(line.startswith(label) for line in lines), label
  plain = metrics.format_benchmark_result(metrics.compute_metrics(_run()), percentiles=(90, 99))
  assert plain.splitlines()[0] == "============ Serving Benchmark Result ============"
  assert "goodput" not in plain and "P90 ITL (ms):" in plain
  with pytest.raises(ValueError, match="percentile 95"):
    metrics.format_benchmark_result(metrics.compute_metrics(_run()), percentiles=(95,))


def test_comparison_table():
  results = {"chunked": metrics.compute_metrics(_run()),
             "prefill_first": metrics.metrics_to_dict(metrics.compute_metrics(_run(offset=0.1)))}
  table = metrics.format_comparison_table(results).splitlines()
  assert "chunked" in table[0] and "prefill_first" in table[0]
  ttft = next(line for line in table if line.startswith("median TTFT (ms)"))
  assert ttft.split()[-2:] == ["250.00", "350.00"]
  assert metrics.format_comparison_table({}) == "no results"
  with pytest.raises(ValueError, match="'bogus'"):
    metrics.format_comparison_table(results, columns=[("bogus", "b")])


def test_requests_csv(tmp_path):
  path = metrics.write_requests_csv({"chunked": _run(), "decode_first": _run()}, tmp_path / "r" / "requests.csv")
  rows = list(csv.DictReader(open(path)))
  assert list(rows[0]) == [*metrics.RUN_COLUMNS, *metrics.REQUEST_COLUMNS]
  assert len(rows) == 6 and rows[0]["policy"] == "chunked" and rows[3]["policy"] == "decode_first"
  assert rows[0]["run"] == "chunked" and rows[0]["rate"] == ""
  assert float(rows[0]["ttft_ms"]) == pytest.approx(200.0)
  assert float(rows[0]["tpot_ms"]) == pytest.approx(150.0)
  assert rows[2]["status"] == "rejected" and rows[2]["reason"] == "too long" and rows[2]["ttft_ms"] == ""
  # A sweep's runs: their name, policy and rate; arrival times from each run's start.
  path = metrics.write_requests_csv({"chunked@4": _run(5.0)}, tmp_path / "sweep.csv", policy={"chunked@4": "chunked"},
                                    rate={"chunked@4": 4.0}, start={"chunked@4": -5.0})
  row = next(csv.DictReader(open(path)))
  assert (row["run"], row["policy"], float(row["rate"])) == ("chunked@4", "chunked", 4.0)
  assert float(row["arrival_time"]) == 5.0 and float(row["ttft_ms"]) == pytest.approx(5200.0)


def _is_png(path):
  data = path.read_bytes()
  return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
  runs = {"chunked": _run(), "prefill_first": _run(offset=0.1), "empty": []}
  for metric in metrics.CDF_METRICS:
    assert _is_png(metrics.plot_latency_cdf(runs, tmp_path / f"{metric}_cdf.png", metric=metric))
  assert _is_png(metrics.plot_latency_cdf(runs, tmp_path / "log.png", log_x=True))
  assert _is_png(metrics.plot_goodput_vs_rate({"chunked": [(2, 1.9), (1, 1.0), (4, 2.5)],
                                               "prefill_first": [(1, 1.0), (2, 1.5), (4, 1.0)]},
                                              tmp_path / "sub" / "goodput_vs_rate.png"))
  with pytest.raises(ValueError, match="unknown latency metric 'ttf'"):
    metrics.plot_latency_cdf(runs, tmp_path / "x.png", metric="ttf")
  panels = {"1 req/s": runs, "2 req/s": {"chunked": _run(0.3)}}
  assert _is_png(metrics.plot_latency_cdfs(panels, tmp_path / "panels.png", metric="tpot", log_x=None,
                                           slo_ms=100.0, title="TPOT CDF: tiny, synthetic"))


def test_cdf_counts_every_request():
  """Rejected and unfinished requests keep the CDF below 1.0; a one-token output has no TPOT to count."""
  run = _run()  # two finished (3 and 2 tokens), one rejected
  assert metrics.cdf_population(run, "ttft") == metrics.cdf_population(run, "e2el") == 3
  assert metrics.latency_values_ms(run, "ttft").size == 2
  one_token = RequestRecord("d", 4, 1, arrival_time=0.0, first_token_time=0.1, token_times=(0.1,), finish_time=0.1)
  assert metrics.cdf_population([*run, one_token], "tpot") == 3
  assert metrics.cdf_population(run, "itl") == 3  # token gaps of the finished requests


def test_cdf_plot_tops_out_below_one_with_slo_line(tmp_path, monkeypatch):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figures = []
  monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
  records = [RequestRecord(f"r{i}", 4, 2, arrival_time=0.0, first_token_time=t, token_times=(t, t + 0.1),
                           finish_time=t + 0.1) for i, t in enumerate((0.01, 0.1, 1.0, 3.0))]
  records.append(RequestRecord("x", 4, 0, arrival_time=0.0, finish_time=1.0, status="rejected", reason="r"))
  metrics.plot_latency_cdf({"chunked": records}, tmp_path / "t.png", metric="ttft", log_x=None, slo_ms=2000.0)
  (ax,) = figures[0].axes
  curve, slo_line = ax.get_lines()
  assert curve.get_ydata()[-1] == pytest.approx(4 / 5) and "n=5, 4 finished" in curve.get_label()
  assert list(slo_line.get_xdata()) == [2000.0, 2000.0]
  assert ax.get_xscale() == "log"  # 10 ms to 3 s: more than 50x
  labels = [ax.xaxis.get_major_formatter()(v, 0) for v in (10.0, 200.0, 5000.0)]
  assert labels == ["10", "200", "5000"]


def test_import_has_no_matplotlib_side_effects():
  # A bare `pdopt` namespace skips pdopt/__init__.py (which imports JAX) to keep this fast.
  pdopt_dir = pathlib.Path(metrics.__file__).parents[1]
  code = ("import sys, types; pkg = types.ModuleType('pdopt'); pkg.__path__ = [%r]; sys.modules['pdopt'] = pkg; "
          "import pdopt.metrics; "
          "assert 'matplotlib' not in sys.modules, 'pdopt.metrics imported matplotlib'" % str(pdopt_dir))
  subprocess.run([sys.executable, "-c", code], check=True)
