"""Profiles engine steps of known composition on the machine at hand and fits the step-cost model to them.

`python -m experiments.profile_steps --model=NAME --out=FILE.json` runs `profile_and_fit`:

1. the device's roofline numbers, measured: the copy bandwidth (bytes read and written by a large on-device
   copy, over its time) and the matmul rate (a large square matmul in the model's dtype);
2. a grid of steps (`default_grid`): decode batches over several contexts, prompt chunks of several sizes
   behind several cached prefixes, and mixes of the two; each is run through the engine's own executor
   (`DeviceExecutor.execute`: packing, the transfer, the compiled step, reading the tokens back) at the
   padded shape the engine picks, and timed (median of repeats, after the programs are compiled);
3. a short replay of synthetic requests through the engine (a queue forms), every step recorded: its
   executor's time joins the grid's steps, and the rest of the time until the next step starts (asking the
   policy, allocating, the bookkeeping, the replay loop) gives the host's work per step, per running
   sequence and per waiting request;
4. the fit (`pdopt.sim.fit`): non-negative coefficients of the roofline terms over the executor times, plus
   the host's work; written with the device, versions, date, commit, every step and the fit's residuals.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import statistics
import subprocess
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pdopt
from pdopt.engine.costs import model_sizes
from pdopt.engine.executor import StepPlan, Work
from pdopt.engine.request import Request, RequestStatus, SamplingParams
from pdopt.benchmark import timing
from pdopt.benchmark.replay import replay
from pdopt.engine import batch as batch_lib
from pdopt.engine import runner as runner_lib
from pdopt.scheduling.step_cost import FEATURES, DeviceSpec, ModelSizes, StepCostModel
from pdopt.sim import fit as fit_lib
from pdopt.workloads import WorkloadConfig, make_workload


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One profiled step: `decodes` sequences decoding with `context` keys each, and (if `chunk` > 0) one
  prompt chunk of `chunk` tokens behind `prefix` cached tokens."""
  decodes: int = 0
  context: int = 0
  chunk: int = 0
  prefix: int = 0

  @property
  def num_tokens(self) -> int:
    return self.decodes + self.chunk


def default_grid(on_accelerator: bool, max_batch: int = 128) -> list[GridPoint]:
  """Decode batches x contexts, chunks x prefixes, and mixes; smaller on a CPU (its steps are slow)."""
  if on_accelerator:
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= max_batch]
    contexts, chunks, prefixes, mix = (128, 1024, 4096), (16, 64, 256, 512, 1024, 2048), (0, 1024), (8, 32)
  else:
    batches = [b for b in (1, 2, 4, 8, 16, 31) if b <= max_batch]
    contexts, chunks, prefixes, mix = (32, 128, 256, 384), (16, 32, 64, 96, 128), (0, 128, 320), (4, 16)
  grid = [GridPoint(decodes=b, context=c) for b in batches for c in contexts]
  grid += [GridPoint(chunk=q, prefix=p) for q in chunks for p in prefixes]
  grid += [GridPoint(decodes=b, context=contexts[1], chunk=q) for b in mix for q in chunks[1:4]]
  return grid


def measure_device(dtype: str, on_accelerator: bool) -> DeviceSpec:
  """The default device's copy bandwidth (bytes read + written / s) and matmul rate in `dtype` (FLOP/s)."""
  n_copy = (1 << 28) if on_accelerator else (1 << 24)  # elements of float32
  x = jnp.ones((n_copy,), jnp.float32)
  copy = jax.jit(lambda a: a + 1)
  bandwidth = 2 * 4 * n_copy / timing.time_jax(lambda: copy(x), warmup=2, iters=10 if on_accelerator else 3)
  n = 8192 if on_accelerator else 1024
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda p, q: p @ q)
  flops = 2 * n ** 3 / timing.time_jax(lambda: matmul(a, b), warmup=2, iters=10 if on_accelerator else 3)
  return DeviceSpec(jax.devices()[0].device_kind, bandwidth, flops, source=f"measured ({dtype} matmul, copy)")


def _work(engine: pdopt.Engine, rid: str, point_tokens: int, start: int, num_tokens: int, decode: bool,
          rng: np.random.Generator) -> Work:
  """A running request holding pages for its first `start + num_tokens` tokens, as the engine would have it."""
  prompt = tuple(int(t) for t in rng.integers(3, engine.model_config.vocab_size, point_tokens))
  req = Request(rid, prompt, SamplingParams(max_tokens=4, ignore_eos=True), seed=0, arrival_time=0.0)
  if decode:
    req.all_token_ids.append(int(rng.integers(3, engine.model_config.vocab_size)))
  req.status, req.num_computed_tokens = RequestStatus.RUNNING, start
  if not engine.block_manager.allocate(rid, start + num_tokens):
    raise ValueError(f"the profiling pool of {engine.config.num_pages} pages cannot hold request {rid}")
  return Work(req, start, num_tokens, is_decode=decode)


def _plan(engine: pdopt.Engine, point: GridPoint, rng: np.random.Generator) -> StepPlan:
  work = [_work(engine, f"d{i}", point.context - 1, point.context - 1, 1, True, rng) for i in range(point.decodes)]
  if point.chunk:
    work.append(_work(engine, "chunk", point.prefix + point.chunk, point.prefix, point.chunk, False, rng))
  return StepPlan(tuple(work))


def profile(engine: pdopt.Engine, grid: Sequence[GridPoint], cost: StepCostModel, repeats: int,
            progress: Callable[[str], None] = lambda _: None) -> list[fit_lib.ProfiledStep]:
  """Times every grid point through `engine.executor` (a `DeviceExecutor`, synchronous) and returns the steps
  with their features under `cost`'s sizes and device. The programs of all the grid's shapes are compiled
  first, in parallel."""
  rng = np.random.default_rng(0)
  executor, ps = engine.executor, engine.config.page_size
  shapes = {}
  for point in grid:
    plan = _plan(engine, point, rng)
    batch = executor.batch(plan.work, decode_only=plan.decode_only)
    shapes[point] = batch.shape
    for w in plan.work:
      engine.block_manager.free(w.request.request_id)
  runner_lib.warm_up([runner_lib.WarmupCall(executor.runner, batch_lib.build([], ps, shape, decode_only=decode))
                      for shape, decode in {(shapes[p], p.chunk == 0) for p in grid}])
  steps = []
  for point in grid:
    plan = _plan(engine, point, rng)
    times = []
    for i in range(repeats + 1):  # The first run is untimed.
      start = time.perf_counter()
      executor.execute(plan)
      if i:
        times.append(time.perf_counter() - start)
    for w in plan.work:
      engine.block_manager.free(w.request.request_id)
    t_pad, s_pad, p_pad = shapes[point]
    q = [1] * point.decodes + ([point.chunk] if point.chunk else [])
    kv = [point.context] * point.decodes + ([point.prefix + point.chunk] if point.chunk else [])
    features = cost.features(q, kv, t_pad, s_pad, p_pad * ps)
    seconds = statistics.median(times)
    steps.append(fit_lib.ProfiledStep({**dataclasses.asdict(point), "padded": [t_pad, s_pad, p_pad]},
                                      tuple(float(f) for f in features), seconds))
    progress(f"{point}: {seconds * 1e3:.3f} ms")
  return steps


class _TimedExecutor:
  """Delegates to an executor and records each `execute` call: (plan, wall seconds)."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def execute(self, plan):
    start = time.perf_counter()
    try:
      return self.inner.execute(plan)
    finally:
      self.calls.append((plan, time.perf_counter() - start))


@dataclasses.dataclass(frozen=True)
class HostWork:
  """The engine's host seconds per step outside its executor: `per_step` + `per_seq` * running sequences +
  `per_waiting` * waiting requests (the policy sees each of them at every step), with the replay loop's work
  between steps (outputs) included. `per_arrival` is a submission's work (`add_request`): fitted beside the
  others so that the steps a burst of arrivals lengthens do not inflate `per_waiting` (arrivals and waiting
  requests come together), and left out of the step-cost model, which prices steps, not submissions."""
  per_step: float
  per_seq: float
  per_waiting: float
  per_arrival: float = 0.0


def replay_steps(engine: pdopt.Engine, cost: StepCostModel, num_requests: int, rate: float, prompt_len: int,
                 output_len: int) -> tuple[list[fit_lib.ProfiledStep], HostWork]:
  """Serves a short synthetic workload through `pdopt.benchmark.replay` (Poisson arrivals at `rate` req/s,
  fast enough for a queue to form; uniform lengths around the given ones) and records every engine step:
  its executor's time, and the time until the next step starts (the step's wall time plus the replay loop's
  work around it, as serving spends it). Steps after which the engine idles, and steps that compiled a
  program, are left out.

  Returns:
    (the steps with their executor's seconds, for the device's share of the fit, each recording its host gap
    and the arrivals in it; the host's work, by least squares over the steps of (time to the next step -
    executor time)).
  """
  engine.executor = timed = _TimedExecutor(engine.executor)
  submitted = [0]
  add_request = engine.add_request

  def counted_add_request(*args, **kwargs):
    submitted[0] += 1
    return add_request(*args, **kwargs)

  workload = make_workload(WorkloadConfig(kind="synthetic", num_requests=num_requests, rate=rate,
                                          prompt_len=prompt_len, output_len=output_len,
                                          length_distribution="uniform", range_ratio=0.9, seed=1),
                           max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size)
  starts, arrivals, executed, busy_after, compiled = [], [], [], [], []
  advance = engine.advance

  def recorded_advance():
    starts.append(time.perf_counter())
    arrivals.append(submitted[0])
    calls, programs = len(timed.calls), engine.num_compilations
    out = advance()
    executed.append(timed.calls[calls:])
    busy_after.append(engine.has_unfinished())
    compiled.append(engine.num_compilations != programs)
    return out

  # The instance's `advance` (what `replay` and `step` call) and `add_request`, for this replay only.
  engine.advance, engine.add_request = recorded_advance, counted_add_request
  try:
    replay(engine, workload, progress=False)
  finally:
    del engine.advance, engine.add_request
    engine.executor = timed.inner
  if not executed:
    raise RuntimeError("the calibration replay recorded no engine step")
  starts.append(time.perf_counter())
  arrivals.append(submitted[0])
  ps = engine.config.page_size
  steps, rows, host = [], [], []
  for i, calls in enumerate(executed):
    if len(calls) != 1 or not busy_after[i] or compiled[i]:  # A step that compiled a program is no sample.
      continue
    plan, execute_s = calls[0]
    q = [w.num_tokens for w in plan.work]
    kv = [w.start + w.num_tokens for w in plan.work]
    shape = engine.buckets.pick(sum(q), len(q), max(-(-k // ps) for k in kv))
    features = cost.features(q, kv, shape[0], shape[1], shape[2] * ps)
    # The lengths themselves, so that a later fit can compute features this one does not have, and the
    # host's gap after the step with the submissions made in it, so that a later fit can refit the host's work.
    gap, submissions = starts[i + 1] - starts[i] - execute_s, arrivals[i + 1] - arrivals[i]
    shape_record = {"replay": True, "tokens": sum(q), "seqs": len(q), "waiting": plan.num_waiting,
                    "padded": list(shape), "q": q, "kv": kv, "host_s": gap, "arrivals": submissions}
    steps.append(fit_lib.ProfiledStep(shape_record, tuple(float(f) for f in features), execute_s))
    rows.append((1.0, float(len(q)), float(plan.num_waiting), float(submissions)))
    host.append(gap)
  return steps, fit_host(np.asarray(rows), np.asarray(host))


# Steps with a queue the calibration replay must see before the host fit has a term per waiting request.
MIN_QUEUED_STEPS = 8


def fit_host(rows: np.ndarray, gaps: np.ndarray) -> HostWork:
  """The host's work from the calibration replay's steps: nonnegative least squares of each step's host gap
  (seconds) on its row (1, running sequences, waiting requests, arrivals in the gap).

  The term per waiting request is fitted only when at least `MIN_QUEUED_STEPS` steps had a queue, and is 0
  otherwise: from one or two such steps it is whatever their noise is (a 1B replay on an H200 that queued
  once, one request, fitted 208 us per waiting request, where serving measures about 1 us)."""
  rows = np.asarray(rows, float)
  if rows.shape[1] > 2 and np.count_nonzero(rows[:, 2]) < MIN_QUEUED_STEPS:
    coefficients = np.insert(fit_lib.nnls(np.delete(rows, 2, axis=1), gaps), 2, 0.0)
  else:
    coefficients = fit_lib.nnls(rows, gaps)
  return HostWork(*(float(c) for c in coefficients))


def _git_commit() -> tuple[str, bool]:
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    return commit, dirty
  except (OSError, subprocess.CalledProcessError):
    return "unknown", False


def check_fits(num_pages: int, page_size: int, sizes: ModelSizes, memory_bytes: int | None, max_batch: int) -> None:
  """Raises ValueError, before the KV pool is allocated, when the profile's KV pool (`num_pages` pages of
  `page_size` tokens) and the weights need more than 90% of `memory_bytes` (None: unknown, not checked)."""
  need = sizes.weight_bytes + num_pages * page_size * sizes.kv_bytes_per_token
  if memory_bytes is not None and need > 0.9 * memory_bytes:
    raise ValueError(f"profiling with --max_batch={max_batch} needs {need / 2**30:.1f} GiB for the weights and a "
                     f"{num_pages}-page KV pool, more than 90% of the device's {memory_bytes / 2**30:.1f} GiB: "
                     "valid: a smaller --max_batch (the grid's largest decode batch)")


def profile_and_fit(model_name: str, *, kv_cache_dtype: str = "auto", grid: Sequence[GridPoint] | None = None,
                    repeats: int | None = None, max_batch: int = 128, page_size: int = 16,
                    buckets: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None,
                    progress: Callable[[str], None] = print) -> StepCostModel:
  """Profiles `model_name` (a shipped model, or a `pdopt.preset` with random weights in the accelerator's
  bf16 / the CPU's float32) on the default device and returns the fitted model, its metadata filled in.

  Args:
    model_name: what to profile.
    kv_cache_dtype: the KV cache's storage (`EngineConfig.kv_cache_dtype`).
    grid: the steps to time (default: `default_grid`).
    repeats: timed runs per step (default 10 on accelerators, 5 on CPUs).
    max_batch: the largest decode batch of the default grid.
    page_size: tokens per KV page.
    buckets: the engine's (token, sequence, page) shape buckets to profile at, as an experiment will run them
      (padding costs differ between devices); grid points that do not fit them are dropped. None: the
      engine's defaults (factor 4).
  """
  on_accelerator = jax.default_backend() != "cpu"
  dtype = "bfloat16" if on_accelerator else "float32"
  if model_name in pdopt.models.pretrained.REGISTRY:
    model = pdopt.load_pretrained(model_name, dtype=dtype)
  else:
    model = pdopt.init_model(pdopt.preset(model_name, dtype=dtype), seed=0)
  config = model.config
  grid = list(grid or default_grid(on_accelerator, max_batch))
  if buckets is not None:
    grid = [p for p in grid if p.num_tokens <= buckets[0][-1] and p.decodes + (p.chunk > 0) <= buckets[1][-1]
            and max(p.context, p.prefix + p.chunk) <= buckets[2][-1] * page_size]
  longest = max(max(p.context, p.prefix + p.chunk) for p in grid)
  budget = max(p.num_tokens for p in grid) if buckets is None else buckets[0][-1]
  # The pool holds one grid point at a time (each is freed after it is timed).
  pages = max(p.decodes * -(-p.context // page_size) + -(-(p.prefix + p.chunk) // page_size) for p in grid) + 16
  sizes = model_sizes(config, kv_cache_dtype)
  stats = jax.devices()[0].memory_stats()
  check_fits(pages, page_size, sizes, (stats or {}).get("bytes_limit"), max_batch)
  seqs = max(max(p.decodes for p in grid) + 1, 8) if buckets is None else buckets[1][-1]
  token_buckets, seq_buckets, page_buckets = buckets or (None, None, None)
  engine_config = pdopt.EngineConfig(policy="chunked", page_size=page_size, num_pages=pages,
                                     max_num_batched_tokens=budget, max_num_seqs=seqs,
                                     max_model_len=min(config.max_position_embeddings, longest + 64,
                                                       (page_buckets or (1 << 30,))[-1] * page_size),
                                     kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
                                     token_buckets=token_buckets, seq_buckets=seq_buckets, page_buckets=page_buckets)
  engine = pdopt.Engine(model, engine_config)
  progress(f"measuring {jax.devices()[0].device_kind}")
  device = measure_device(dtype, on_accelerator)
  progress(f"copy {device.memory_bandwidth / 1e12:.3f} TB/s, matmul {device.matmul_flops / 1e12:.1f} TFLOP/s")
  base = StepCostModel.roofline(sizes, device)
  steps = profile(engine, grid, base, repeats or (10 if on_accelerator else 5), progress)
  engine.warmup()  # The replay's steps take shapes the grid did not.
  # Real serving steps: their executor times join the grid's for the device's share; the host's work around
  # each step (the engine's bookkeeping and the replay loop) is measured apart and added.
  replayed, host = replay_steps(engine, base, num_requests=96 if on_accelerator else 32,
                                rate=100.0 if on_accelerator else 6.0, prompt_len=min(512, longest // 2),
                                output_len=64 if on_accelerator else 24)
  progress(f"host work per step: {host.per_step * 1e6:.0f} us + {host.per_seq * 1e6:.1f} us per sequence + "
           f"{host.per_waiting * 1e6:.1f} us per waiting request (+ {host.per_arrival * 1e6:.0f} us per "
           "submission, not part of the model)")
  steps += replayed
  commit, dirty = _git_commit()
  metadata = {
      "model": model_name, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype, "page_size": page_size,
      "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
      "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": commit, "dirty": dirty, "repeats": repeats or (10 if on_accelerator else 5),
      "host_seconds": dataclasses.asdict(host),
      "buckets": {"tokens": list(engine.buckets.tokens), "seqs": list(engine.buckets.seqs),
                  "pages": list(engine.buckets.pages)},
  }
  fitted = fit_lib.fit(steps, sizes, device, metadata)
  c = list(fitted.coefficients)
  c[FEATURES.index("step")] += host.per_step
  c[FEATURES.index("seq")] += host.per_seq
  c[FEATURES.index("waiting")] += host.per_waiting
  return dataclasses.replace(fitted, coefficients=tuple(c))
