"""Arrival processes, synthetic lengths, clamping and prompt materialization."""

import pickle
import re

import numpy as np
import pytest

from pdopt import workloads
from pdopt.workloads import WorkloadConfig


def _gaps(times):
  return np.diff(np.asarray(times))


@pytest.mark.parametrize("process, cv", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_arrival_rate_and_cv(process, cv):
  times = workloads.arrival_times(50_000, rate=5.0, process=process, cv=cv, seed=0)
  assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
  assert workloads.mean_rate(times) == pytest.approx(5.0, rel=0.03)
  gaps = _gaps(times)
  assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_gamma_cv1_is_poisson_in_distribution():
  poisson = _gaps(workloads.arrival_times(20_000, 2.0, "poisson", seed=1))
  gamma = _gaps(workloads.arrival_times(20_000, 2.0, "gamma", cv=1.0, seed=2))
  qs = [0.1, 0.5, 0.9]
  np.testing.assert_allclose(np.quantile(poisson, qs), np.quantile(gamma, qs), rtol=0.06)
  np.testing.assert_allclose(np.quantile(poisson, qs), -np.log(1 - np.array(qs)) / 2.0, rtol=0.06)


def test_arrivals_are_seeded():
  a = workloads.arrival_times(100, 3.0, "gamma", cv=2.0, seed=7)
  np.testing.assert_array_equal(a, workloads.arrival_times(100, 3.0, "gamma", cv=2.0, seed=7))
  assert not np.array_equal(a, workloads.arrival_times(100, 3.0, "gamma", cv=2.0, seed=8))
  with pytest.raises(ValueError, match="unknown arrival process 'weibull'.*poisson"):
    workloads.arrival_times(10, 1.0, "weibull")
  with pytest.raises(ValueError, match="rate must be a positive.*-1"):
    workloads.arrival_times(10, -1.0)
  with pytest.raises(ValueError, match="cv must be positive"):
    workloads.arrival_times(10, 1.0, "gamma", cv=0.0)


def test_workload_rate_within_tolerance():
  w = workloads.make_workload(WorkloadConfig(kind="synthetic", num_requests=5000, rate=8.0, arrival="gamma", cv=2.0,
                                             prompt_len=4, output_len=4), max_model_len=64, vocab_size=50)
  assert w.mean_rate == pytest.approx(8.0, rel=0.1)
  assert w.duration == pytest.approx(4999 / w.mean_rate)


def test_synthetic_lengths():
  w = workloads.make_workload(WorkloadConfig(kind="synthetic", num_requests=8, rate=1.0, prompt_len=16,
                                             output_len=8), max_model_len=64, vocab_size=50)
  assert {r.prompt_len for r in w} == {16} and {r.max_tokens for r in w} == {8}
  u = workloads.synthetic_lengths(10_000, 100, "uniform", range_ratio=0.5, seed=0)
  assert u.min() == 50 and u.max() == 150 and u.mean() == pytest.approx(100, rel=0.02)
  assert workloads.synthetic_lengths(3, 1, "uniform", range_ratio=1.0, seed=0).min() >= 1


def test_clamp_lengths_counts():
  p, o, n = workloads.clamp_lengths(np.array([10, 0, 90, 50, 5, 200]), np.array([10, 5, 20, 0, 120, 3]),
                                    max_model_len=100)
  # (10,10) fits; (0,5) -> (1,5); (90,20) -> prompt cut to (80,20); (50,0) -> (50,1);
  # (5,120) -> output cut to 99, prompt 1; (200,3) -> (97,3).
  assert p.tolist() == [10, 1, 80, 50, 1, 97] and o.tolist() == [10, 5, 20, 1, 99, 3] and n == 5
  assert np.all(p + o <= 100) and np.all(p >= 1) and np.all(o >= 1)
  p, o, n = workloads.clamp_lengths(np.array([10, 40]), np.array([10, 40]), 100, max_prompt_len=20,
                                    max_output_len=30)
  assert p.tolist() == [10, 20] and o.tolist() == [10, 30] and n == 1
  with pytest.raises(ValueError, match="max_model_len must be >= 2"):
    workloads.clamp_lengths(np.array([1]), np.array([1]), 1)


def test_workload_counts_clamped_requests():
  w = workloads.make_workload(WorkloadConfig(kind="lengths", num_requests=1000, rate=1.0), max_model_len=2048,
                              vocab_size=100)
  trace = workloads.load_lengths_trace()
  _, _, expected = workloads.clamp_lengths(trace.prompt_lens[:1000], trace.output_lens[:1000], 2048)
  assert w.num_clamped == expected > 0
  assert all(r.prompt_len + r.max_tokens <= 2048 and r.prompt_len >= 1 and r.max_tokens >= 1 for r in w)


def _synthetic(**kwargs):
  config = dict(kind="synthetic", num_requests=20, rate=2.0, prompt_len=32, output_len=4, seed=0)
  return workloads.make_workload(WorkloadConfig(**{**config, **kwargs}), max_model_len=256, vocab_size=100)


def test_prompt_ids_deterministic_by_seed():
  a, b, c = _synthetic(), _synthetic(), _synthetic(seed=1)
  assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
  assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
  assert [r.arrival_time for r in a] == [r.arrival_time for r in b]
  # Arrivals use their own stream: another rate changes no prompt.
  assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in _synthetic(rate=9.0)]
  ids = np.concatenate([r.prompt_token_ids for r in _synthetic(low_token_id=3)])
  assert ids.min() >= 3 and ids.max() < 100
  assert all(type(t) is int for t in a.requests[0].prompt_token_ids)
  with pytest.raises(ValueError, match="low_token_id=100"):
    _synthetic(low_token_id=100)


def test_prompts_carry_the_bound_they_were_drawn_below():
  prompt = _synthetic().requests[0].prompt_token_ids
  assert type(prompt) is workloads.TokenIds and prompt.bound == 100
  again = pickle.loads(pickle.dumps(prompt))
  assert type(again) is workloads.TokenIds and again.bound == 100 and again == prompt
  assert workloads.TokenIds([0, 4], 5) == (0, 4)
  with pytest.raises(AttributeError, match="immutable"):
    prompt.bound = 10**6  # A wider bound would let ids past a vocabulary through unchecked.
  for bad in ([1, 5], [-1], [1, True], [np.int64(2)], [2.0]):  # Out of range, or not a plain int.
    with pytest.raises(ValueError, match=re.escape(f"token id {bad[-1]!r} is not an int in [0, 5)")):
      workloads.TokenIds(bad, 5)


def test_prompts_keep_what_is_derived_from_them_once_asked_again():
  prompt = _synthetic().requests[0].prompt_token_ids
  calls = []

  def compute(ids):
    calls.append(ids)
    return sum(ids)

  assert [prompt.derived("sum", compute) for _ in range(4)] == [sum(prompt)] * 4
  assert len(calls) == 2 and calls[0] is prompt  # Kept from the second call on.
  assert prompt.derived("len", lambda ids: len(ids)) == 32  # Another key, computed apart.
  again = pickle.loads(pickle.dumps(prompt))  # Not pickled: computed again where it is needed.
  assert again.derived("sum", compute) == sum(prompt) and len(calls) == 3


def test_shared_prefixes():
  w = _synthetic(shared_prefix_fraction=0.5, num_shared_prefixes=2, shared_prefix_len=8)
  heads = [r.prompt_token_ids[:8] for r in w]
  counts = sorted(heads.count(h) for h in set(heads))
  assert sum(c for c in counts if c > 1) == 10  # round(0.5 * 20) requests share one of two prefixes.
  assert len({h for h in heads if heads.count(h) > 1}) <= 2
  assert {r.prompt_len for r in w} == {32}
  again = _synthetic(shared_prefix_fraction=0.5, num_shared_prefixes=2, shared_prefix_len=8)
  assert [r.prompt_token_ids for r in w] == [r.prompt_token_ids for r in again]
  # A prompt shorter than the prefix is the prefix cut short.
  p = workloads.materialize_prompts(np.array([3, 10]), 50, shared_prefix_fraction=1.0, shared_prefix_len=5)
  assert p[0] == p[1][:3]
  with pytest.raises(ValueError, match="shared_prefix_fraction"):
    workloads.materialize_prompts(np.array([3]), 50, shared_prefix_fraction=1.5)
