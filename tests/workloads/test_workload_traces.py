"""Trace loading: Azure timestamps, length-only traces, slices, time scaling, and errors naming the value."""

import numpy as np
import pytest

from pdopt import workloads
from pdopt.workloads import WorkloadConfig

_AZURE_ROWS = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.0000000,100,10
2023-11-16 18:15:46.5000001,200,20
2023-11-16 18:15:48.2500000,300,30
2023-11-16 18:15:50.0000000,400,40
"""


def _write(tmp_path, text, name="trace.csv"):
  path = tmp_path / name
  path.write_text(text)
  return path


def _make(config, max_model_len=4096, vocab_size=1000):
  return workloads.make_workload(config, max_model_len=max_model_len, vocab_size=vocab_size)


def test_azure_timestamps_keep_seven_digits(tmp_path):
  trace = workloads.load_azure_trace(_write(tmp_path, _AZURE_ROWS))
  np.testing.assert_allclose(trace.arrival_times, [0.0, 0.5000001, 2.25, 4.0], rtol=0, atol=1e-12)
  np.testing.assert_array_equal(trace.prompt_lens, [100, 200, 300, 400])
  np.testing.assert_array_equal(trace.output_lens, [10, 20, 30, 40])


def test_azure_real_time_and_slices(tmp_path):
  path = _write(tmp_path, _AZURE_ROWS)
  w = _make(WorkloadConfig(kind="azure", path=str(path)))
  assert [r.arrival_time for r in w] == pytest.approx([0.0, 0.5000001, 2.25, 4.0])
  assert [r.prompt_len for r in w] == [100, 200, 300, 400] and [r.max_tokens for r in w] == [10, 20, 30, 40]
  assert w.mean_rate == pytest.approx(3 / 4.0) and w.source == str(path) and w.num_clamped == 0
  # A slice is rebased to its own first arrival; ids name trace rows whatever the slice.
  s = _make(WorkloadConfig(kind="azure", path=str(path), start=1, num_requests=2))
  assert [r.arrival_time for r in s] == pytest.approx([0.0, 1.7499999])
  assert [r.request_id for r in s] == ["azure-1", "azure-2"]
  # Time window on real trace seconds, then rebased.
  t = _make(WorkloadConfig(kind="azure", path=str(path), time_window=(0.4, 3.0)))
  assert [r.request_id for r in t] == ["azure-1", "azure-2"]


def test_azure_default_trace_scaled_to_rate():
  full = workloads.load_azure_trace()
  assert len(full) == 19366
  assert full.arrival_times[-1] == pytest.approx(3501.72, abs=0.01)
  w = _make(WorkloadConfig(kind="azure", start=1000, num_requests=500, rate=4.0), max_model_len=16384)
  assert len(w) == 500 and w.mean_rate == pytest.approx(4.0, rel=1e-9)
  # Scaling keeps the shape: gaps are proportional to the trace's.
  real = full.arrival_times[1000:1500]
  np.testing.assert_allclose([r.arrival_time for r in w], (real - real[0]) * (499 / (real[-1] - real[0]) / 4.0))
  assert [r.prompt_len for r in w] == full.prompt_lens[1000:1500].tolist()


def test_azure_with_drawn_arrivals(tmp_path):
  w = _make(WorkloadConfig(kind="azure", path=str(_write(tmp_path, _AZURE_ROWS)), arrival="poisson", rate=2.0))
  assert len(w) == 4 and w.requests[0].arrival_time == 0.0


def test_lengths_trace():
  w = _make(WorkloadConfig(kind="lengths", num_requests=300, rate=5.0, seed=3), max_model_len=8192)
  trace = workloads.load_lengths_trace()
  assert len(trace) == 28257 and trace.arrival_times is None
  by_id = {r.request_id: r for r in w}
  assert by_id["lengths-7"].prompt_len == trace.prompt_lens[7] and by_id["lengths-7"].max_tokens == trace.output_lens[7]
  times = [r.arrival_time for r in w]
  assert times == sorted(times) and times[0] == 0.0


def test_relative_path_resolves_against_repo():
  w = _make(WorkloadConfig(kind="lengths", path="data/traces/arxiv_summarization_lengths.csv", num_requests=3,
                           rate=1.0), max_model_len=8192)
  assert len(w) == 3


@pytest.mark.parametrize("text, message", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:xx,1,2\n", "malformed TIMESTAMP '2023-11-16 18:15:xx'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,abc,2\n", "malformed ContextTokens 'abc'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1.5,2\n", "malformed ContextTokens '1.5'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1,-2\n", "malformed GeneratedTokens '-2'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1\n", r"malformed row at .*:2"),
    ("TIMESTAMP,Context,GeneratedTokens\n2023-11-16 18:15:46.1,1,2\n", "lacks columns \\['ContextTokens'\\]"),
    ("", "is empty"),
])
def test_malformed_azure_rows(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    workloads.load_azure_trace(_write(tmp_path, text))


def test_bad_inputs_raise_naming_the_value(tmp_path):
  with pytest.raises(ValueError, match="trace file not found: 'nope.csv'"):
    _make(WorkloadConfig(kind="lengths", path="nope.csv", rate=1.0))
  with pytest.raises(ValueError, match="unknown workload kind 'sharegpt'.*'azure', 'lengths', 'synthetic'"):
    WorkloadConfig(kind="sharegpt")
  with pytest.raises(ValueError, match="unknown arrival 'uniform'"):
    WorkloadConfig(kind="synthetic", num_requests=2, rate=1.0, arrival="uniform")
  for rate in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="rate"):
      WorkloadConfig(kind="azure", rate=rate)
  with pytest.raises(ValueError, match="needs a rate"):
    WorkloadConfig(kind="lengths")
  with pytest.raises(ValueError, match="cv=2.0 needs arrival='gamma'"):
    WorkloadConfig(kind="synthetic", num_requests=2, rate=1.0, cv=2.0)
  with pytest.raises(ValueError, match="arrival='trace'"):
    WorkloadConfig(kind="lengths", rate=1.0, arrival="trace")
  with pytest.raises(ValueError, match="num_requests must be >= 1"):
    WorkloadConfig(kind="azure", num_requests=0)
  with pytest.raises(ValueError, match="time_window"):
    WorkloadConfig(kind="azure", time_window=(5.0, 5.0))
  with pytest.raises(ValueError, match="empty slice: start=10, num_requests=None of 4 rows"):
    _make(WorkloadConfig(kind="azure", path=str(_write(tmp_path, _AZURE_ROWS)), start=10))
  with pytest.raises(ValueError, match="empty slice.*time_window"):
    _make(WorkloadConfig(kind="azure", path=str(_write(tmp_path, _AZURE_ROWS)), time_window=(100.0, 200.0)))
  with pytest.raises(ValueError, match="length_distribution 'zipf'"):
    WorkloadConfig(kind="synthetic", num_requests=2, rate=1.0, length_distribution="zipf")
