"""Simulated deployments (`pdopt.sim.deployment`) and the deployment search (`pdopt.sim.search`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import pathlib
import signal

import pytest

import pdopt
from pdopt import benchmark, deploy, sim, workloads
from pdopt.benchmark import config as config_lib
from pdopt.benchmark import deployment_search, experiment
from pdopt.engine.costs import model_sizes
from pdopt.metrics import parse_slo
from pdopt.scheduling.step_cost import AllReduce, DeviceSpec, StepCostModel
from pdopt.sim import search as search_lib
from pdopt.sim.deployment import TransferModel, simulate_deployment

MODEL = pdopt.preset("tiny")
ENGINE = pdopt.EngineConfig(page_size=8, num_pages=96, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
                            token_buckets=(16, 64), seq_buckets=(4, 8), page_buckets=(8, 32))
COST = StepCostModel(model_sizes(MODEL), DeviceSpec("test", 1e9, 1e11), (2e-3, 5e-5, 1e-4, 1.5, 2.0, 1.2, 0.3, 1e-4),
                     source="test")


def _workload(n: int = 40, rate: float = 25.0) -> workloads.Workload:
  return workloads.make_workload(workloads.WorkloadConfig(kind="synthetic", num_requests=n, rate=rate, prompt_len=60,
                                                          output_len=20, length_distribution="uniform",
                                                          range_ratio=0.9, seed=3),
                                 max_model_len=256, vocab_size=MODEL.vocab_size)


def _timeline(records):
  return [(r.request_id, r.status, r.output_len, r.first_scheduled_time, r.first_token_time, r.token_times,
           r.finish_time) for r in records]


def test_one_replica_is_the_simulated_engine():
  w = _workload()
  clock = sim.VirtualClock()
  engine = sim.simulated_engine(MODEL, ENGINE, COST, clock, arrivals=[r.arrival_time for r in w])
  alone = benchmark.replay(engine, w, progress=False)
  result = simulate_deployment(deploy.DeploymentConfig(mode="colocated", num_decode=1, engine=ENGINE), MODEL,
                               lambda role: COST, TransferModel(1e9), w)
  assert _timeline(result.records) == _timeline(alone.records)


def test_disaggregated_moves_every_request_once_and_ends_it():
  w = _workload()
  xfer = TransferModel(1e8, 1e-3, "test")
  result = simulate_deployment(deploy.DeploymentConfig(mode="disaggregated", num_prefill=1, num_decode=2,
                                                       engine=ENGINE), MODEL, lambda role: COST, xfer, w)
  assert result.num_transfers == len(w) and not result.stopped
  assert [r.request_id for r in result.records] == [r.request_id for r in w]
  kv_token = COST.sizes.kv_bytes_per_token
  for req, rec in zip(w, result.records):
    assert rec.status == "finished" and rec.output_len == req.max_tokens
    assert rec.kv_transfer_bytes == math.ceil(req.prompt_len / 8) * 8 * kv_token  # The prompt's pages.
    assert rec.kv_transfer_s == pytest.approx(xfer.seconds(rec.kv_transfer_bytes))
    assert rec.token_times[1] - rec.token_times[0] >= rec.kv_transfer_s  # The second token waits for the move.


def test_a_prefill_instance_full_of_pages_for_a_full_decode_instance_waits_for_it():
  # Long outputs at a high rate: the decode pool fills, the handed-off requests wait on the prefill side and
  # their pages fill its pool, so the prefill instance's steps can do nothing until the decode side takes some.
  w = workloads.make_workload(workloads.WorkloadConfig(kind="synthetic", num_requests=60, rate=200.0, prompt_len=60,
                                                       output_len=60, length_distribution="uniform", range_ratio=0.9,
                                                       seed=3), max_model_len=256, vocab_size=MODEL.vocab_size)
  config = deploy.DeploymentConfig(mode="disaggregated", num_prefill=1, num_decode=1, engine=ENGINE)
  with _time_limit(30):  # It used to step the waiting prefill instance forever, its clock standing still.
    result = simulate_deployment(config, MODEL, lambda role: COST, TransferModel(1e8, 1e-3, "test"), w)
  assert result.num_transfers == len(w) and [r.status for r in result.records] == ["finished"] * len(w)


@contextlib.contextmanager
def _time_limit(seconds: int):
  def fail(*_):
    raise TimeoutError(f"over {seconds} s")
  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_stops_once_the_target_cannot_be_met():
  w = _workload(60, rate=400.0)  # Far beyond what the model serves within the SLO.
  slo = parse_slo("ttft:50 tpot:50")
  config = deploy.DeploymentConfig(mode="colocated", num_decode=1, engine=ENGINE)
  full = simulate_deployment(config, MODEL, lambda role: COST, TransferModel(1e9), w)
  stopped = simulate_deployment(config, MODEL, lambda role: COST, TransferModel(1e9), w, slo=slo, max_misses=6)
  assert stopped.stopped and len(stopped.records) < len(full.records) == len(w)


@pytest.mark.parametrize("policy", sorted(pdopt.scheduling.POLICIES))
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_blocks_that_run_past_other_instances_events_change_nothing(policy, mode, monkeypatch):
  # Round robin: where a request goes does not depend on when the instances' earlier requests ended, which
  # a step applies at its start and a block at its end. The decode pools never fill, so a request handed over
  # moves when it arrives, whatever the decode instance is doing.
  w = _workload(60, rate=60.0)
  config = deploy.DeploymentConfig(mode=mode, num_prefill=1 if mode == "disaggregated" else None,
                                   num_decode=2 if mode == "disaggregated" else 3, router="round_robin",
                                   engine=dataclasses.replace(ENGINE, policy=policy))
  cut = []
  interrupt = sim.SimExecutor.interrupt

  def counted(self, t):
    steps = self.in_flight.num_steps if self.in_flight is not None else 0
    interrupt(self, t)
    if self.in_flight is not None and self.in_flight.num_steps < steps:
      cut.append(steps - self.in_flight.num_steps)

  monkeypatch.setattr(sim.SimExecutor, "interrupt", counted)
  blocks = simulate_deployment(config, MODEL, lambda role: COST, TransferModel(1e8, 1e-3), w)
  single = simulate_deployment(config, MODEL, lambda role: COST, TransferModel(1e8, 1e-3), w, chain=False)
  assert _timeline(blocks.records) == _timeline(single.records)  # Bit for bit.
  assert blocks.num_steps == single.num_steps and blocks.num_preemptions == single.num_preemptions
  assert cut  # Blocks ran past events elsewhere and were cut back where one reached their instance.


def test_tensor_parallel_scaling_divides_the_work_and_adds_the_all_reduces():
  allreduce = AllReduce(per_step=4, bytes_per_token=256, bandwidth=1e10, latency=1e-5, source="test")
  tp2 = COST.with_tensor_parallel(2, allreduce)
  assert tp2.kind == "scaled" and "TP 2" in tp2.source and tp2.sizes.tensor_parallel == 2
  assert tp2.sizes.weight_bytes == COST.sizes.weight_bytes / 2
  q, kv = [64], [64]
  assert tp2.seconds(q, kv) == pytest.approx(COST.seconds(q, kv) - _device_share(COST, q, kv) / 2
                                             + allreduce.seconds(64))
  assert COST.with_tensor_parallel(1, allreduce) is COST


def _device_share(cost, q, kv):
  """The terms that scale with the shard's size (all but the fixed, per-token and per-sequence ones)."""
  f = cost.features(q, kv)
  return sum(c * x for c, x in zip(cost.coefficients[3:7], f[3:7]))


def _problem(n: int = 30) -> search_lib.Problem:
  w = _workload(n, rate=10.0)
  allreduce = {2: AllReduce(per_step=4, bytes_per_token=256, bandwidth=1e10, latency=1e-5, source="test")}
  return search_lib.Problem(MODEL, dataclasses.replace(ENGINE, token_buckets=None, seq_buckets=None), COST, allreduce,
                            TransferModel(1e9, 1e-4), w.requests, w.mean_rate, parse_slo("ttft:500 tpot:100"),
                            attainment=0.9, rate_range=(0.5, 64.0), iterations=4)


def test_search_ranks_candidates_and_resumes(tmp_path):
  space = search_lib.SearchSpace(policies=("chunked",), token_budgets=(64,), chunk_sizes=(32,), max_num_seqs=(8,),
                                 replicas=(1, 2), splits=((1, 1),), tps=(1, 2), gpus=2)
  candidates = space.candidates()
  assert {c.label for c in candidates} == {"coloca-1x-tp1-chunked-b64-c32-s8", "coloca-2x-tp1-chunked-b64-c32-s8",
                                           "disagg-1P1D-tp1-chunked-b64-c32-s8", "coloca-1x-tp2-chunked-b64-c32-s8"}
  results_file = tmp_path / "results.jsonl"
  first = search_lib.search(_problem(), candidates[:2], results_file, workers=1)
  results = search_lib.search(_problem(), candidates, results_file, workers=2)  # Resumes: 2 more, in workers.
  assert len(results_file.read_text().splitlines()) == 4
  assert {r["label"] for r in first} <= {r["label"] for r in results}
  assert [r["goodput_per_gpu"] for r in results] == sorted((r["goodput_per_gpu"] for r in results), reverse=True)
  assert all(r["goodput_per_gpu"] > 0 and r["slo_attainment"] >= 0.9 for r in results)
  tp2 = next(r for r in results if r["candidate"]["tp"] == 2)
  assert tp2["step_cost_kind"] == "scaled"
  for r in results:  # Started from its anchor's goodput per GPU or not, in a worker or not: the same rate.
    alone = search_lib.evaluate(_problem(), search_lib.Candidate(**r["candidate"]))
    assert (r["goodput_per_gpu"], r["slo_attainment"]) == (alone["goodput_per_gpu"], alone["slo_attainment"])


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_galloping_from_any_start_finds_what_bisection_finds(n):
  for answer in range(-1, n):
    asked = []

    def passes(k):
      asked.append(k)
      return k <= answer

    assert search_lib.highest_passing(n, passes) == answer
    assert len(asked) <= math.ceil(math.log2(n + 1))
    for start in range(n):
      asked.clear()
      assert search_lib.highest_passing(n, passes, start) == answer
      assert len(asked) == len(set(asked)) and all(0 <= k < n for k in asked)
      if abs(start - answer) <= 1:
        assert len(asked) <= 3


def test_search_writes_a_best_config_that_the_runner_reads(tmp_path):
  config = deployment_search.default_search_config()
  config.run_name, config.results_dir, config.model, config.dtype = "s", str(tmp_path), "tiny", "float32"
  config.cost_model = str(tmp_path / "cost.json")
  COST.save(config.cost_model)
  config.workload.kind, config.workload.name = "synthetic", "synthetic"
  config.workload.num_requests, config.workload.rate = 40, 10.0
  config.min_requests, config.min_duration = 20, 1.0  # A window of the 40-request pool, its first 20 or more.
  config.workload.prompt_len, config.workload.output_len = 40, 10
  config.engine.num_pages, config.engine.max_model_len = 96, 256
  config.space.policies, config.space.token_budgets, config.space.chunk_sizes = ("chunked",), (64,), (32,)
  config.space.max_num_seqs, config.space.replicas, config.space.tps = (8,), (1, 2), (1,)
  config.space.splits = ((1, 1),)
  config.gpus, config.iterations, config.rate_range, config.workers = 2, 3, (0.5, 32.0), 1
  results = deployment_search.run_search(config, print_fn=None)
  assert len(results) == 3
  out = tmp_path / "s"
  assert (out / "frontier.png").exists() and (out / "top.md").exists()
  spec = importlib.util.spec_from_file_location("best", out / "best_config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  best = config_lib.as_config(module.get_config())
  assert best.deployments == search_lib.Candidate(**results[0]["candidate"]).deployments_spec()
  # The config serves the requests the best rate was judged on, at the arrival times the search gave them.
  n = results[0]["num_requests"]
  assert 20 <= n <= 40 and best.workload.num_requests == n
  judged = search_lib.at_rate(deployment_search.problem(config), results[0]["rate"]).requests
  real = experiment.build_workload(best, experiment.build_model_config(best)).requests
  assert [r.request_id for r in real] == [r.request_id for r in judged]
  assert [r.arrival_time for r in real] == pytest.approx([r.arrival_time for r in judged], rel=1e-9, abs=1e-9)
  assert best.engine.num_pages == 96 and best.engine.max_num_batched_tokens == 64
  assert json.loads((out / "search_config.json").read_text())["run_name"] == "s"
  assert (out / "median_config.py").exists()
  # The best config runs in the simulator through the runner, as a deployment of the same schema, priced as
  # the search priced it.
  assert (best.cost_model, best.sim_device) == (config.cost_model, config.device)
  best.backend, best.results_dir, best.progress = "sim", str(tmp_path), False
  entry = benchmark.run_experiment(best, print_fn=None)["metrics"]
  (label, run), = entry.items()
  assert run["backend"] == "sim" and run["completed"] == n and label.startswith(("colocated", "disagg"))


def test_a_best_config_replays_the_trace_window_it_was_judged_on(tmp_path):
  """With trace arrivals the window is scaled to its own mean rate: `run_rate` gives it the search's times."""
  config = deployment_search.default_search_config()
  config.model, config.dtype, config.cost_model = "tiny", "float32", str(tmp_path / "cost.json")
  COST.save(config.cost_model)
  config.workload.num_requests, config.min_requests, config.min_duration = 200, 40, 2.0
  config.engine.max_model_len = 512
  problem = deployment_search.problem(config)
  result = {"rate": 23.0, "num_requests": search_lib.window(problem, 23.0)}
  rate = deployment_search.run_rate(config, problem, result)
  run = config_lib.as_config({"model": "tiny", "dtype": "float32", "rate": rate, "engine": {"max_model_len": 512},
                              "workload": {**config.workload.to_dict(), "num_requests": result["num_requests"]}})
  real = experiment.build_workload(run, experiment.build_model_config(run)).requests
  judged = search_lib.at_rate(problem, 23.0).requests
  assert len(real) == 46
  assert [r.request_id for r in real] == [r.request_id for r in judged]
  assert [r.arrival_time for r in real] == pytest.approx([r.arrival_time for r in judged], rel=1e-9, abs=1e-9)


def test_a_simulated_replica_through_the_runner_is_the_simulated_engine(tmp_path):
  """`--config.backend=sim` with deployments: colocated:1 serves exactly as the policy's simulated engine."""
  out = benchmark.run_experiment({
      "run_name": "r", "results_dir": str(tmp_path), "model": "tiny-code", "backend": "sim", "progress": False,
      "policies": "chunked", "deployments": "colocated:1,disaggregated:1:1", "rate": 8.0,
      "workload": {"kind": "synthetic", "num_requests": 30, "prompt_len": 200, "output_len": 20},
      "engine": {"max_model_len": 512}}, print_fn=None)
  engine, replica = out["runs"]["chunked"], out["runs"]["colocated-1x-chunked"]
  assert [(r.request_id, r.token_times) for r in engine.records] == \
      [(r.request_id, r.token_times) for r in replica.records]
  disagg = out["metrics"]["disagg-1P1D-chunked"]
  assert disagg["num_transfers"] == 30 and disagg["completed"] == 30 and disagg["transfer_model"]


def test_no_worker_outlives_a_killed_search(tmp_path):
  """SIGKILL of a search leaves none of its worker processes behind."""
  import os, signal, subprocess, sys, time  # pylint: disable=import-outside-toplevel,multiple-imports
  config = tmp_path / "search.py"
  config.write_text(
      "from configs import search_cpu\n"
      "def get_config():\n"
      "  c = search_cpu.get_config()\n"
      f"  c.results_dir = {str(tmp_path)!r}\n"
      "  c.workers = 2\n"
      "  c.workload.num_requests = 4000\n"
      "  c.min_duration = 600.0\n"  # Long runs: the workers are busy when the search dies.
      "  return c\n")
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
  proc = subprocess.Popen([sys.executable, "-m", "experiments.search", f"--config={config}"], cwd=repo, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def workers():
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]

  deadline = time.time() + 60
  while len(workers()) < 2 and time.time() < deadline:
    time.sleep(0.5)
  children = workers()
  assert len(children) >= 2, "the search did not start its workers"
  time.sleep(3)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 20
  while any(os.path.exists(f"/proc/{p}") for p in children) and time.time() < deadline:
    time.sleep(0.5)
  alive = [p for p in children if os.path.exists(f"/proc/{p}")]
  assert not alive, f"workers {alive} outlived their search"


def test_a_candidate_starts_from_the_colocated_one_with_the_next_fewer_instances():
  space = search_lib.SearchSpace(policies=("chunked",), token_budgets=(64,), chunk_sizes=(32,), max_num_seqs=(8,),
                                 replicas=(1, 2, 4, 8), splits=((1, 1), (2, 2), (4, 4)), tps=(1, 2), gpus=8)
  candidates = space.candidates()
  by_label = {c.label: c for c in candidates}

  def anchor(label):
    a = search_lib.anchor(by_label[label], candidates)
    return a.label if a is not None else None

  assert anchor("coloca-1x-tp1-chunked-b64-c32-s8") is None
  assert anchor("coloca-8x-tp1-chunked-b64-c32-s8") == "coloca-4x-tp1-chunked-b64-c32-s8"
  assert anchor("coloca-4x-tp2-chunked-b64-c32-s8") == "coloca-2x-tp2-chunked-b64-c32-s8"
  assert anchor("disagg-2P2D-tp1-chunked-b64-c32-s8") == "coloca-4x-tp1-chunked-b64-c32-s8"
  assert anchor("disagg-1P1D-tp2-chunked-b64-c32-s8") == "coloca-2x-tp2-chunked-b64-c32-s8"


def test_a_candidate_starts_from_its_anchor_scaled_as_the_reference_candidates_scaled():
  space = search_lib.SearchSpace(policies=("chunked", "prefill_first"), token_budgets=(64,), chunk_sizes=(32,),
                                 max_num_seqs=(8,), replicas=(1, 2, 4), splits=((2, 2),), tps=(1,), gpus=4)
  candidates = space.candidates()
  by_label = {c.label: c for c in candidates}
  c4, c2, c1 = (f"coloca-{n}x-tp1-chunked-b64-c32-s8" for n in (4, 2, 1))
  p4, p2, p1 = (f"coloca-{n}x-tp1-prefill_first-b64-c32-s8" for n in (4, 2, 1))
  pd = "disagg-2P2D-tp1-prefill_first-b64-c32-s8"

  def labels(cs):
    return [c.label for c in cs]

  assert labels(search_lib.dependencies(by_label[c4], candidates)) == [c2]  # The reference's own: its anchor.
  assert labels(search_lib.dependencies(by_label[p4], candidates)) == [p2, c4, c2]
  assert labels(search_lib.dependencies(by_label[pd], candidates)) == [p4, "disagg-2P2D-tp1-chunked-b64-c32-s8", c4]
  assert labels(search_lib.dependencies(by_label[p1], candidates)) == [c1]
  scores = {c1: 40.0, c2: 36.0, c4: 30.0, p1: 20.0, p2: 16.0}

  def guess(label, known=scores):
    return search_lib.start_guess(by_label[label], candidates, known)

  assert guess(c4) == 36.0  # The reference candidates: their anchor's score.
  assert guess(p4) == pytest.approx(16.0 * 30.0 / 36.0)  # Its anchor's, scaled as 2x -> 4x scaled the reference.
  assert guess(p1) == 40.0  # No anchor: the reference's score.
  assert guess(p4, {p2: 16.0}) == 16.0 and guess(p4, {c4: 30.0}) == 30.0 and guess(p1, {}) is None
  assert guess(p4, {**scores, c2: 0.0}) == 16.0  # A reference that served nothing gives no ratio.


def test_a_split_starts_from_what_the_smaller_splits_show_each_side_serves():
  space = search_lib.SearchSpace(policies=("chunked",), token_budgets=(64,), chunk_sizes=(32,), max_num_seqs=(8,),
                                 replicas=(1, 2, 4, 8), splits=((1, 1), (1, 2), (2, 2), (1, 7), (3, 5)), tps=(1,),
                                 gpus=8)
  candidates = space.candidates()
  by_label = {c.label: c for c in candidates}
  s11, s12, s22, s17, s35 = (by_label[f"disagg-{p}P{d}D-tp1-chunked-b64-c32-s8"]
                             for p, d in ((1, 1), (1, 2), (2, 2), (1, 7), (3, 5)))
  assert search_lib.smaller_splits(s35, candidates) == [s11, s12, s22]
  assert search_lib.smaller_splits(by_label["coloca-8x-tp1-chunked-b64-c32-s8"], candidates) == []
  assert set(search_lib.smaller_splits(s17, candidates)) <= set(search_lib.dependencies(s17, candidates))
  # 1P1D sustains 60 req/s, 1P2D 100, 2P2D 120 (goodput per GPU x GPUs): one prefill instance serves at least
  # 100, one decode instance at least 60 (2P2D: 120 / 2).
  scores = {s11.label: 60 / 2, s12.label: 100 / 3, s22.label: 120 / 4}
  assert search_lib.split_guess(s17, candidates, scores) == pytest.approx(min(1 * 100, 7 * 60) / 8)
  assert search_lib.split_guess(s35, candidates, scores) == pytest.approx(min(3 * 100, 5 * 60) / 8)
  assert search_lib.start_guess(s35, candidates, scores) == search_lib.split_guess(s35, candidates, scores)
  # One smaller split scored bounds both sides by its own rate: the anchor's score is the start instead.
  anchor_score = {"coloca-2x-tp1-chunked-b64-c32-s8": 45.0}
  assert search_lib.split_guess(s12, candidates, {s11.label: 30.0}) is None
  assert search_lib.start_guess(s12, candidates, {s11.label: 30.0, **anchor_score}) == 45.0
  assert search_lib.split_guess(s35, candidates, {s11.label: 30.0, s12.label: 0.0}) is None  # Served nothing.


def test_guesses_do_not_depend_on_the_workers_and_leave_every_score_unchanged(tmp_path):
  space = search_lib.SearchSpace(policies=("chunked", "prefill_first"), token_budgets=(64,), chunk_sizes=(32,),
                                 max_num_seqs=(8,), replicas=(1, 2), splits=((1, 1),), tps=(1,), gpus=2)
  candidates = space.candidates()
  one = search_lib.search(_problem(), candidates, tmp_path / "one.jsonl", workers=1)
  two = search_lib.search(_problem(), candidates, tmp_path / "two.jsonl", workers=2)
  assert sorted(map(json.dumps, one)) == sorted(map(json.dumps, two))  # Probes included.
  for r in one:
    alone = search_lib.evaluate(_problem(), search_lib.Candidate(**r["candidate"]))
    assert (r["goodput_per_gpu"], r["slo_attainment"]) == (alone["goodput_per_gpu"], alone["slo_attainment"])
