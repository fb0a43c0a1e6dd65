"""The step profiler: its checks before it allocates, and the calibration replay it fits the host's work on."""

import numpy as np
import pytest

import pdopt
from pdopt.benchmark import profile_steps
from pdopt.engine.costs import model_sizes
from pdopt.scheduling.step_cost import DeviceSpec, StepCostModel


def test_a_grid_too_large_for_the_device_is_refused_naming_max_batch():
  sizes = model_sizes(pdopt.preset("llama-3.1-8b", dtype="bfloat16"))
  gib = 2 ** 30
  # 128 sequences of 4096 tokens: about 33k pages of 16 tokens, 64.5 GiB of KV, beside 14 GiB of weights.
  with pytest.raises(ValueError, match=r"--max_batch=128 needs 78\.5 GiB .* smaller --max_batch"):
    profile_steps.check_fits(33040, 16, sizes, 60 * gib, max_batch=128)
  profile_steps.check_fits(16528, 16, sizes, 60 * gib, max_batch=64)  # Half the batch fits.
  profile_steps.check_fits(33040, 16, sizes, None, max_batch=128)  # Memory unknown (a CPU): not checked.


def test_the_calibration_replay_records_the_steps_it_serves():
  """Every engine step of the replay is recorded with its plan and times, and the host's work is fitted from them."""
  model = pdopt.init_model(pdopt.preset("tiny", dtype="float32"), seed=0)
  engine = pdopt.Engine(model, pdopt.EngineConfig(num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
                                                  max_model_len=128, enable_prefix_caching=False))
  base = StepCostModel.roofline(model_sizes(model.config), DeviceSpec("cpu", 1e10, 1e11))
  steps, host = profile_steps.replay_steps(engine, base, num_requests=6, rate=200.0, prompt_len=40, output_len=6)
  # Steps that compiled a program (this engine is not warmed up) and the last one are left out.
  assert len(steps) >= 3 and all(s.seconds > 0 and s.shape["replay"] for s in steps)
  assert all(s.shape["tokens"] == sum(s.shape["q"]) >= s.shape["seqs"] == len(s.shape["kv"]) >= 1 for s in steps)
  assert min(host.per_step, host.per_seq, host.per_waiting, host.per_arrival) >= 0
  assert all(s.shape["host_s"] > 0 for s in steps) and sum(s.shape["arrivals"] for s in steps) <= 6
  assert "advance" not in vars(engine) and "add_request" not in vars(engine) and not engine.has_unfinished()
  engine.check_no_leaks()


def test_the_host_fit_tells_submissions_from_waiting_requests():
  """Arrivals come with waiting requests: a fit without an arrival term would charge their work to waiting."""
  rng = np.random.default_rng(0)
  seqs = rng.integers(1, 64, 400)
  arrivals = np.where(np.arange(400) < 80, rng.integers(0, 8, 400), 0)  # A burst at the start
  waiting, queued = [], 0
  for a in arrivals:  # queues while three a step are admitted.
    queued = max(0, queued + a - 3)
    waiting.append(queued)
  rows = np.stack([np.ones(400), seqs, waiting, arrivals], axis=1).astype(float)
  gaps = rows @ np.array([150e-6, 10e-6, 3e-6, 400e-6]) + rng.normal(0, 5e-6, 400)
  host = profile_steps.fit_host(rows, gaps)
  assert host.per_step == pytest.approx(150e-6, rel=0.05) and host.per_seq == pytest.approx(10e-6, rel=0.05)
  assert host.per_waiting == pytest.approx(3e-6, abs=1e-6) and host.per_arrival == pytest.approx(400e-6, rel=0.05)
  assert profile_steps.fit_host(rows[:, :3], gaps).per_waiting > 30e-6  # Without the arrivals' column.


def test_the_host_fit_has_no_waiting_term_without_queues():
  """A replay whose queue formed at a few steps only cannot tell their noise from work per waiting request."""
  rng = np.random.default_rng(1)
  seqs = rng.integers(1, 64, 300)
  waiting = np.zeros(300)
  waiting[[40, 41]] = 1  # two steps with one request waiting, and a slow gap at one of them
  rows = np.stack([np.ones(300), seqs, waiting, np.zeros(300)], axis=1)
  gaps = rows @ np.array([150e-6, 10e-6, 0.0, 0.0]) + rng.normal(0, 5e-6, 300)
  gaps[40] += 400e-6
  host = profile_steps.fit_host(rows, gaps)
  assert host.per_waiting == 0.0
  assert host.per_step == pytest.approx(150e-6, rel=0.05) and host.per_seq == pytest.approx(10e-6, rel=0.05)
  waiting[40:40 + profile_steps.MIN_QUEUED_STEPS] = 1  # enough queued steps: the term is fitted again
  rows[:, 2] = waiting
  assert profile_steps.fit_host(rows, gaps).per_waiting > 10e-6


def test_a_profile_of_a_few_steps_fits_and_saves(tmp_path):
  """`experiments.profile_steps`' whole path on the CPU: grid, calibration replay, fit, file."""
  grid = [profile_steps.GridPoint(decodes=d, context=c) for d, c in ((1, 32), (4, 64), (8, 96))] + [
      profile_steps.GridPoint(chunk=k, prefix=p) for k, p in ((16, 0), (48, 16), (64, 0))]
  lines = []
  model = profile_steps.profile_and_fit("tiny", grid=grid, repeats=1, buckets=((32, 64), (16,), (16,)),
                                        progress=lines.append)
  assert model.kind == "fitted" and model.metadata["platform"] == "cpu" and model.metadata["buckets"]["seqs"] == [16]
  assert model.metadata["residuals"]["num_steps"] > len(grid)  # The grid's steps and the replay's.
  assert any(line.startswith("host work per step") for line in lines)
  path = tmp_path / "cost.json"
  model.save(str(path))
  assert StepCostModel.load(str(path)).coefficients == model.coefficients
