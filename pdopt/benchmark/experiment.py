"""The experiment runner: one workload replayed against each policy on the real engine.

`run_experiment(config)` validates the whole config (an invalid field raises `config.ConfigError`, naming
it, before anything is written or loaded: a missing trace or checkpoint is found before the model loads),
builds the model once, then for every policy (and every rate of a sweep) a fresh `Engine` on that same
model object, compiles its shape buckets, replays the workload (`replay.replay`), computes the serving
metrics under the run's SLO, prints vLLM's "Serving Benchmark Result" block and finally one comparison
table, and writes a run directory of its own (`results.prepare_run_dir`: `<results_dir>/<run_name>/`, or
`<run_name>_2`, ... when that one holds an earlier run):

  config.json          the full config (`default_config()` with the run's values).
  metrics.json         `{run: entry}`, one entry per policy, or per "policy@rate" in a rate sweep. An entry
                       is every `ServingMetrics` field under vLLM's names (`completed`, `failed`,
                       `request_throughput`, `median_ttft_ms`, `p99_itl_ms`, ..., `request_goodput`,
                       `slo_attainment`), the `ENGINE_STATS_KEYS`, the executor's `stats()` (with speculative
                       decoding `SpecStats.as_dict()`: `spec_acceptance_rate`, ...) and the run's provenance
                       (`results.PROVENANCE_KEYS`: date, git commit and dirty flag, devices, versions, host),
                       the fairness metrics (`pdopt.metrics.fairness`: slowdown against each request alone on
                       an idle engine as the step-cost model predicts it, Jain's index, decode stall) and
                       `by_class`: every serving metric of each priority class under its own SLO.
  requests.csv         one row per request of every run ("run", "policy", "rate", then
                       `pdopt.metrics.REQUEST_COLUMNS`; arrival times from the run's start).
  ttft_cdf.png, tpot_cdf.png   latency CDFs over every request, one curve per policy (one panel per rate).
  goodput_vs_rate.png  with a sweep: request goodput against the offered rate, one line per policy.

Every field and unit is defined in `docs/results.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

import pdopt
from pdopt import sharding
from pdopt import metrics as metrics_lib
from pdopt.metrics import fairness as fairness_lib
from pdopt import workloads
from pdopt.benchmark import config as config_lib
from pdopt.benchmark import deployments as deployments_lib
from pdopt.benchmark import results
from pdopt.benchmark.replay import ReplayResult, replay
from pdopt import deploy, sim
from pdopt.engine.config import EngineConfig
from pdopt.engine import costs
from pdopt.engine.costs import default_step_cost, model_sizes
from pdopt.engine.engine import Engine
from pdopt.models import pretrained
from pdopt.models.config import ModelConfig
from pdopt.models.source import ModelSource
from pdopt.models.transformer import Transformer
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim.deployment import TransferModel

# Engine and run facts stored next to the metrics of every policy entry in metrics.json.
ENGINE_STATS_KEYS: tuple[str, ...] = (
    "policy",  # the policy name.
    "rate",  # offered mean arrival rate of the workload (req/s).
    "num_steps",  # engine steps during the replay.
    "num_preemptions",  # preemptions (recompute) during the replay.
    "num_compilations",  # step shapes compiled during the timed replay (0 after a complete warm-up).
    "warmup_compilations",  # shapes compiled (or loaded from the cache) by the warm-up.
    "warmup_s",  # seconds the warm-up took.
    "num_rejected_at_submit",  # requests `add_request` refused (a bad prompt or length).
    "num_aborted_at_deadline",  # requests aborted because `max_duration` passed.
    "prefix_cache_queries",  # prompt tokens looked up in the prefix cache.
    "prefix_cache_hits",  # of those, tokens found.
    "prefix_cache_hit_rate",  # hits / queries (0.0 when nothing was queried).
    "prefix_cache_evictions",  # cached pages reclaimed for new allocations.
    "num_clamped",  # workload requests whose lengths were clamped to the context or the caps.
    "backend",  # "real" (the engine on the devices) or "sim" (the simulator, `pdopt.sim`).
    "step_cost",  # the step-cost model `slo_aware` (and the simulator) predicted with: its file, or a roofline.
    "step_cost_kind",  # "fitted" or "roofline".
    "preemption_mode",  # "recompute" or "swap" (`EngineConfig.preemption_mode`).
)


@dataclasses.dataclass(frozen=True)
class PolicyRun:
  """One policy replayed on one workload.

  Attributes:
    policy: the policy name.
    replay: what the replay produced (records, outputs, counters).
    metrics: the serving metrics of its records.
    stats: the `ENGINE_STATS_KEYS` facts.
    fairness: `pdopt.metrics.fairness.fairness_metrics` of its records, with `slowdown_reference` (the
      step-cost model that predicted each request alone).
    by_class: {priority class: its serving metrics (dict form)}.
  """
  policy: str
  replay: ReplayResult
  metrics: metrics_lib.ServingMetrics
  stats: dict[str, Any]
  fairness: dict[str, Any] = dataclasses.field(default_factory=dict)
  by_class: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def records(self) -> tuple[metrics_lib.RequestRecord, ...]:
    return self.replay.records

  def entry(self) -> dict[str, Any]:
    """The metrics.json entry: every metric under vLLM's names, the fairness metrics, the metrics of each
    class (`by_class`) and the engine stats."""
    return {**metrics_lib.metrics_to_dict(self.metrics), **self.fairness, "by_class": self.by_class, **self.stats}

  @classmethod
  def judged(cls, policy: str, replay_result: ReplayResult, stats: dict[str, Any],
             slo: str | metrics_lib.Slo | None, class_slos: Mapping[int, Any] | None, alone: StepCostModel,
             chunk: int) -> PolicyRun:
    """The run of `policy` with its metrics under `slo` and per-class `class_slos`, its fairness metrics (each
    request's slowdown against `alone.alone_seconds(prompt, output, chunk)`) and the metrics of each class."""
    records, duration = replay_result.records, replay_result.duration
    m = metrics_lib.compute_metrics(records, slo=slo, duration=duration, class_slos=class_slos)
    ideal = fairness_lib.ideal_latencies(records, lambda p, o: alone.alone_seconds(p, o, chunk))
    # Undefined statistics (an empty class) are null in metrics.json, not NaN (which JSON lacks).
    fairness = {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in fairness_lib.fairness_metrics(records, ideal).items()}
    fairness["slowdown_reference"] = alone.source
    by_class = fairness_lib.class_metrics(records, slo, duration, class_slos)
    return cls(policy=policy, replay=replay_result, metrics=m, stats=stats, fairness=fairness, by_class=by_class)


def model_source(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ModelSource:
  """Where the run's model comes from: `hf_dir` when set, else the shipped model named `model` (e.g.
  "tiny-code"), else the `model` preset with random weights from `model_seed`."""
  config = config_lib.as_config(config)
  return ModelSource(name=config.model, hf_dir=config.hf_dir, dtype=config.dtype, seed=config.model_seed)


def build_model(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Transformer:
  """The run's model (`model_source`)."""
  return model_source(config).build()


def build_draft(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Transformer | None:
  """The draft of `speculative_method="draft"`: a shipped model by name, else a `pdopt.preset` with random
  weights from `model_seed + 1`; None for other methods."""
  config = config_lib.as_config(config)
  if config_lib.speculative_config(config) is None or config.speculative_method != "draft":
    return None
  if config.speculative_draft in pretrained.REGISTRY:
    return pretrained.load_pretrained(config.speculative_draft, dtype=config.dtype)
  return pdopt.init_model(pdopt.preset(config.speculative_draft, dtype=config.dtype), seed=config.model_seed + 1)


def build_model_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ModelConfig:
  """The shape of the run's model (`build_model` without the weights, for the simulator)."""
  return model_source(config).config()


def build_workload(config: ml_collections.ConfigDict | Mapping[str, Any], model: Transformer | ModelConfig,
                   rate: float | None = None) -> workloads.Workload:
  """The run's workload at `rate` (default: `config.rate`), clamped to the engine's context."""
  config = config_lib.as_config(config)
  model_config = model if isinstance(model, ModelConfig) else model.config
  max_model_len = config.engine.max_model_len or model_config.max_position_embeddings
  return workloads.make_workload(config_lib.workload_config(config, rate), max_model_len=max_model_len,
                                 vocab_size=model_config.vocab_size)


def build_step_cost(config: ml_collections.ConfigDict, model_config: ModelConfig,
                    engine_config: EngineConfig) -> StepCostModel | None:
  """The step-cost model of the run: `cost_model`'s file; with the simulator and no file, the shipped one of
  this model shape on `sim_device` (else its datasheet roofline); None lets a real engine choose its own
  (`Engine(step_cost=None)`).

  Raises:
    ValueError: a missing or malformed file, or one fitted for another model shape, named.
  """
  sizes = model_sizes(model_config, engine_config.kv_cache_dtype)
  if config.cost_model:
    cost = StepCostModel.load(config.cost_model)
    if cost.sizes != sizes:
      raise ValueError(f"config.cost_model={config.cost_model!r} was fitted for other model sizes ({cost.sizes}) "
                       f"than this run's ({sizes})")
    return cost
  if config.backend == "sim":
    return default_step_cost(model_config, engine_config.kv_cache_dtype, 1,
                             config.sim_device or jax.devices()[0].device_kind)
  return None


def run_policy(model: Transformer | ModelConfig, workload: workloads.Workload, engine_config: EngineConfig, *,
               slo: str | metrics_lib.Slo | None = None, warmup: bool = True, progress: bool = True,
               max_duration: float | None = None, clock: Callable[[], float] = time.perf_counter,
               rate: float | None = None, draft_model: Transformer | None = None,
               mesh: Any = None, step_cost: StepCostModel | None = None, simulate: bool = False,
               class_slos: Mapping[int, str | metrics_lib.Slo] | None = None) -> PolicyRun:
  """Replays `workload` against a fresh engine with `engine_config` on `model`.

  Args:
    model: the model (shared by the runs of an experiment; the engine keeps its own KV cache), or only its
      config with `simulate`.
    workload: the requests and their arrival times.
    engine_config: the engine, its `policy` included.
    slo: SLO for goodput ("ttft:2000 tpot:100", ms), or None.
    warmup: compile every shape bucket before the replay starts (the timed part).
    progress: show a progress bar.
    max_duration: seconds after which the replay aborts what is left.
    clock: the engine clock (a `VirtualClock` for deterministic tests); the simulator uses its own.
    rate: the offered rate to record in the stats (default: the workload's measured mean rate).
    draft_model: the draft of `engine_config.speculative` (method "draft").
    mesh: a device mesh for tensor parallelism (`pdopt.sharding.make_mesh`); None runs on one device.
    step_cost: the step-cost model (required with `simulate`); None lets the engine choose its own.
    simulate: run the engine on the simulator (`pdopt.sim`) instead of the devices.
    class_slos: {priority: SLO} of the classes judged against their own SLO (`PolicyRun.judge`).

  Returns:
    The `PolicyRun`, judged (`PolicyRun.judged`) against the engine's own step-cost model with prompts in one
    step of up to `max_num_batched_tokens`. The engine is checked for leaked pages after the replay.
  """
  if simulate:
    model_config = model if isinstance(model, ModelConfig) else model.config
    clock = sim.VirtualClock()
    engine = sim.simulated_engine(model_config, engine_config, step_cost, clock,
                                  arrivals=[r.arrival_time for r in workload])
  else:
    engine = Engine(model, engine_config, clock=clock, draft_model=draft_model, mesh=mesh, step_cost=step_cost)
  t0 = time.perf_counter()
  warmup_compilations = engine.warmup() if warmup else 0
  warmup_s = time.perf_counter() - t0
  result = replay(engine, workload, progress=progress, desc=engine_config.policy, max_duration=max_duration)
  engine.check_no_leaks()
  cache = engine.block_manager.stats()
  stats = {
      "policy": engine_config.policy,
      "rate": float(rate if rate is not None else workload.mean_rate),
      "num_steps": result.num_steps,
      "num_preemptions": result.num_preemptions,
      "num_compilations": result.num_compilations,
      "warmup_compilations": warmup_compilations,
      "warmup_s": warmup_s,
      "num_rejected_at_submit": result.num_rejected_at_submit,
      "num_aborted_at_deadline": result.num_aborted_at_deadline,
      "prefix_cache_queries": cache.prefix_queries,
      "prefix_cache_hits": cache.prefix_hits,
      "prefix_cache_hit_rate": cache.hit_rate,
      "prefix_cache_evictions": cache.evictions,
      "num_clamped": workload.num_clamped,
      "backend": "sim" if simulate else "real",
      "step_cost": engine.step_cost.source,
      "step_cost_kind": engine.step_cost.kind,
      "preemption_mode": engine_config.preemption_mode,
  }
  assert tuple(stats) == ENGINE_STATS_KEYS
  stats.update(engine.executor.stats())
  return PolicyRun.judged(engine_config.policy, result, stats, slo, class_slos, engine.step_cost,
                          engine_config.max_num_batched_tokens)


rate_key = results.rate_key


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path`, caching every compiled program.

  Each engine jits its own step function, so without it every policy would compile the same shapes again.
  This changes process-wide JAX settings; `run_experiment` calls it only when `compilation_cache_dir` is set.
  """
  pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_experiment(config: ml_collections.ConfigDict | Mapping[str, Any], *,
                   print_fn: Callable[[str], None] | None = print, overwrite: bool = False,
                   deploy_listen: tuple[str, int] | None = None, deploy_hosts: int = 1) -> dict[str, Any]:
  """Runs every policy and deployment (at every rate of a sweep), prints the reports and writes the run
  directory.

  Args:
    config: the experiment (see `pdopt.benchmark.config`): a ConfigDict, or a nested dict of the fields that
      differ from `default_config()`.
    print_fn: where the reports go (None: nowhere).
    overwrite: write into `<results_dir>/<run_name>/` even if it holds an earlier run (whose files are
      removed first); otherwise such a run goes to the first free `<run_name>_<i>/`.
    deploy_listen: where the deployments' router listens ((host, port); None: the loopback, any port).
    deploy_hosts: the hosts a deployment's instances spread over (the others run `serve_remote_instances`).

  Returns:
    {"run_dir": pathlib.Path, "metrics": the metrics.json content ({run: entry}), "runs": {policy: PolicyRun}
    or, with a sweep, {policy: {rate_key: PolicyRun}}, "table": the comparison table text (one table per
    rate, concatenated, with a sweep)}.

  Raises:
    ConfigError: an invalid field (unknown policy, bad rate or SLO, invalid workload or engine field, a
      missing trace, checkpoint or cost file), named, before anything is written or loaded.
  """
  config = config_lib.as_config(config)
  plan = _checked_plan(config, deploy_hosts)
  if config.compilation_cache_dir and not plan["simulate"]:
    enable_compilation_cache(config.compilation_cache_dir)

  simulate, rates, policies = plan["simulate"], plan["rates"], plan["policies"]
  # Every process runs the same replay; process 0 reports and writes. Deployments' routers never start JAX
  # here (the instances' processes use the devices).
  writing = not policies or jax.process_index() == 0
  say = print_fn if print_fn is not None and writing else (lambda _: None)
  run_dir = pathlib.Path(config.results_dir) / config.run_name
  if writing:
    try:
      run_dir = results.prepare_run_dir(config.results_dir, config.run_name, overwrite)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from e
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
  router_devices = (deployments_lib.gpu_kind() if plan["platform"] == "gpu" else "cpu",
                    len(plan["devices"]) * deploy_hosts)
  origin = results.provenance(devices=None if policies else router_devices)

  model = plan["model_config"] if simulate or not policies else build_model(config)
  draft = build_draft(config)
  runs: dict[str, Any] = {p: {} for p in policies}
  by_label: dict[str, PolicyRun] = {}
  tables = []
  for rate, workload in zip(rates or (None,), plan["workloads"]):
    say(f"workload {workload.name}: {len(workload)} requests, mean rate {workload.mean_rate:.2f} req/s over "
        f"{workload.duration:.1f} s, {workload.total_prompt_tokens} prompt + {workload.total_output_tokens} "
        f"output tokens, {workload.num_clamped} clamped")
    by_policy = {}
    for policy in policies:
      run = run_policy(model, workload, plan["engine_configs"][policy], slo=plan["slo"], warmup=config.warmup,
                       progress=config.progress and writing, max_duration=config.max_duration,
                       clock=plan["clock"], rate=rate if rate is not None else _offered_rate(config, workload),
                       draft_model=draft, mesh=plan["mesh"], step_cost=plan["step_costs"][policy],
                       simulate=simulate, class_slos=plan["class_slos"])
      by_policy[policy] = run
      say(metrics_lib.format_benchmark_result(run.metrics, policy=_report_label(policy, rate)))
      say(_format_fairness(run))
    for deployment in plan["deployments"]:
      engine_config = config_lib.engine_config(config, deployment.policy)
      if simulate:
        result, stats = deployments_lib.simulate_run_deployment(
            plan["model_config"], workload, deployment, engine_config,
            step_cost=_simulated_step_cost(config, plan, engine_config, deployment.devices_per_instance),
            transfer=TransferModel(config.sim_transfer_gbps * 1e9, config.sim_transfer_latency_us * 1e-6,
                                       f"{config.sim_transfer_gbps} GB/s + {config.sim_transfer_latency_us} us"),
            router=config.router)
      else:
        result, stats = deployments_lib.run_deployment(
            model_source(config), workload, deployment, engine_config, devices=plan["devices"],
            platform=plan["platform"], warmup=config.warmup, progress=config.progress,
            router=config.router, transfer_timeout_s=config.transfer_timeout_s,
            listen=deploy_listen or ("127.0.0.1", 0), hosts=deploy_hosts)
      # The offered rate, as for the policies (the deployment's own stats hold the workload's measured one).
      stats["rate"] = rate if rate is not None else _offered_rate(config, workload)
      run = PolicyRun.judged(deployment.label, result, stats, plan["slo"], plan["class_slos"],
                             _deployment_step_cost(config, plan, engine_config), engine_config.max_num_batched_tokens)
      by_policy[deployment.label] = run
      runs.setdefault(deployment.label, {})
      say(metrics_lib.format_benchmark_result(run.metrics, policy=_report_label(deployment.label, rate)))
      say(_format_fairness(run))
    table = metrics_lib.format_comparison_table({p: r.metrics for p, r in by_policy.items()})
    if rate is not None:
      table = f"rate {rate_key(rate)} req/s\n{table}"
    tables.append(table)
    for policy, run in by_policy.items():
      run.stats.update(origin)
      by_label[results.run_label(policy, rate)] = run
      if rate is None:
        runs[policy] = run
      else:
        runs[policy][rate_key(rate)] = run
  say("\n\n".join(tables))

  metrics_json = {label: run.entry() for label, run in by_label.items()}
  if writing:
    results.write_run(run_dir, by_label, sweep=bool(rates), slo=plan["slo"],
                      model=config.hf_dir or config.model, workload=plan["workloads"][0].name)
    say(results.say_where(run_dir, config.results_dir, config.run_name))
  return {"run_dir": run_dir, "metrics": metrics_json, "runs": runs, "table": "\n\n".join(tables)}


def validate_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Checks an experiment config as `run_experiment` does before it writes or loads anything.

  Args:
    config: the experiment (a ConfigDict, or a nested dict of the fields that differ from the defaults).

  Returns:
    The resolved config (`default_config()` with the given values).

  Raises:
    ConfigError: an invalid field, named, with what would be valid.
  """
  config = config_lib.as_config(config)
  _checked_plan(config)
  return config


def _checked_plan(config: ml_collections.ConfigDict, deploy_hosts: int = 1) -> dict[str, Any]:
  try:
    return _plan(config, deploy_hosts)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def _plan(config: ml_collections.ConfigDict, deploy_hosts: int) -> dict[str, Any]:
  """Everything of the run that can be checked without loading the model: the validated fields, the model's
  shape, the step-cost models, the devices and the workloads (which reads the trace files).

  Raises:
    ValueError: an invalid field, named.
  """
  results.check_run_name(config.run_name)
  config_lib.check_paths(config)
  deployments = deployments_lib.parse_deployments(config.deployments)
  policies = config_lib.parse_policies(config.policies, allow_none=bool(deployments))
  rates = config_lib.parse_rates(config.rates)
  slo = config_lib.slo(config)
  class_slos = config_lib.class_slos(config)
  engine_configs = {p: config_lib.engine_config(config, p) for p in policies}
  for rate in rates or (None,):
    config_lib.workload_config(config, rate)
  if deployments and (config.speculative_method or config.engine.async_decode):
    raise ValueError("config.deployments run the synchronous engine without speculation: config.speculative_method "
                     "and config.engine.async_decode must be off")
  simulate = config_lib.backend(config) == "sim"
  model_config = build_model_config(config)
  step_costs = {p: build_step_cost(config, model_config, engine_configs[p]) for p in policies}
  if simulate:
    for d in deployments:  # The schema of a real deployment; placed on no device.
      d.config(config_lib.engine_config(config, d.policy), config.router, config.transfer_timeout_s)
      _simulated_step_cost(config, dict(model_config=model_config, platform="sim"),
                           config_lib.engine_config(config, d.policy), d.devices_per_instance)
    devices, platform = [], "sim"
  else:
    devices, platform = _deployment_devices(config, deployments, model_config, deploy_hosts)
  mesh, clock = _policy_mesh(config, deployments) if policies else (None, time.perf_counter)
  workloads_ = []
  for rate in rates or (None,):
    try:
      workloads_.append(build_workload(config, model_config, rate))
    except ValueError as e:
      raise ValueError(f"config.workload: {e}") from None
  return dict(policies=policies, rates=rates, slo=slo, class_slos=class_slos, engine_configs=engine_configs,
              deployments=deployments, simulate=simulate, model_config=model_config, step_costs=step_costs,
              devices=devices, platform=platform, mesh=mesh, clock=clock, workloads=workloads_)


def _deployment_step_cost(config: ml_collections.ConfigDict, plan: Mapping[str, Any],
                          engine_config: EngineConfig) -> StepCostModel:
  """The step-cost model that predicts a request alone for a deployment's slowdowns: `config.cost_model`, else
  the shipped model (or datasheet roofline) of one instance device (`config.sim_device`, else the devices the
  deployment runs on, found without starting JAX)."""
  cost = build_step_cost(config, plan["model_config"], engine_config)
  if cost is not None:
    return cost
  kind = config.sim_device or (deployments_lib.gpu_kind() if plan["platform"] == "gpu" else "cpu")
  return default_step_cost(plan["model_config"], engine_config.kv_cache_dtype, 1, kind)


def _simulated_step_cost(config: ml_collections.ConfigDict, plan: Mapping[str, Any], engine_config: EngineConfig,
                         tp: int) -> StepCostModel:
  """The step-cost model of a simulated deployment's instance at tensor-parallel degree `tp`: the run's model
  (`_deployment_step_cost`), scaled by `config.sim_allreduce_gbps` when its degree differs.

  Raises:
    ValueError: a degree the cost model was not profiled at and no all-reduce bandwidth to scale it by.
  """
  cost = _deployment_step_cost(config, plan, engine_config)
  if tp == cost.sizes.tensor_parallel:
    return cost
  if config.sim_allreduce_gbps <= 0:
    raise ValueError(f"a simulated deployment at tensor-parallel degree {tp} needs config.sim_allreduce_gbps > 0 "
                     f"(the step-cost model {cost.source} is for degree {cost.sizes.tensor_parallel})")
  return cost.with_tensor_parallel(tp, costs.allreduce(plan["model_config"], config.sim_allreduce_gbps, 10e-6, tp))


def _format_fairness(run: PolicyRun) -> str:
  """Slowdown, Jain's index and decode stall of a run, and a table of its classes when it has several."""
  def num(key: str, scale: float = 1.0, digits: int = 2) -> str:
    value = run.fairness[key]
    return "-" if value is None else f"{scale * value:.{digits}f}"

  lines = [f"slowdown P50 {num('slowdown_p50')}  P99 {num('slowdown_p99')}  Jain {num('jain_slowdown', digits=3)}"
           f"  (across clients {num('jain_slowdown_across_clients', digits=3)})  decode stall P99 "
           f"{num('decode_stall_s_p99', 1e3, 1)} ms  (alone: {run.fairness['slowdown_reference']})"]
  if len(run.by_class) > 1:
    lines.append(metrics_lib.format_comparison_table(run.by_class, CLASS_COLUMNS))
  return "\n".join(lines)


# The rows of the per-class table printed after each run with several priority classes.
CLASS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("completed", "completed"), ("failed", "failed"), ("slo", "SLO"), ("request_goodput", "goodput (req/s)"),
    ("slo_attainment", "SLO attainment"), ("median_ttft_ms", "median TTFT (ms)"), ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("median_tpot_ms", "median TPOT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)"), ("median_e2el_ms", "median E2EL (ms)"),
    ("p99_e2el_ms", "P99 E2EL (ms)"))


def _report_label(policy: str, rate: float | None) -> str:
  return policy if rate is None else f"{policy} @ {rate_key(rate)} req/s"


def _deployment_devices(config: ml_collections.ConfigDict, deployments, model_config: ModelConfig,
                        hosts: int) -> tuple[list[int], str]:
  """The devices the deployments share on each host (`config.devices`, 0 = all: this host's GPUs, or its CPU
  cores) and their platform, checked against every deployment before any process starts."""
  if not deployments:
    return [], "cpu"
  platform = "cpu" if "cpu" in os.environ.get("JAX_PLATFORMS", "") else (
      "gpu" if deployments_lib.local_devices("gpu") else "cpu")
  available = deployments_lib.local_devices(platform)
  n = config.devices or len(available)
  if n > len(available):
    raise ValueError(f"config.devices={n} but this host has {len(available)} {platform} devices ({available})")
  for d in deployments:
    d.config(config_lib.engine_config(config, d.policy), config.router, config.transfer_timeout_s).placements(
        model_config, available[:n], hosts)
  return available[:n], platform


def serve_remote_instances(config: ml_collections.ConfigDict | Mapping[str, Any], router: str, host: int,
                           hosts: int) -> int:
  """On host `host` > 0 of a multi-host run: starts this host's instances of the run's one deployment, which
  connect to the router that `run_experiment` runs on host 0 at `router` ("HOST:PORT"); returns when they end,
  with the number of instances that failed.

  Raises:
    ValueError: not exactly one deployment in the config, or one that does not fit (named).
  """
  config = config_lib.as_config(config)
  deployments = deployments_lib.parse_deployments(config.deployments)
  if len(deployments) != 1:
    raise ValueError(f"config.deployments={config.deployments!r}: a run over several hosts serves one deployment")
  (d,) = deployments
  model_config = build_model_config(config)
  devices, platform = _deployment_devices(config, deployments, model_config, hosts)
  return deploy.launch_host(router, host, hosts, d.config(config_lib.engine_config(config, d.policy), config.router,
                                                          config.transfer_timeout_s),
                            model_source(config), devices, platform)


def _policy_mesh(config: ml_collections.ConfigDict, deployments) -> tuple[Any, Callable[[], float]]:
  """The policies' engine mesh (None: one device) and clock; a multi-process run needs a mesh over every
  device and the clock that all processes read alike."""
  tp = config.tensor_parallel
  if tp < 0:
    raise ValueError(f"config.tensor_parallel={tp} must be >= 0")
  multi = jax.process_count() > 1
  if multi and tp == 1:
    raise ValueError(f"a run of {jax.process_count()} processes needs config.tensor_parallel=0 (or the "
                     "model-axis size of a mesh over all devices)")
  if multi and (deployments or config.speculative_method):
    raise ValueError("config.deployments and config.speculative_method run in one process only")
  if tp == 1:
    return None, time.perf_counter
  mesh = sharding.make_mesh(sharding.MeshConfig(model=tp or jax.device_count()))
  return mesh, sharding.SharedClock() if multi else time.perf_counter


def _offered_rate(config: ml_collections.ConfigDict, workload: workloads.Workload) -> float:
  """The rate the config asked for, or the workload's measured mean rate when it asked for none."""
  rate = config.rate if config.rate is not None else config.workload.rate
  return float(rate) if rate is not None else workload.mean_rate


def compare(runs: Mapping[str, PolicyRun], columns: Sequence[tuple[str, str]] = metrics_lib.DEFAULT_COLUMNS) -> str:
  """The comparison table of policy runs (one column per policy)."""
  return metrics_lib.format_comparison_table({p: r.metrics for p, r in runs.items()}, columns)
