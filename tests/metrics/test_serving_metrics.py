"""Serving metrics against a hand-computed example, percentiles, SLO parsing and goodput."""

import json
import math

import pytest

from pdopt import metrics
from pdopt.metrics import RequestRecord


def _records(slo_miss_a=False):
  # Hand-built run, times in seconds. Expected values below are worked out by hand.
  return [
      # TTFT 0.5, E2E 1.1, TPOT (1.1 - 0.5) / 3 = 0.2, ITLs 0.1 0.2 0.3.
      RequestRecord("a", prompt_len=10, output_len=4, arrival_time=0.0, first_scheduled_time=0.1,
                    first_token_time=0.5, token_times=(0.5, 0.6, 0.8, 1.1), finish_time=1.1, slo_miss=slo_miss_a),
      # One output token: TTFT 0.3, E2E 0.3, TPOT undefined, no ITL.
      RequestRecord("b", prompt_len=20, output_len=1, arrival_time=1.0, first_scheduled_time=1.0,
                    first_token_time=1.3, token_times=(1.3,), finish_time=1.3),
      # TTFT 1.0, E2E 2.0, TPOT (2.0 - 1.0) / 2 = 0.5, ITLs 0.5 0.5.
      RequestRecord("c", prompt_len=30, output_len=3, arrival_time=2.0, first_scheduled_time=2.6,
                    first_token_time=3.0, token_times=(3.0, 3.5, 4.0), finish_time=4.0),
      RequestRecord("d", prompt_len=40, output_len=2, arrival_time=2.5, first_scheduled_time=2.6,
                    first_token_time=2.9, token_times=(2.9, 3.1), finish_time=3.2, status="aborted",
                    reason="client abort"),
      RequestRecord("e", prompt_len=50, output_len=0, arrival_time=3.0, finish_time=3.0, status="rejected",
                    reason="cannot meet TTFT deadline"),
  ]


def test_per_request_latencies():
  lat = metrics.request_latency(_records()[0])
  assert lat.ttft == pytest.approx(0.5)
  assert lat.e2el == pytest.approx(1.1)
  assert lat.tpot == pytest.approx(0.2)
  assert lat.itls == pytest.approx((0.1, 0.2, 0.3))
  single = metrics.request_latency(_records()[1])
  assert single.tpot is None and single.itls == ()


def test_aggregates_match_hand_computed():
  m = metrics.compute_metrics(_records())
  assert (m.num_requests, m.completed, m.failed, m.aborted, m.rejected) == (5, 3, 2, 1, 1)
  assert (m.total_input_tokens, m.total_output_tokens) == (60, 8)  # Finished requests only, as vLLM.
  assert m.duration == pytest.approx(4.0)  # First arrival 0.0 to the last event 4.0.
  assert m.request_throughput == pytest.approx(3 / 4)
  assert m.output_throughput == pytest.approx(8 / 4)
  assert m.total_token_throughput == pytest.approx(68 / 4)
  expected = {
      # TTFT ms [500, 300, 1000].
      "mean_ttft_ms": 600.0, "median_ttft_ms": 500.0, "std_ttft_ms": math.sqrt(260000 / 3),
      "p50_ttft_ms": 500.0, "p90_ttft_ms": 900.0, "p99_ttft_ms": 990.0,
      # TPOT ms [200, 500] (b excluded: one token).
      "mean_tpot_ms": 350.0, "median_tpot_ms": 350.0, "std_tpot_ms": 150.0,
      "p50_tpot_ms": 350.0, "p90_tpot_ms": 470.0, "p99_tpot_ms": 497.0,
      # ITL ms [100, 200, 300, 500, 500].
      "mean_itl_ms": 320.0, "median_itl_ms": 300.0, "std_itl_ms": 160.0,
      "p50_itl_ms": 300.0, "p90_itl_ms": 500.0, "p99_itl_ms": 500.0,
      # E2EL ms [1100, 300, 2000].
      "mean_e2el_ms": 3400 / 3, "median_e2el_ms": 1100.0, "std_e2el_ms": math.sqrt(1446666.6666666667 / 3),
      "p50_e2el_ms": 1100.0, "p90_e2el_ms": 1820.0, "p99_e2el_ms": 1982.0,
  }
  d = metrics.metrics_to_dict(m)
  for key, value in expected.items():
    assert d[key] == pytest.approx(value), key


def test_goodput_and_attainment():
  # a (TTFT 500, TPOT 200) and b (TTFT 300, one token: TPOT 0) meet it; c misses TTFT; d, e failed.
  m = metrics.compute_metrics(_records(), slo="ttft:600 tpot:300")
  assert m.request_goodput == pytest.approx(2 / 4)
  assert m.slo_attainment == pytest.approx(2 / 5)
  assert m.slo == "ttft:600 tpot:300"
  # Bounds are inclusive: a's E2E is exactly 1100 ms.
  assert metrics.compute_metrics(_records(), slo="e2el:1100").slo_attainment == pytest.approx(2 / 5)
  assert metrics.compute_metrics(_records(), slo="ttft:300").request_goodput == pytest.approx(1 / 4)
  # A request the server flagged as an SLO miss never counts as good.
  assert metrics.compute_metrics(_records(slo_miss_a=True), slo="ttft:600").slo_attainment == pytest.approx(1 / 5)
  # No SLO: every finished request is good.
  none = metrics.compute_metrics(_records())
  assert none.slo == "" and none.request_goodput == pytest.approx(3 / 4)


def test_explicit_duration():
  m = metrics.compute_metrics(_records(), duration=8.0)
  assert m.request_throughput == pytest.approx(3 / 8)
  with pytest.raises(ValueError, match="duration"):
    metrics.compute_metrics(_records(), duration=-1.0)


def test_percentiles_linear_interpolation():
  stats = metrics.latency_stats([0.001 * v for v in range(1, 101)])  # 1..100 ms.
  assert stats["p50"] == pytest.approx(50.5)
  assert stats["p90"] == pytest.approx(90.1)
  assert stats["p99"] == pytest.approx(99.01)
  assert stats["median"] == pytest.approx(50.5)
  assert stats["mean"] == pytest.approx(50.5)


def test_empty_runs_are_nan_free():
  for records in ([], _records()[3:]):  # Nothing at all; only failures.
    m = metrics.compute_metrics(records, slo="ttft:100")
    d = metrics.metrics_to_dict(m)
    json.dumps(d, allow_nan=False)
    assert m.completed == 0 and m.request_goodput == 0.0
    assert all(d[f"{s}_{k}_ms"] == 0.0 for s in metrics.STATISTICS for k in metrics.LATENCY_METRICS)
  assert metrics.compute_metrics([]).duration == 0.0
  assert metrics.compute_metrics([]).slo_attainment == 0.0


def test_dict_round_trip_has_vllm_names():
  d = metrics.metrics_to_dict(metrics.compute_metrics(_records(), slo="ttft:600"))
  for key in ("completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
              "request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
              "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "p90_itl_ms", "p50_e2el_ms"):
    assert key in d
  assert metrics.metrics_from_dict(json.loads(json.dumps(d))) == metrics.compute_metrics(_records(), slo="ttft:600")
  with pytest.raises(ValueError, match="completed"):
    metrics.metrics_from_dict({k: v for k, v in d.items() if k != "completed"})


@pytest.mark.parametrize("spec, expected", [
    ("ttft:2000 tpot:100", metrics.Slo(ttft_ms=2000.0, tpot_ms=100.0)),
    ("ttft:2000,e2el:5e3", metrics.Slo(ttft_ms=2000.0, e2el_ms=5000.0)),
    ("  tpot:0.5  ", metrics.Slo(tpot_ms=0.5)),
    ("", metrics.Slo()),
    (None, metrics.Slo()),
    ({"ttft": 100}, metrics.Slo(ttft_ms=100.0)),
])
def test_parse_slo(spec, expected):
  assert metrics.parse_slo(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("latency:100", "unknown SLO metric 'latency'.*valid.*ttft"),
    ("ttft:fast", "ttft:'fast'"),
    ("ttft:-5", "ttft:'-5'"),
    ("ttft:nan", "ttft:'nan'"),
    ("ttft=100", "malformed SLO item 'ttft=100'"),
    ("ttft:", "malformed SLO item 'ttft:'"),
    ("ttft:1:2", "malformed SLO item"),
    ("ttft:1 ttft:2", "given twice"),
])
def test_parse_slo_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    metrics.parse_slo(spec)


@pytest.mark.parametrize("kwargs, message", [
    (dict(status="done"), "unknown status 'done'.*finished"),
    (dict(output_len=3), "2 token_times for output_len=3"),
    (dict(token_times=(0.9, 0.8)), "decrease"),
    (dict(first_token_time=None), "first_token_time is None"),
    (dict(finish_time=0.85), "before its last token"),
    (dict(arrival_time=2.0), "before arrival_time"),
    (dict(status="rejected", reason=None), "needs a reason"),
])
def test_record_validation(kwargs, message):
  base = dict(request_id="r", prompt_len=4, output_len=2, arrival_time=0.0, first_token_time=0.8,
              token_times=(0.8, 0.9), finish_time=1.0)
  with pytest.raises(ValueError, match=message):
    RequestRecord(**{**base, **kwargs})
