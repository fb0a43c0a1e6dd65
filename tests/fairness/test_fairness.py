"""Fairness and priorities: the metrics on hand-computed cases, priority classes and clients in workloads, swap
preemption (greedy identity, nothing lost), and the `fair` policy's properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pdopt
from pdopt import workloads
from pdopt.metrics import RequestRecord
from pdopt.metrics import compute_metrics
from pdopt.metrics.fairness import class_metrics, fairness_metrics, ideal_latencies, jain_index, slowdowns
from pdopt.scheduling import RequestView, SchedulerView, SchedulingConfig, make_scheduler

VOCAB = 512


def _record(rid, arrival, finish, priority=0, client="", stall=0.0, n=2):
  times = tuple(np.linspace(arrival + 0.1, finish, n))
  return RequestRecord(request_id=rid, prompt_len=4, output_len=n, arrival_time=arrival, first_scheduled_time=arrival,
                       first_token_time=times[0], token_times=times, finish_time=finish, priority=priority,
                       client=client, decode_stall_s=stall)


def test_jain_index_by_hand():
  assert jain_index([2.0, 2.0, 2.0]) == pytest.approx(1.0)
  assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # One takes it all: 1/n.
  assert jain_index([1.0, 3.0]) == pytest.approx(16 / (2 * 10))
  assert math.isnan(jain_index([]))


def test_fairness_metrics_by_hand():
  records = [_record("a", 0.0, 2.0, 0, "x", stall=0.5), _record("b", 0.0, 4.0, 0, "x"), _record("c", 1.0, 3.0, 1, "y"),
             _record("d", 1.0, 2.0, 1, "y", stall=0.25),
             RequestRecord(request_id="e", prompt_len=4, output_len=0, arrival_time=0.0, finish_time=1.0,
                           status="rejected", reason="full", slo_miss=True)]
  ideal = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.5, "e": 1.0}
  assert slowdowns(records, ideal) == {"a": 2.0, "b": 4.0, "c": 2.0, "d": 2.0}
  m = fairness_metrics(records, ideal)
  assert m["slowdown_p50"] == pytest.approx(2.0) and m["slowdown_mean"] == pytest.approx(2.5)
  assert m["jain_slowdown"] == pytest.approx(10 ** 2 / (4 * 28))
  assert m["jain_slowdown_interactive"] == pytest.approx(36 / (2 * 20)) and m["jain_slowdown_batch"] == 1.0
  assert m["jain_slowdown_by_client"] == {"x": pytest.approx(36 / 40), "y": 1.0}
  assert m["jain_slowdown_across_clients"] == pytest.approx(25 / (2 * 13))
  assert m["decode_stall_s_mean"] == pytest.approx(0.75 / 4) and m["unfinished"] == 1


def test_class_slos_and_class_metrics_by_hand():
  # a: 2 s, b: 4 s (interactive); c: 2 s, d: 1 s (batch). Interactive SLO e2el 3 s, batch 1.5 s.
  records = [_record("a", 0.0, 2.0, 0), _record("b", 0.0, 4.0, 0), _record("c", 1.0, 3.0, 1), _record("d", 1.0, 2.0, 1)]
  overall = compute_metrics(records, slo="e2el:3000", duration=4.0, class_slos={1: "e2el:1500"})
  assert overall.request_goodput == pytest.approx(2 / 4.0)  # a and d.
  assert compute_metrics(records, slo="e2el:3000", duration=4.0).request_goodput == pytest.approx(3 / 4.0)
  by_class = class_metrics(records, "e2el:3000", 4.0, {1: "e2el:1500"})
  assert list(by_class) == ["interactive", "batch"]
  assert by_class["interactive"]["completed"] == 2 and by_class["interactive"]["slo_attainment"] == 0.5
  assert by_class["batch"]["slo"] == "e2el:1500" and by_class["batch"]["slo_attainment"] == 0.5
  assert by_class["batch"]["median_e2el_ms"] == pytest.approx(1500.0)
  ideal = ideal_latencies(records, lambda prompt_len, output_len: 0.5 * prompt_len + output_len)
  assert ideal == {"a": 4.0, "b": 4.0, "c": 4.0, "d": 4.0}


def test_workload_classes_and_clients():
  config = workloads.WorkloadConfig(kind="synthetic", num_requests=400, rate=10.0, prompt_len=100, output_len=10,
                                    length_distribution="uniform", range_ratio=0.9, batch_fraction=0.25,
                                    batch_min_prompt_len=180, num_clients=4, client_skew=1.0, seed=1)
  w = workloads.make_workload(config, max_model_len=512, vocab_size=VOCAB)
  batch = [r for r in w if r.priority == 1]
  assert all(r.priority == 1 for r in w if r.prompt_len >= 180)
  assert 0.25 < len(batch) / len(w) < 0.45  # A quarter at random, plus the long prompts.
  counts = [sum(r.client == f"client-{k}" for r in w) for k in range(4)]
  assert counts == sorted(counts, reverse=True) and sum(counts) == 400  # Skewed towards client-0.
  again = workloads.make_workload(config, max_model_len=512, vocab_size=VOCAB)
  assert [(r.priority, r.client) for r in again] == [(r.priority, r.client) for r in w]  # Seeded.
  with pytest.raises(ValueError, match="batch_fraction"):
    workloads.WorkloadConfig(kind="synthetic", num_requests=2, rate=1.0, batch_fraction=1.5)


@pytest.fixture(scope="module")
def model():
  return pdopt.init_model(pdopt.preset("tiny"), seed=0)


def test_swap_preemption_keeps_greedy_outputs_and_loses_nothing(model):
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(2, VOCAB, size=int(rng.integers(20, 90)))) for _ in range(10)]
  params = pdopt.SamplingParams(max_tokens=30, ignore_eos=True)
  small = dict(page_size=8, num_pages=40, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
               token_buckets=(16, 64), seq_buckets=(8,), page_buckets=(32,))
  expected = pdopt.Engine(model, pdopt.EngineConfig(num_pages=256, **{k: v for k, v in small.items()
                                                                       if k != "num_pages"})).generate(prompts, params)
  runs = {}
  for mode in ("recompute", "swap"):
    engine = pdopt.Engine(model, pdopt.EngineConfig(preemption_mode=mode, **small))
    outs = engine.generate(prompts, params)
    engine.check_no_leaks()
    assert engine.num_preemptions > 0, "the pool should be small enough to preempt"
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert all(r.swapped is None for r in engine.requests.values())
    runs[mode] = engine
  swap = runs["swap"].executor.stats()
  assert swap["swap_out_bytes"] == swap["swap_in_bytes"] > 0 and swap["swap_in_gbps"] > 0
  recomputed = lambda e: sum(r.num_prefill_tokens_computed for r in e.requests.values())  # noqa: E731
  assert recomputed(runs["swap"]) < recomputed(runs["recompute"])  # Swapped requests are not prefilled again.
  with pytest.raises(ValueError, match="preemption_mode='copy'; valid: recompute, swap"):
    pdopt.EngineConfig(preemption_mode="copy")


def test_priorities_and_clients_reach_the_records(model):
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=64, max_model_len=256))
  a = engine.add_request([3, 4, 5], pdopt.SamplingParams(max_tokens=3, ignore_eos=True), priority=1, client="x")
  while engine.has_unfinished():
    engine.step()
  record = engine.records()[0]
  assert (record.request_id, record.priority, record.client) == (a, 1, "x")
  with pytest.raises(ValueError, match="priority=-1"):
    engine.add_request([3], priority=-1)


def _view(waiting, running=(), free_pages=1000):
  return SchedulerView(now=10.0, running=tuple(running), waiting=tuple(waiting), free_pages=free_pages, page_size=16,
                       num_pages=2000)


def _waiting(rid, arrival, client="", priority=0, prompt=32):
  return RequestView(rid, arrival, prompt, prompt, 0, 0, 0, 8, False, priority=priority, client=client)


def test_fair_serves_the_least_served_client_first():
  policy = make_scheduler(SchedulingConfig(policy="fair", max_num_batched_tokens=32, max_num_seqs=8))
  flood = [_waiting(f"a{i}", float(i), "a") for i in range(6)]
  late = _waiting("b0", 9.0, "b")
  order = []
  waiting = flood + [late]
  for _ in range(4):  # One 32-token prompt fits a step; what was admitted leaves the queue.
    chunk, = policy.schedule(_view(waiting)).chunks
    order.append(chunk.request_id)
    waiting = [r for r in waiting if r.request_id != chunk.request_id]
  assert order[:2] == ["a0", "b0"]  # The late client's request goes before the flood's second.
  assert policy.counters["a"] > 0 and policy.counters["b"] > 0


def test_fair_weights_interactive_over_batch_without_starving_batch():
  policy = make_scheduler(SchedulingConfig(policy="fair", max_num_batched_tokens=32, max_num_seqs=8))
  waiting = [_waiting(f"i{i}", float(i), priority=0) for i in range(20)] + \
            [_waiting(f"b{i}", float(i), priority=1) for i in range(20)]
  order = []
  for _ in range(20):
    chunk, = policy.schedule(_view(waiting)).chunks
    order.append(chunk.request_id[0])
    waiting = [r for r in waiting if r.request_id != chunk.request_id]
  assert order.count("i") == 16 and order.count("b") == 4  # Service in the classes' 4:1 ratio.


def test_fair_gives_no_credit_for_time_away():
  policy = make_scheduler(SchedulingConfig(policy="fair", max_num_batched_tokens=32, max_num_seqs=8))
  for i in range(5):  # Only client a is active for a while.
    policy.schedule(_view([_waiting(f"a{i}", float(i), "a")]))
  assert policy.counters["a"] > 0
  policy.schedule(_view([_waiting("a9", 9.0, "a"), _waiting("b0", 9.5, "b")]))
  assert policy.counters["b"] >= policy.counters["a"] - 32  # Starts at a's level, not at 0.


def test_fair_shares_between_classes_hold_whatever_the_clients():
  # Client "a" sends only interactive requests, client "b" only batch ones: the classes' 4:1 share decides, not
  # the clients' counters (which alone would alternate a and b).
  policy = make_scheduler(SchedulingConfig(policy="fair", max_num_batched_tokens=32, max_num_seqs=8))
  waiting = [_waiting(f"i{i}", float(i), "a", priority=0) for i in range(20)] + \
            [_waiting(f"b{i}", float(i), "b", priority=1) for i in range(20)]
  order = []
  for _ in range(20):
    chunk, = policy.schedule(_view(waiting)).chunks
    order.append(chunk.request_id)
    waiting = [r for r in waiting if r.request_id != chunk.request_id]
  assert sum(r[0] == "i" for r in order) == 16
  # Within each class, arrival order (one client per class here).
  assert [r for r in order if r[0] == "b"] == ["b0", "b1", "b2", "b3"]
