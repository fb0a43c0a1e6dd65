"""The simulator (`pdopt.sim`): the engine's own decisions on a virtual clock, steady decoding in blocks that
change nothing, determinism, the cost model's fit and its files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import pdopt
from pdopt import benchmark, sim, workloads
from pdopt.engine.costs import model_sizes
from pdopt.scheduling import Decoding, Plan, ScheduledChunk
from pdopt.scheduling.step_cost import FEATURES, DeviceSpec, StepCostModel
from pdopt.sim import fit as fit_lib

MODEL = pdopt.preset("tiny")
CONFIG = dict(page_size=8, num_pages=40, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
              token_buckets=(16, 64), seq_buckets=(4, 8), page_buckets=(8, 32), ttft_slo_ms=400.0, tpot_slo_ms=60.0)


def _cost() -> StepCostModel:
  """A cost model with every term at work (times of a few to tens of milliseconds per step)."""
  sizes = model_sizes(MODEL)
  return StepCostModel(sizes, DeviceSpec("test", 1e9, 1e11), (2e-3, 5e-5, 1e-4, 1.5, 2.0, 1.2, 0.3, 1e-4),
                       source="test")


def _workload(num_requests: int = 40, rate: float = 30.0) -> workloads.Workload:
  return workloads.make_workload(workloads.WorkloadConfig(
      kind="synthetic", num_requests=num_requests, rate=rate, prompt_len=60, output_len=20,
      length_distribution="uniform", range_ratio=0.9, seed=3, shared_prefix_fraction=0.5, shared_prefix_len=24),
      max_model_len=CONFIG["max_model_len"], vocab_size=MODEL.vocab_size)


def _simulate(policy: str, workload, chain: bool = True, cost: StepCostModel | None = None):
  clock = sim.VirtualClock()
  engine = sim.simulated_engine(MODEL, pdopt.EngineConfig(policy=policy, **CONFIG), cost or _cost(), clock,
                                arrivals=[r.arrival_time for r in workload], chain=chain)
  result = benchmark.replay(engine, workload, progress=False)
  engine.check_no_leaks()
  return result, engine


def _timeline(records):
  """What a run decided, per request: status, reason, output length and every timestamp."""
  return [(r.request_id, r.status, r.reason, r.output_len, r.first_scheduled_time, r.first_token_time,
           r.token_times, r.finish_time) for r in records]


@pytest.mark.parametrize("policy", sorted(pdopt.scheduling.POLICIES))
def test_blocks_of_steps_change_nothing(policy):
  workload = _workload()
  chained, engine = _simulate(policy, workload, chain=True)
  single, _ = _simulate(policy, workload, chain=False)
  assert _timeline(chained.records) == _timeline(single.records)  # Bit for bit.
  assert chained.num_steps < single.num_steps  # ... in fewer engine steps.
  assert engine.executor.num_steps == single.num_steps
  assert chained.num_preemptions == single.num_preemptions


@pytest.mark.parametrize("policy", sorted(pdopt.scheduling.POLICIES))
def test_the_engines_view_is_a_snapshot_of_its_running_requests(policy):
  """The engine gives policies its decoding requests as columns and the others as views, and builds the views of
  all running requests only when read: at every decision, under preemption, they must be the requests' own
  views (`Request.view`) at that moment, also when read after the engine has moved on."""
  workload = _workload(num_requests=30, rate=60.0)
  clock = sim.VirtualClock()
  engine = sim.simulated_engine(MODEL, pdopt.EngineConfig(policy=policy, **{**CONFIG, "num_pages": 24}), _cost(),
                                clock, arrivals=[r.arrival_time for r in workload])
  kept, mixed = [], 0

  def checked(schedule):
    def wrapped(view):
      nonlocal mixed
      in_flight = engine.executor.in_flight
      ahead = in_flight.num_steps if in_flight is not None else 0
      want = tuple(engine.requests[rid].view(engine.block_manager.num_pages_held(rid), ahead)
                   for rid in engine.running)
      if len(kept) % 2:  # Every other view is first read after the run.
        assert tuple(view.running) == want
      kept.append((view, want))
      assert view.decoding == Decoding.of(want)
      assert view.prefilling == tuple(r for r in want if not r.is_decoding)
      assert len(view.running) == len(want)
      mixed += bool(view.decoding.request_ids) and bool(view.prefilling)
      return schedule(view)
    return wrapped

  engine.policy.schedule = checked(engine.policy.schedule)
  result = benchmark.replay(engine, workload, progress=False)
  assert all(tuple(view.running) == want for view, want in kept)
  assert mixed > 5 and result.num_preemptions > 0, (mixed, result.num_preemptions)


@pytest.mark.parametrize("policy, overcommit, num_pages, mode", [
    *((p, False, 24, "recompute") for p in sorted(pdopt.scheduling.POLICIES)),
    ("chunked", True, 24, "recompute"), ("chunked", True, 12, "recompute"), ("chunked", True, 12, "swap")])
def test_decodes_carried_out_at_once_change_nothing(policy, overcommit, num_pages, mode, monkeypatch):
  """A plan that starts with all of the view's decodes is carried out for them at once
  (`Engine._carry_out_decodes`): under page pressure, the records must be those of the per-chunk loop bit for
  bit. With `overcommit`, the policy schedules every decode it would preempt, so that pages run out during
  the carry-out, and the decodes whose page does not fit are preempted there, in order; in a small pool, at
  some steps all of them (their chunks must not be carried out again)."""
  workload = _workload(num_requests=30, rate=60.0)

  def run(at_once: bool):
    config = pdopt.EngineConfig(policy=policy, **{**CONFIG, "num_pages": num_pages}, preemption_mode=mode)
    engine = sim.simulated_engine(MODEL, config, _cost(), sim.VirtualClock(),
                                  arrivals=[r.arrival_time for r in workload])
    counts = {"at_once": 0, "preempted_there": 0, "all_preempted": 0}
    carry_out = engine._carry_out_decodes  # pylint: disable=protected-access

    def counted(plan, columns, decoding):
      before = engine.num_preemptions
      work = carry_out(plan, columns, decoding) if at_once else None
      counts["at_once"] += work is not None
      counts["preempted_there"] += engine.num_preemptions - before
      counts["all_preempted"] += work == []
      return work

    monkeypatch.setattr(engine, "_carry_out_decodes", counted)
    if overcommit:
      schedule = engine.policy.schedule

      def all_decodes(view):
        plan = schedule(view)
        ids = list(view.decoding.request_ids)
        rest = tuple(c for c in plan.chunks if c.request_id not in set(ids) and c.request_id not in plan.preempt)
        return Plan(tuple(ScheduledChunk(rid, 1) for rid in ids) + rest, (), plan.reject)

      engine.policy.schedule = all_decodes
    result = benchmark.replay(engine, workload, progress=False)
    engine.check_no_leaks()
    return result, counts

  (loop, _), (at_once, counts) = run(False), run(True)
  assert _timeline(at_once.records) == _timeline(loop.records)  # Bit for bit.
  assert at_once.num_preemptions == loop.num_preemptions > 0
  assert counts["at_once"] > 20
  assert (counts["preempted_there"] > 0) == overcommit, counts
  assert (counts["all_preempted"] > 0) == (num_pages == 12), counts


def test_same_seed_same_result():
  workload = _workload()
  a, _ = _simulate("chunked", workload)
  b, _ = _simulate("chunked", _workload())
  assert _timeline(a.records) == _timeline(b.records)
  assert a.duration == b.duration


@pytest.mark.parametrize("policy, leaves_decodes_out", [("chunked", False), ("prefill_first", True)])
def test_decode_stall_is_the_time_of_prompt_steps_while_decoding(policy, leaves_decodes_out):
  """Every step that runs prompt tokens adds its time to the stall of every request decoding then, whether
  the step decodes it (`chunked`) or leaves it out (`prefill_first`)."""
  workload = _workload(num_requests=24, rate=60.0)
  clock = sim.VirtualClock()
  config = pdopt.EngineConfig(policy=policy, **{**CONFIG, "max_num_seqs": 3})
  engine = sim.simulated_engine(MODEL, config, _cost(), clock, arrivals=[r.arrival_time for r in workload],
                                chain=False)
  expected: dict[str, float] = {}
  left_out = 0
  execute = engine.executor.execute

  def observed(plan):
    start = clock.now
    decoding = [rid for rid in engine.running if engine.requests[rid].is_decoding]
    outcome = execute(plan)
    if not plan.decode_only:
      nonlocal left_out
      left_out += len(set(decoding) - {w.request.request_id for w in plan.work})
      for rid in decoding:
        expected[rid] = expected.get(rid, 0.0) + (clock.now - start)
    return outcome

  engine.executor.execute = observed
  result = benchmark.replay(engine, workload, progress=False)
  assert (left_out > 0) == leaves_decodes_out  # Found among the running requests, not in the step's work.
  stalls = {r.request_id: r.decode_stall_s for r in result.records}
  assert any(stalls.values())
  assert stalls == pytest.approx({rid: expected.get(rid, 0.0) for rid in stalls}, rel=1e-12, abs=0.0)


class _ClockedByCost:
  """The real engine's executor, with the virtual clock advanced by each step's predicted time (as the
  simulator advances it), so that a real run has known step times."""

  def __init__(self, real, simulated):
    self.real, self.simulated = real, simulated

  def __getattr__(self, name):
    return getattr(self.real, name)

  def execute(self, plan):
    self.simulated._step(plan)  # pylint: disable=protected-access
    return self.real.execute(plan)


@pytest.mark.parametrize("policy", ["chunked", "prefill_first", "slo_aware"])
def test_reproduces_a_real_run_given_its_step_times(policy):
  workload = _workload(30, rate=40.0)
  cost = _cost()
  clock = sim.VirtualClock()
  model = pdopt.init_model(MODEL, seed=0)
  config = pdopt.EngineConfig(policy=policy, **CONFIG)
  real = pdopt.Engine(model, config, clock=clock, step_cost=cost)
  stepper = sim.SimExecutor(cost, clock, real.block_manager, real.buckets)
  real.executor = _ClockedByCost(real.executor, stepper)
  result = benchmark.replay(real, workload, progress=False)
  real.check_no_leaks()
  for chain in (False, True):
    simulated, _ = _simulate(policy, workload, chain=chain, cost=cost)
    assert _timeline(simulated.records) == _timeline(result.records)
    assert simulated.num_preemptions == result.num_preemptions
  assert result.num_preemptions > 0 or policy == "slo_aware"  # The pool is small enough to preempt.


def test_fit_recovers_known_coefficients():
  rng = np.random.default_rng(0)
  cost = _cost()
  truth = np.asarray([1e-3, 2e-5, 0.0, 1.1, 1.7, 1.3, 0.0, 0.0])
  steps = []
  for _ in range(60):
    q = list(rng.integers(1, 64, size=int(rng.integers(1, 8))))
    kv = [int(x) + int(rng.integers(0, 400)) for x in q]
    f = cost.features(q, kv)
    steps.append(fit_lib.ProfiledStep({"q": [int(x) for x in q]}, tuple(f), float(truth @ f)))
  fitted = fit_lib.fit(steps, cost.sizes, cost.device)
  np.testing.assert_allclose(fitted.coefficients, truth, rtol=1e-6, atol=1e-12)
  assert fitted.metadata["residuals"]["max_rel_error"] < 1e-6
  assert min(fitted.coefficients) >= 0.0


def test_cost_files_round_trip_and_bad_files_name_the_file_and_field(tmp_path):
  cost = dataclasses.replace(_cost(), metadata={"device_kind": "test", "commit": "abc"})
  path = tmp_path / "cost.json"
  cost.save(path)
  loaded = StepCostModel.load(path)
  assert loaded.coefficients == cost.coefficients and loaded.sizes == cost.sizes
  assert loaded.metadata["commit"] == "abc" and loaded.source == str(path)
  with pytest.raises(ValueError, match="missing.json.*does not exist"):
    StepCostModel.load(tmp_path / "missing.json")
  good = json.loads(path.read_text())
  cases = [
      ("not json", "not readable JSON"),
      ({**good, "coefficients": [1.0] * 3}, "'coefficients' must be 8 finite numbers"),
      ({k: v for k, v in good.items() if k != "sizes"}, "missing field 'sizes'"),
      ({**good, "sizes": {**good["sizes"], "weight_bytes": -1}}, "'sizes.weight_bytes' must be a number >= 0"),
      ({**good, "device": {**good["device"], "color": 1}}, "'device.color' is unknown"),
      ({**good, "features": ["step"]}, "field 'features'"),
  ]
  for content, match in cases:
    bad = tmp_path / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=f"bad.json.*{match}"):
      StepCostModel.load(bad)


def test_features_are_named_in_order():
  assert len(_cost().features([3, 1], [10, 40])) == len(FEATURES)


def test_experiment_runs_in_the_simulator_and_says_so(tmp_path):
  out = benchmark.run_experiment({
      "run_name": "sim", "results_dir": str(tmp_path), "backend": "sim", "policies": "chunked,slo_aware",
      "model": "tiny", "progress": False,
      "workload": {"kind": "synthetic", "num_requests": 30, "rate": 20.0, "prompt_len": 50, "output_len": 10},
      "engine": {"page_size": 8, "num_pages": 128, "max_num_batched_tokens": 64, "max_num_seqs": 8,
                 "max_model_len": 256}}, print_fn=None)
  for policy in ("chunked", "slo_aware"):
    entry = out["metrics"][policy]
    assert entry["backend"] == "sim" and entry["completed"] == 30
    assert entry["step_cost_kind"] == "roofline" and "roofline" in entry["step_cost"]
  assert (tmp_path / "sim" / "requests.csv").exists()
  workload = {"kind": "synthetic", "num_requests": 2, "rate": 1.0}
  with pytest.raises(ValueError, match="config.backend='gpu'; valid: real, sim"):
    benchmark.run_experiment({"backend": "gpu", "workload": workload}, print_fn=None)
  with pytest.raises(ValueError, match="engine.async_decode"):
    benchmark.run_experiment({"backend": "sim", "workload": workload, "engine": {"async_decode": True}},
                             print_fn=None)
