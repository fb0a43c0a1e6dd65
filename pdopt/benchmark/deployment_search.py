"""`python -m experiments.search --config=configs/search_azure.py`: the deployment with the most goodput per GPU
under an SLO, searched in the simulator (`pdopt.sim.search`), and its config for `experiments.run`.

Fields of a search config (`default_search_config()`; times in seconds, SLOs in milliseconds):

  run_name, results_dir   results go to `<results_dir>/<run_name>/`: results.jsonl (one line per candidate,
                          appended as each finishes: a search run again resumes), top.md, frontier.png and
                          best_config.py (the best candidate as a config of `experiments.run`).
  model, dtype            the served model's shape (a `pdopt.preset`, or a shipped model).
  workload.*              the workload (`pdopt.workloads.WorkloadConfig` fields); its arrivals are scaled to
                          every rate the bisection tries.
  slo, attainment         "ttft:MS tpot:MS", and the share of requests that must meet it.
  gpus                    the GPU budget of a candidate.
  cost_model, device      the step-cost file at tensor-parallel degree 1; "" takes the shipped file of the
                          model's shape on `device` (a `jax.Device.device_kind`).
  allreduce_gbps          tp -> all-reduce bus bandwidth (GB/s) for candidates at tp > 1 (step costs scaled
                          from degree 1; the results say so); `allreduce_latency_us` per all-reduce.
  transfer_gbps, transfer_latency_us   KV transfer between a prefill and a decode instance.
  space.*                 `pdopt.sim.search.SearchSpace` fields (tuples; on the command line
                          `--config.space.policies=chunked --config.space.policies=prefill_first`).
  rate_range, iterations  the bisection's range of req/s per GPU, and its steps.
  min_requests, min_duration   a rate is judged on the workload's first max(min_requests, rate x min_duration)
                          requests (`workload.num_requests` is the pool they come from), so that every rate is
                          held for at least `min_duration` seconds: a burst absorbed within the SLO is not a
                          sustained rate.
  engine.*                `EngineConfig` fields every candidate starts from (page_size, num_pages, max_model_len,
                          and any other, e.g. shape buckets), written into the best and median configs too.
  workers, top            worker processes, and how many results to print.

Besides the best candidate, the median one (by goodput per GPU, among those that met the target at some
rate) is written as median_config.py, so that the two can be run for real and their ranking checked.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
import tqdm

from pdopt import metrics as metrics_lib
from pdopt.engine.config import EngineConfig
from pdopt.engine import costs
from pdopt.engine.costs import model_sizes, shipped
from pdopt.models.source import ModelSource
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim import search as search_lib
from pdopt.sim.deployment import TransferModel
from pdopt.workloads import WorkloadConfig, make_workload, mean_rate


def default_search_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.run_name = "search"
  c.results_dir = "results"
  c.model = "llama-3.2-1b"
  c.dtype = "bfloat16"
  c.slo = "ttft:2000 tpot:100"
  c.attainment = 0.9
  c.gpus = 8
  c.cost_model = ""
  c.device = "NVIDIA H100 80GB HBM3"
  # All-reduce bus bandwidth measured on the lent H100 machines (PyTorch and NCCL, 1 GiB): 329 GB/s on 2 GPUs,
  # 355 GB/s on 4; 8 GPUs take the 4-GPU figure (not measured).
  c.allreduce_gbps = {"2": 329.0, "4": 355.0, "8": 355.0}
  c.allreduce_latency_us = 10.0
  c.transfer_gbps = 100.0
  c.transfer_latency_us = 100.0
  w = ml_collections.ConfigDict()
  w.kind = "azure"
  w.name = "azure_conv"
  w.num_requests = 4000
  w.start = 0
  w.rate = 1.0
  w.seed = 0
  c.workload = w
  s = ml_collections.ConfigDict()
  space = search_lib.SearchSpace()
  for f in dataclasses.fields(space):
    value = getattr(space, f.name)
    s[f.name] = value
  c.space = s
  c.rate_range = (0.25, 256.0)
  c.iterations = 6
  c.min_requests = 250
  c.min_duration = 10.0
  e = ml_collections.ConfigDict()
  e.page_size = 16
  e.num_pages = 8192
  e.max_model_len = 4096
  c.engine = e
  c.workers = 2
  c.top = 10
  return c


def problem(config: ml_collections.ConfigDict) -> search_lib.Problem:
  """The search's fixed parts from its config.

  Raises:
    ValueError: a bad field, or no cost model for the model's shape on `device` (named).
  """
  model = ModelSource(name=config.model, dtype=config.dtype).config()
  # The candidates replace the token budget, chunk and sequences; the base takes the space's smallest.
  engine = EngineConfig(**{"max_num_batched_tokens": min(config.space.token_budgets),
                           "max_num_seqs": min(config.space.max_num_seqs),
                           **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                              for k, v in config.engine.to_dict().items()}})
  if config.cost_model:
    cost = StepCostModel.load(config.cost_model)
  else:
    cost = shipped(model_sizes(model), config.device)
    if cost is None:
      raise ValueError(f"no shipped step-cost file for {config.model} on {config.device!r}: profile one with "
                       "`python -m experiments.profile_steps` and pass it as config.cost_model")
  allreduce = {int(tp): costs.allreduce(model, float(gbps), config.allreduce_latency_us * 1e-6, int(tp))
               for tp, gbps in config.allreduce_gbps.items()}
  workload = make_workload(WorkloadConfig(**config.workload.to_dict()), max_model_len=config.engine.max_model_len,
                           vocab_size=model.vocab_size)
  return search_lib.Problem(
      model=model, engine=engine, step_cost=cost, allreduce=allreduce,
      transfer=TransferModel(config.transfer_gbps * 1e9, config.transfer_latency_us * 1e-6,
                             f"assumed {config.transfer_gbps} GB/s + {config.transfer_latency_us} us"),
      requests=workload.requests, base_rate=workload.mean_rate, slo=metrics_lib.parse_slo(config.slo),
      attainment=config.attainment, rate_range=tuple(config.rate_range), iterations=config.iterations,
      min_requests=config.min_requests, min_duration=config.min_duration)


def space(config: ml_collections.ConfigDict) -> search_lib.SearchSpace:
  s = config.space
  return search_lib.SearchSpace(
      policies=tuple(s.policies), token_budgets=tuple(s.token_budgets), chunk_sizes=tuple(s.chunk_sizes),
      max_num_seqs=tuple(s.max_num_seqs), replicas=tuple(s.replicas), splits=tuple(tuple(x) for x in s.splits),
      tps=tuple(s.tps), gpus=config.gpus)


def run_rate(config: ml_collections.ConfigDict, problem: search_lib.Problem, result: Mapping[str, Any]) -> float:
  """The `rate` at which `experiments.run`, serving the first `result["num_requests"]` requests of the search's
  workload, gives them the arrival times the search judged `result["rate"]` on. Trace arrivals are scaled to
  the requests' own mean rate (that of the window, not of the search's pool); generated arrivals are drawn at
  the configured rate and stretched by the search's scaling."""
  workload = WorkloadConfig(**config.workload.to_dict())
  if workload.arrival_process == "trace":
    judged = search_lib.at_rate(problem, result["rate"]).requests
    return mean_rate(np.asarray([r.arrival_time for r in judged]))
  return workload.rate * result["rate"] / problem.base_rate


def best_config_text(config: ml_collections.ConfigDict, best: Mapping[str, Any], which: str = "best",
                     rate: float | None = None) -> str:
  """A config file of `experiments.run` that runs a search result (`which`: "best" or "median") for real at
  the rate it was scored at, on the requests that rate was judged on (`rate`: `run_rate`'s, by default the
  scored rate)."""
  c = best["candidate"]
  spec = search_lib.Candidate(**c).deployments_spec()
  w = {**config.workload.to_dict(), "num_requests": best.get("num_requests", config.workload.num_requests)}
  engine = {**config.engine.to_dict(), "max_num_batched_tokens": c["max_num_batched_tokens"],
            "chunk_size": c["chunk_size"], "max_num_seqs": c["max_num_seqs"]}
  return "\n".join([
      f'"""The {which} deployment of search {config.run_name!r} ({best["label"]}):',
      f'{best["goodput_per_gpu"]:.3f} req/s per GPU simulated at {best["rate"]:.3g} req/s under "{config.slo}"',
      f'(attainment {best["slo_attainment"]:.2f} of the workload\'s first {w["num_requests"]} requests; `rate` below',
      "gives them the arrival times they had in the search).",
      "",
      "  python -m experiments.run --config=THIS_FILE",
      '"""', "", "from pdopt.benchmark import default_config", "", "",
      "def get_config():", "  c = default_config()", f"  c.run_name = {config.run_name + '-' + which!r}",
      f"  c.model = {config.model!r}", f"  c.dtype = {config.dtype!r}", '  c.policies = ""',
      f"  c.deployments = {spec!r}", f"  c.rate = {rate or best['rate']!r}", f"  c.slo = {config.slo!r}",
      "  # What `--config.backend=sim` prices the steps with: the search's step costs and transfers.",
      f"  c.sim_device = {config.device!r}", f"  c.cost_model = {config.cost_model!r}",
      f"  c.sim_transfer_gbps = {float(config.transfer_gbps)!r}",
      f"  c.sim_transfer_latency_us = {float(config.transfer_latency_us)!r}",
      f"  c.sim_allreduce_gbps = {float(config.allreduce_gbps.get(str(c['tp']), 0.0)) if c['tp'] > 1 else 0.0!r}",
      *[f"  c.workload.{k} = {v!r}" for k, v in w.items() if k != "rate"],
      *[f"  c.engine.{k} = {tuple(v) if isinstance(v, list) else v!r}" for k, v in engine.items()],
      "  return c", ""])


def run_search(config: ml_collections.ConfigDict,
               print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
  """Runs the search (resuming from its results file) and writes its outputs; returns the results, best first."""
  say = print_fn or (lambda _: None)
  p = problem(config)
  candidates = space(config).candidates()
  out_dir = pathlib.Path(config.results_dir) / config.run_name
  out_dir.mkdir(parents=True, exist_ok=True)
  say(f"{len(candidates)} candidates, up to {len(p.requests)} requests each rate, step costs: {p.step_cost.source}")
  results = search_lib.search(p, candidates, out_dir / "results.jsonl", workers=config.workers,
                              progress=lambda it: tqdm.tqdm(it, total=len(candidates), desc="search", leave=False))
  table = format_top(results[:config.top])
  say(table)
  (out_dir / "top.md").write_text(table + "\n")
  plot_frontier(results, out_dir / "frontier.png",
                title=f"{config.model}, {config.workload.name}, {config.slo}, up to {config.gpus} GPUs (simulated)")
  scored = [r for r in results if r["goodput_per_gpu"] > 0]
  if scored:
    for which, result in (("best", scored[0]), ("median", scored[len(scored) // 2])):
      (out_dir / f"{which}_config.py").write_text(best_config_text(config, result, which, run_rate(config, p, result)))
  say(f"wrote {out_dir}/")
  (out_dir / "search_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
  return results


def plot_frontier(results, path: pathlib.Path, title: str) -> None:
  """Goodput per GPU against P99 TTFT, one point per candidate (colocated and disaggregated apart), the
  Pareto frontier (more goodput per GPU at no worse P99 TTFT) joined by a line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for mode, marker in (("colocated", "o"), ("disaggregated", "s")):
    pts = [(r["p99_ttft_ms"], r["goodput_per_gpu"]) for r in results if r["candidate"]["mode"] == mode]
    if pts:
      ax.scatter(*zip(*pts), marker=marker, alpha=0.6, label=f"{mode} (n={len(pts)})")
  frontier, best = [], -1.0
  for r in sorted(results, key=lambda r: r["p99_ttft_ms"]):
    if r["goodput_per_gpu"] > best:
      frontier.append((r["p99_ttft_ms"], r["goodput_per_gpu"]))
      best = r["goodput_per_gpu"]
  if frontier:
    ax.plot(*zip(*frontier), color="black", linewidth=1, label="frontier")
  ax.set_xlabel("P99 TTFT (ms) at the scored rate")
  ax.set_ylabel("goodput per GPU (req/s)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_top(results) -> str:
  lines = ["| candidate | GPUs | goodput/GPU (req/s) | rate (req/s) | attainment | P99 TTFT ms | P99 TPOT ms |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['label']} | {r['num_gpus']} | {r['goodput_per_gpu']:.3f} | {r['rate']:.3g} | "
                 f"{r['slo_attainment']:.2f} | {r['p99_ttft_ms']:.0f} | {r['p99_tpot_ms']:.1f} |")
  return "\n".join(lines)
