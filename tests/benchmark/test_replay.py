"""The replay and the experiment runner: greedy outputs across policies, metrics.json, the quickstart config,
an overload run that loses nothing, and config validation."""

import csv
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

import pdopt
from pdopt import benchmark
from pdopt import metrics
from pdopt.metrics import fairness
from pdopt.benchmark import deployments as deployments_lib
from pdopt.benchmark import results
from pdopt.scheduling import POLICIES
from pdopt.workloads import Workload, WorkloadConfig, WorkloadRequest, make_workload

REPO = pathlib.Path(__file__).resolve().parents[2]
POLICY_NAMES = tuple(sorted(POLICIES))

# A small engine shared by the tests that build their own (two compiled shapes; a pool of 12 pages of 16
# tokens holds three 64-token requests at once).
SMALL_ENGINE = dict(page_size=16, num_pages=12, max_model_len=128, max_num_batched_tokens=64, max_num_seqs=8,
                    chunk_size=32, attention_backend="reference", token_buckets=(16, 64), seq_buckets=(8,),
                    page_buckets=(8,))


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()  # As `config_flags` does: an override of a field that does not exist is an error.
  return config


@pytest.fixture(scope="module")
def model():
  return pdopt.init_model(pdopt.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  """The quickstart config with a handful of short requests (the overrides a user would pass)."""
  config = _load_config("quickstart")
  config.results_dir = str(tmp_path_factory.mktemp("results"))
  config.run_name = "quickstart_short"
  config.progress = False
  config.workload.num_requests = 6
  config.workload.max_prompt_len = 40
  config.workload.max_output_len = 6
  config.rate = 20.0
  return config, benchmark.run_experiment(config, print_fn=None)


def test_quickstart_writes_every_file(quickstart):
  config, out = quickstart
  run_dir = pathlib.Path(config.results_dir) / "quickstart_short"
  assert out["run_dir"] == run_dir
  for name in ("config.json", "metrics.json", "requests.csv", "ttft_cdf.png", "tpot_cdf.png"):
    assert (run_dir / name).stat().st_size > 0, name
  assert json.loads((run_dir / "config.json").read_text())["workload"]["num_requests"] == 6
  policies = benchmark.parse_policies(config.policies)
  assert policies == ("chunked", "prefill_first", "decode_first", "slo_aware")
  rows = list(csv.DictReader(open(run_dir / "requests.csv")))
  assert len(rows) == 6 * len(policies)
  assert list(rows[0])[:4] == ["run", "policy", "rate", "request_id"]
  assert {r["run"] for r in rows} == set(policies) and {float(r["rate"]) for r in rows} == {20.0}
  # Arrival times count from the start of the run: the first request arrives at 0.
  assert min(float(r["arrival_time"]) for r in rows if r["run"] == "chunked") == 0.0
  assert "chunked" in out["table"] and "P99 ITL (ms)" in out["table"]
  assert not (run_dir / "goodput_vs_rate.png").exists()


def test_metrics_json_holds_every_field(quickstart):
  config, out = quickstart
  written = json.loads((pathlib.Path(config.results_dir) / "quickstart_short" / "metrics.json").read_text())
  assert written == out["metrics"]
  assert list(written) == list(benchmark.parse_policies(config.policies))
  expected = (set(metrics.metrics_to_dict(metrics.compute_metrics([]))) | set(benchmark.ENGINE_STATS_KEYS)
              | set(results.PROVENANCE_KEYS) | set(fairness.fairness_metrics([], {}))
              | {"slowdown_reference", "by_class"})
  for policy, entry in written.items():
    assert set(entry) == expected, policy
    assert list(entry["by_class"]) == ["interactive"] and entry["by_class"]["interactive"]["num_requests"] == 6
    assert entry["slowdown_p50"] >= 1.0 and 0.0 < entry["jain_slowdown"] <= 1.0
    assert entry["device_count"] >= 1 and entry["jax_version"] and entry["date"].endswith("Z")
    assert entry["git_dirty"] in (True, False, None) and isinstance(entry["git_commit"], str)
    # One vocabulary of failures: failed = aborted + rejected; the runner's own counts are parts of them.
    assert entry["failed"] == entry["aborted"] + entry["rejected"]
    assert entry["rejected"] >= entry["num_rejected_at_submit"]
    assert entry["aborted"] >= entry["num_aborted_at_deadline"]
    for stat in metrics.STATISTICS:
      for latency in metrics.LATENCY_METRICS:
        assert f"{stat}_{latency}_ms" in entry
    assert entry["policy"] == policy
    assert entry["num_requests"] == 6 and entry["completed"] + entry["failed"] == 6
    assert entry["num_compilations"] == 0, "the warm-up should compile every shape the replay uses"
    assert entry["num_steps"] > 0 and entry["rate"] == 20.0
    assert 0.0 <= entry["prefix_cache_hit_rate"] <= 1.0


def test_docs_define_every_field(quickstart):
  """docs/results.md defines every metrics.json field and requests.csv column a run writes."""
  config, out = quickstart
  doc = (pathlib.Path(__file__).parents[2] / "docs" / "results.md").read_text()
  documented = set(re.findall(r"`([a-z0-9_{}]+)`", doc))
  patterns = [re.compile("^" + d.replace("{stat}", "[a-z0-9]+") + "$") for d in documented if "{stat}" in d]
  run_dir = pathlib.Path(config.results_dir) / "quickstart_short"
  columns = next(csv.reader(open(run_dir / "requests.csv")))
  for key in [*next(iter(out["metrics"].values())), *columns]:
    assert key in documented or any(p.match(key) for p in patterns), f"{key} is not in docs/results.md"


def test_greedy_outputs_identical_across_policies(quickstart):
  _, out = quickstart
  runs = out["runs"]
  reference = runs["chunked"].replay.outputs
  assert len(reference) == 6
  for record in runs["chunked"].records:
    assert record.status == "finished" and len(reference[record.request_id]) == record.output_len
  for policy, run in runs.items():
    finished = {r.request_id for r in run.records if r.status == "finished"}
    assert finished, policy
    for rid in finished:
      assert run.replay.outputs[rid] == reference[rid], (policy, rid)


def _overload_workload(model) -> Workload:
  """Arrivals at about twice what the small engine serves in virtual time, plus one request that can never
  be submitted (prompt + output longer than the context)."""
  w = make_workload(WorkloadConfig(kind="synthetic", name="overload", num_requests=24, rate=200.0, prompt_len=40,
                                   output_len=12, length_distribution="uniform", range_ratio=0.5, seed=3),
                    max_model_len=SMALL_ENGINE["max_model_len"], vocab_size=model.config.vocab_size)
  too_long = WorkloadRequest("too-long", w.requests[5].arrival_time, tuple(range(2, 130)), 8)
  requests = tuple(sorted((*w.requests, too_long), key=lambda r: r.arrival_time))
  return Workload(name="overload", requests=requests, num_clamped=w.num_clamped, mean_rate=w.mean_rate)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_overload_loses_nothing(model, policy):
  workload = _overload_workload(model)
  config = pdopt.EngineConfig(policy=policy, ttft_slo_ms=150.0, tpot_slo_ms=50.0, **SMALL_ENGINE)
  clock = benchmark.VirtualClock(tick=0.002)  # 4 ms of virtual time per step: ~16 tokens/ms at most.
  engine = pdopt.Engine(model, config, clock=clock)
  result = benchmark.replay(engine, workload, progress=False)
  engine.check_no_leaks()
  assert not engine.has_unfinished()
  assert [r.request_id for r in result.records] == [r.request_id for r in workload.requests]
  by_id = {r.request_id: r for r in result.records}
  assert by_id["too-long"].status == "rejected" and "max_model_len" in by_id["too-long"].reason
  assert result.num_rejected_at_submit == 1
  served = [r for r in result.records if r.request_id != "too-long"]
  for record in served:
    if policy == "slo_aware" and record.status == "rejected":
      assert record.reason and record.slo_miss
    else:
      assert record.status == "finished", (record.request_id, record.status, record.reason)
      assert record.output_len == next(r.max_tokens for r in workload.requests if r.request_id == record.request_id)
  # The arrivals did outpace the engine: requests waited in the queue.
  ttfts = [r.first_token_time - r.arrival_time for r in served if r.status == "finished"]
  assert max(ttfts) > 10 * min(ttfts)
  m = metrics.compute_metrics(result.records, duration=result.duration)
  assert m.num_requests == len(workload) and m.completed + m.failed == len(workload)


def test_replay_waits_for_arrivals(model):
  """Idle gaps are slept through on the injected clock; arrival times are start + trace time."""
  requests = tuple(WorkloadRequest(f"r{i}", 10.0 * i, (3, 4, 5, 6 + i), 3) for i in range(3))
  workload = Workload(name="gaps", requests=requests, num_clamped=0, mean_rate=0.1)
  clock = benchmark.VirtualClock(start=100.0, tick=0.001)
  engine = pdopt.Engine(model, pdopt.EngineConfig(**SMALL_ENGINE), clock=clock)
  result = benchmark.replay(engine, workload, progress=False)
  assert result.start == 100.0
  for i, record in enumerate(result.records):
    assert record.status == "finished"
    assert record.arrival_time == 100.0 + 10.0 * i
    assert record.arrival_time <= record.first_scheduled_time < record.arrival_time + 0.05
  assert 20.0 < result.duration < 20.2


def test_max_duration_aborts_the_rest(model):
  requests = tuple(WorkloadRequest(f"r{i}", 1.0 * i, (3, 4, 5), 4) for i in range(4))
  workload = Workload(name="late", requests=requests, num_clamped=0, mean_rate=1.0)
  engine = pdopt.Engine(model, pdopt.EngineConfig(**SMALL_ENGINE), clock=benchmark.VirtualClock(tick=0.001))
  result = benchmark.replay(engine, workload, progress=False, max_duration=1.5)
  engine.check_no_leaks()
  statuses = [r.status for r in result.records]
  assert statuses[:2] == ["finished", "finished"] and statuses[2:] == ["aborted", "aborted"]
  assert result.num_aborted_at_deadline == 2


def test_rate_sweep_layout(tmp_path):
  config = {
      "run_name": "sweep", "results_dir": str(tmp_path), "policies": "chunked,prefill_first", "rates": "50,100",
      "progress": False, "slo": "ttft:1000",
      "workload": {"kind": "synthetic", "num_requests": 3, "prompt_len": 20, "output_len": 3},
      "engine": dict(SMALL_ENGINE),
  }
  out = benchmark.run_experiment(config, print_fn=None)
  run_dir = tmp_path / "sweep"
  assert (run_dir / "goodput_vs_rate.png").stat().st_size > 0
  written = json.loads((run_dir / "metrics.json").read_text())
  # The same shape as a single-rate run: {run: entry}, each entry naming its policy and rate.
  assert list(written) == ["chunked@50", "prefill_first@50", "chunked@100", "prefill_first@100"]
  assert written == out["metrics"]
  assert written["chunked@50"]["rate"] == 50.0 and written["chunked@50"]["policy"] == "chunked"
  assert written["prefill_first@100"]["completed"] == 3
  assert set(written["chunked@50"]) == set(written["prefill_first@100"])
  rows = list(csv.DictReader(open(run_dir / "requests.csv")))
  assert {r["run"] for r in rows} == set(written)
  assert {(r["policy"], float(r["rate"])) for r in rows} == {(p, r) for p in ("chunked", "prefill_first")
                                                            for r in (50.0, 100.0)}
  assert "rate 50 req/s" in out["table"]
  assert out["runs"]["chunked"]["50"].stats["rate"] == 50.0


def test_rerun_never_mixes_files(tmp_path):
  config = {
      "run_name": "again", "results_dir": str(tmp_path), "policies": "chunked", "rates": "50,100",
      "progress": False, "workload": {"kind": "synthetic", "num_requests": 2, "prompt_len": 20, "output_len": 2},
      "engine": dict(SMALL_ENGINE),
  }
  first = benchmark.run_experiment(config, print_fn=None)["run_dir"]
  assert first == tmp_path / "again" and (first / "goodput_vs_rate.png").exists()
  # A rerun goes to a fresh directory; the earlier one is untouched.
  single = {**config, "rates": "", "rate": 50.0}
  second = benchmark.run_experiment(single, print_fn=None)["run_dir"]
  assert second == tmp_path / "again_2" and not (second / "goodput_vs_rate.png").exists()
  assert (first / "goodput_vs_rate.png").exists()
  # Overwriting replaces the earlier run's files: no stale sweep plot is left.
  third = benchmark.run_experiment(single, print_fn=None, overwrite=True)["run_dir"]
  assert third == first and not (first / "goodput_vs_rate.png").exists()
  assert list(json.loads((first / "metrics.json").read_text())) == ["chunked"]
  (first / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="notes.txt"):
    results.prepare_run_dir(tmp_path, "again", overwrite=True)


def test_invalid_config_writes_nothing(tmp_path):
  base = {"results_dir": str(tmp_path / "results"), "workload": {"num_requests": 2}, "rate": 1.0}
  for bad, match in [({"policies": "fcfs"}, "unknown policy 'fcfs'"),
                     ({"hf_dir": str(tmp_path / "none")}, "config.hf_dir=.* does not exist"),
                     ({"workload": {"kind": "azure", "path": "nope.csv"}}, "config.workload.path='nope.csv'"),
                     ({"run_name": "../up"}, "config.run_name"),
                     ({"cost_model": "none.json"}, "config.cost_model")]:
    with pytest.raises(benchmark.ConfigError, match=match):
      benchmark.run_experiment({**base, **bad}, print_fn=None)
    with pytest.raises(benchmark.ConfigError, match=match):
      benchmark.validate_config({**base, **bad})
  assert not (tmp_path / "results").exists()


def test_config_validation():
  with pytest.raises(ValueError, match=r"unknown policy 'fcfs'; valid: chunked, decode_first"):
    benchmark.parse_policies("chunked,fcfs")
  with pytest.raises(ValueError, match="twice"):
    benchmark.parse_policies("chunked,chunked")
  assert benchmark.parse_policies(" chunked , prefill_first ") == ("chunked", "prefill_first")
  assert benchmark.parse_rates("1, 2.5") == (1.0, 2.5) and benchmark.parse_rates("") == ()
  with pytest.raises(ValueError, match="must be > 0"):
    benchmark.parse_rates("1,-2")
  with pytest.raises(ValueError, match="unknown experiment field config.workload.nmu_requests"):
    benchmark.as_config({"workload": {"nmu_requests": 3}})
  with pytest.raises(ValueError, match="unknown policy 'nope'"):
    benchmark.run_experiment({"policies": "nope", "results_dir": "/nonexistent/never"}, print_fn=None)
  with pytest.raises(ValueError, match="unknown SLO metric"):
    benchmark.run_experiment({"slo": "latency:3", "results_dir": "/nonexistent/never"}, print_fn=None)
  valid = {"rate": 1.0, "workload": {"num_requests": 2}, "results_dir": "/nonexistent/never"}
  with pytest.raises(ValueError, match="tensor_parallel=-1 must be >= 0"):
    benchmark.run_experiment({**valid, "tensor_parallel": -1}, print_fn=None)
  with pytest.raises(ValueError, match="MeshConfig.model=3 does not divide the 1 devices"):
    benchmark.run_experiment({**valid, "tensor_parallel": 3}, print_fn=None)


@pytest.mark.parametrize("name", ["quickstart", "azure_conv", "arxiv_long", "disagg_cpu", "disagg_gpu"])
def test_configs_are_valid(name):
  """Every shipped config builds its engine and workload configs (nothing runs)."""
  config = _load_config(name)
  deployments = deployments_lib.parse_deployments(config.deployments)
  for policy in benchmark.parse_policies(config.policies, allow_none=bool(deployments)):
    benchmark.engine_config(config, policy)
  for rate in benchmark.parse_rates(config.rates) or (None,):
    benchmark.workload_config(config, rate)
  assert np.isfinite(benchmark.workload_config(config).cv)
