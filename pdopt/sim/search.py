"""The search for the deployment with the most goodput per GPU under an SLO, in the simulator.

Every candidate (policy x token budget x chunk size x max sequences x P:D split x tensor-parallel degree,
within a GPU budget) is simulated (`simulate_deployment`) on the workload with its arrivals scaled to a rate;
its score is the highest rate at which the share of requests meeting the SLO (TTFT and TPOT) reaches the
attainment target, divided by its GPUs. The rate is found on a geometric grid by bisection, or by a galloping
search from a guess (`start_guess`): both find the same grid rate when attainment falls with the rate, and a
close start needs 2-3 simulations instead of 6-9. The guess comes from the candidate's `anchor` (the colocated
candidate with the same engine settings and the next fewer instances), scaled by what the same change of
deployment did to the `reference` candidates (those with the first candidate's engine settings); a P:D split
starts instead from the splits with fewer instances already scored (`split_guess`). Candidates
run in parallel processes; every result is appended to a file as it comes, so a search that stops resumes
where it was.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from pdopt.deploy.config import DeploymentConfig
from pdopt.engine.config import EngineConfig
from pdopt.metrics import Slo, compute_metrics
from pdopt.models.config import ModelConfig
from pdopt.scheduling.step_cost import AllReduce, StepCostModel
from pdopt.sim.deployment import TransferModel, simulate_deployment
from pdopt.workloads import Workload, WorkloadRequest


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One deployment of the search: `mode` with `num_prefill` + `num_decode` instances of `tp` GPUs each, every
  instance running `policy` with this token budget, chunk size and sequence limit."""
  policy: str
  max_num_batched_tokens: int
  chunk_size: int
  max_num_seqs: int
  mode: str
  num_prefill: int
  num_decode: int
  tp: int

  @property
  def num_gpus(self) -> int:
    return (self.num_prefill + self.num_decode) * self.tp

  @property
  def label(self) -> str:
    shape = f"{self.num_prefill}P{self.num_decode}D" if self.mode == "disaggregated" else f"{self.num_decode}x"
    return (f"{self.mode[:6]}-{shape}-tp{self.tp}-{self.policy}-b{self.max_num_batched_tokens}-c{self.chunk_size}"
            f"-s{self.max_num_seqs}")

  def deployments_spec(self) -> str:
    """The candidate as `config.deployments` of `experiments.run`."""
    if self.mode == "disaggregated":
      return f"disaggregated:{self.num_prefill}:{self.num_decode}:{self.policy}:{self.tp}"
    return f"colocated:{self.num_decode}:{self.policy}:{self.tp}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What the search varies; a candidate uses at most `gpus` GPUs, and a colocated one its instances' count
  from `replicas`, a disaggregated one its split from `splits` ((P, D) pairs)."""
  policies: tuple[str, ...] = ("chunked", "prefill_first")
  token_budgets: tuple[int, ...] = (512, 2048)
  chunk_sizes: tuple[int, ...] = (256, 512)
  max_num_seqs: tuple[int, ...] = (64, 128)
  replicas: tuple[int, ...] = (1, 2, 4, 8)
  splits: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (2, 2), (1, 7), (2, 6), (3, 5), (4, 4))
  tps: tuple[int, ...] = (1, 2)
  gpus: int = 8

  def candidates(self) -> list[Candidate]:
    out = []
    for policy, budget, chunk, seqs, tp in itertools.product(self.policies, self.token_budgets, self.chunk_sizes,
                                                             self.max_num_seqs, self.tps):
      if chunk > budget:
        continue
      shapes = [("colocated", 0, n) for n in self.replicas] + [("disaggregated", p, d) for p, d in self.splits]
      for mode, p, d in shapes:
        c = Candidate(policy, budget, chunk, seqs, mode, p, d, tp)
        if c.num_gpus <= self.gpus:
          out.append(c)
    return out


@dataclasses.dataclass(frozen=True)
class Problem:
  """Everything an evaluation needs (picklable, for the worker processes).

  Attributes:
    model: the served model's shape.
    engine: the engine settings candidates start from (page size, pool, buckets, ...).
    step_cost: the cost model at tensor-parallel degree 1 (scaled for others with `allreduce`).
    allreduce: tp -> the all-reduce model at that degree.
    transfer: KV transfer between instances.
    requests: the workload's requests, arrivals at `base_rate` req/s: the pool each rate draws from.
    base_rate: the workload's mean rate.
    min_requests, min_duration: a run at rate r serves the pool's first max(`min_requests`, r x `min_duration`)
      requests (at most the pool), so that a rate is judged over at least `min_duration` seconds of arrivals:
      a short burst that the engine absorbs within the SLO is not a rate it sustains.
    slo: the SLO; `attainment`: the share of requests that must meet it.
    rate_range: (low, high) req/s per GPU the bisection searches; `iterations` of it.
  """
  model: ModelConfig
  engine: EngineConfig
  step_cost: StepCostModel
  allreduce: dict[int, AllReduce]
  transfer: TransferModel
  requests: tuple[WorkloadRequest, ...]
  base_rate: float
  slo: Slo
  attainment: float = 0.9
  rate_range: tuple[float, float] = (0.25, 256.0)
  iterations: int = 6
  min_requests: int = 0
  min_duration: float = 0.0


def window(problem: Problem, rate: float) -> int:
  """How many of the pool's first requests a run at `rate` serves (see `Problem`)."""
  n = len(problem.requests)
  if problem.min_requests or problem.min_duration:
    n = min(n, max(problem.min_requests, math.ceil(rate * problem.min_duration)))
  return n


def at_rate(problem: Problem, rate: float) -> Workload:
  """The requests a run at `rate` serves (see `Problem`), their arrivals scaled to it."""
  n = window(problem, rate)
  scale = problem.base_rate / rate
  requests = tuple(dataclasses.replace(r, arrival_time=r.arrival_time * scale) for r in problem.requests[:n])
  return Workload(name=f"search@{rate:g}", requests=requests, num_clamped=0, mean_rate=rate)


def rate_grid(problem: Problem, num_gpus: int) -> list[float]:
  """The rates a candidate of `num_gpus` GPUs may score: 2**`iterations` steps in log space from the low end
  of `rate_range` (times its GPUs) towards the high end (the bisection's resolution: 11% steps for the default
  range and 6 iterations)."""
  low, high = (r * num_gpus for r in problem.rate_range)
  n = 2 ** problem.iterations
  return [low * (high / low) ** (k / n) for k in range(n)]


def highest_passing(n: int, passes: Callable[[int], bool], start: int | None = None) -> int:
  """The highest k in [0, n) with passes(k), -1 if none, for a `passes` that holds up to some k and fails
  above it: bisection, or from `start` a galloping search (steps 1, 2, 4, ... away from it until the answer is
  bracketed, then bisection), which asks about log2(distance) points instead of log2(n) when `start` is
  close. Both find the same k; `passes` is asked at most once per point."""
  lo, hi = -1, n  # passes(lo) (or lo == -1), not passes(hi) (or hi == n).
  if start is not None:
    k, step = min(max(start, 0), n - 1), 1
    if passes(k):
      lo = k
      while k + step < n and passes(k + step):
        lo, step = k + step, 2 * step
      hi = min(k + step, n)
    else:
      hi = k
      while k - step >= 0 and not passes(k - step):
        hi, step = k - step, 2 * step
      lo = max(k - step, -1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if passes(mid) else (lo, mid)
  return lo


def deployment_of(problem: Problem, candidate: Candidate) -> tuple[DeploymentConfig, StepCostModel]:
  """The candidate's deployment and its instances' step-cost model (scaled to its tensor-parallel degree)."""
  # The problem's shape buckets where they cover the candidate's budgets (the real run pads to them too).
  tokens, seqs = problem.engine.token_buckets, problem.engine.seq_buckets
  engine = dataclasses.replace(
      problem.engine, policy=candidate.policy, chunk_size=candidate.chunk_size,
      max_num_batched_tokens=candidate.max_num_batched_tokens, max_num_seqs=candidate.max_num_seqs,
      token_buckets=tokens if tokens and max(tokens) >= candidate.max_num_batched_tokens else None,
      seq_buckets=seqs if seqs and max(seqs) >= candidate.max_num_seqs else None)
  config = DeploymentConfig(mode=candidate.mode, num_prefill=candidate.num_prefill or None,
                            num_decode=candidate.num_decode, devices_per_instance=candidate.tp, engine=engine)
  cost = problem.step_cost.with_tensor_parallel(candidate.tp, problem.allreduce.get(candidate.tp)) \
      if candidate.tp != problem.step_cost.sizes.tensor_parallel else problem.step_cost
  return config, cost


def evaluate(problem: Problem, candidate: Candidate, guess: float | None = None) -> dict[str, Any]:
  """The candidate's goodput per GPU: the highest rate of its `rate_grid` at which `attainment` of the
  requests meet the SLO (by bisection, or by a galloping search from `guess`, a goodput per GPU expected to
  be close), over its GPUs; with that run's latencies and the number of rates simulated (`probes`)."""
  config, cost = deployment_of(problem, candidate)
  rates = rate_grid(problem, candidate.num_gpus)
  runs: dict[int, Any] = {}

  def passes(k: int) -> bool:
    """Whether `attainment` of the requests meet the SLO at rates[k] (the run stops once they cannot)."""
    workload = at_rate(problem, rates[k])
    result = simulate_deployment(config, problem.model, lambda role: cost, problem.transfer, workload,
                                 slo=problem.slo, max_misses=int((1 - problem.attainment) * len(workload)))
    m = None if result.stopped else compute_metrics(result.records, slo=problem.slo, duration=result.duration)
    runs[k] = m if m is not None and m.slo_attainment >= problem.attainment else None
    return runs[k] is not None

  start = None
  if guess is not None and guess > 0:
    start = min(range(len(rates)), key=lambda k: abs(math.log(rates[k] / (guess * candidate.num_gpus))))
  k = highest_passing(len(rates), passes, start)
  entry = {"label": candidate.label, "candidate": dataclasses.asdict(candidate), "num_gpus": candidate.num_gpus,
           "probes": len(runs), "step_cost": cost.source, "step_cost_kind": cost.kind}
  if k < 0:
    return {**entry, "goodput_per_gpu": 0.0, "rate": 0.0, "slo_attainment": 0.0, "p99_ttft_ms": float("nan"),
            "p99_tpot_ms": float("nan"), "median_ttft_ms": float("nan"), "median_tpot_ms": float("nan")}
  rate, m = rates[k], runs[k]
  return {**entry, "goodput_per_gpu": rate / candidate.num_gpus, "rate": rate, "num_requests": window(problem, rate),
          "slo_attainment": m.slo_attainment, "p99_ttft_ms": m.p99_ttft_ms, "p99_tpot_ms": m.p99_tpot_ms,
          "median_ttft_ms": m.median_ttft_ms, "median_tpot_ms": m.median_tpot_ms}


def anchor(candidate: Candidate, candidates: Sequence[Candidate]) -> Candidate | None:
  """The candidate whose goodput per GPU the search starts `candidate` from: among `candidates`, the colocated
  one with the same engine settings and TP degree and the most instances below its own (a disaggregated
  one: up to its own), whose score is usually a rate step or two away; None if there is none."""
  n = candidate.num_prefill + candidate.num_decode
  most = n - 1 if candidate.mode == "colocated" else n
  key = dataclasses.replace(candidate, mode="colocated", num_prefill=0, num_decode=0)
  same = [c for c in candidates if c.mode == "colocated" and c.num_decode <= most
          and dataclasses.replace(c, num_decode=0) == key]
  return max(same, key=lambda c: c.num_decode, default=None)


def reference(candidate: Candidate, candidates: Sequence[Candidate]) -> Candidate | None:
  """The candidate with the engine settings (policy, budget, chunk, sequences) of `candidates[0]` and the
  deployment (mode, split, TP degree) of `candidate`, if it is among `candidates` and is not `candidate`."""
  first = candidates[0]
  ref = dataclasses.replace(candidate, policy=first.policy, max_num_batched_tokens=first.max_num_batched_tokens,
                            chunk_size=first.chunk_size, max_num_seqs=first.max_num_seqs)
  return ref if ref != candidate and ref in candidates else None


def smaller_splits(candidate: Candidate, candidates: Sequence[Candidate]) -> list[Candidate]:
  """The disaggregated candidates with `candidate`'s engine settings and TP degree and fewer instances than it
  (none for a colocated candidate)."""
  if candidate.mode != "disaggregated":
    return []
  n, key = candidate.num_prefill + candidate.num_decode, dataclasses.replace(candidate, num_prefill=0, num_decode=0)
  return [c for c in candidates if c.mode == "disaggregated" and c.num_prefill + c.num_decode < n
          and dataclasses.replace(c, num_prefill=0, num_decode=0) == key]


def split_guess(candidate: Candidate, candidates: Sequence[Candidate], scores: dict[str, float]) -> float | None:
  """A P:D split's goodput per GPU from the `smaller_splits` scored so far (`scores`: label -> goodput per GPU):
  a split of P' prefill and D' decode instances that sustains t' req/s shows that one prefill instance serves
  at least t' / P' and one decode instance at least t' / D' (the side that limits it serves exactly that, the
  other more), so the guess is min(P x the most per prefill instance, D x the most per decode instance), over
  the candidate's GPUs. None unless two are scored (and served something)."""
  known = [(c, scores[c.label] * c.num_gpus) for c in smaller_splits(candidate, candidates) if scores.get(c.label)]
  if len(known) < 2:  # One split bounds both sides by its own rate: a split with more decode instances would
    return None  # start from it however much it gains.
  per_prefill = max(t / c.num_prefill for c, t in known)
  per_decode = max(t / c.num_decode for c, t in known)
  return min(candidate.num_prefill * per_prefill, candidate.num_decode * per_decode) / candidate.num_gpus


def _guess_sources(candidate: Candidate, candidates: Sequence[Candidate]) -> tuple[Candidate | None, ...]:
  """(its anchor, its reference, its anchor's reference), each None where there is none."""
  a = anchor(candidate, candidates)
  return a, reference(candidate, candidates), reference(a, candidates) if a is not None else None


def dependencies(candidate: Candidate, candidates: Sequence[Candidate]) -> list[Candidate]:
  """The candidates whose scores `start_guess` reads for `candidate`: its anchor, the reference candidates of
  itself and of its anchor, and its `smaller_splits`."""
  return list(dict.fromkeys([c for c in _guess_sources(candidate, candidates) if c is not None]
                            + smaller_splits(candidate, candidates)))


def start_guess(candidate: Candidate, candidates: Sequence[Candidate], scores: dict[str, float]) -> float | None:
  """The goodput per GPU `candidate`'s search starts from, given the `scores` (label -> goodput per GPU) of its
  `dependencies`: its anchor's, times the ratio of its reference's to its anchor's reference's (a change of
  deployment scales the goodput per GPU of different engine settings alike: on the shipped workloads most such
  guesses land within two rate steps of the answer); without those, the anchor's alone, else the reference's;
  None without any. A P:D split with smaller splits scored starts from `split_guess` instead (from the
  anchor, a split with one prefill instance would start from a colocated deployment's rate, which its single
  prefill instance may be far from)."""
  split = split_guess(candidate, candidates, scores)
  if split is not None:
    return split
  g_a, g_ref, g_ref_a = (scores.get(c.label) if c is not None else None
                         for c in _guess_sources(candidate, candidates))
  if g_a and g_ref and g_ref_a:
    return g_a * g_ref / g_ref_a
  return g_a or g_ref or None


# A worker process's problem, sent once when it starts (`_start_worker`) rather than with every candidate: the
# workload's prompts are most of it, and its prompts keep their prefix-cache keys from one candidate to the next.
_worker_problem: Problem | None = None


def _start_worker(parent: int, problem: Problem) -> None:
  """In a worker: keeps `problem`, and ends the process once `parent` is gone (killed, say), so no worker
  outlives its search."""
  global _worker_problem  # pylint: disable=global-statement
  _worker_problem = problem

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _evaluate_in_worker(candidate: Candidate, guess: float | None) -> dict[str, Any]:
  """`evaluate` in a worker process, on the problem it got when it started."""
  return evaluate(_worker_problem, candidate, guess)


def search(problem: Problem, candidates: Sequence[Candidate], results_file: pathlib.Path, workers: int = 2,
           progress: Callable[[Iterator], Iterator] = lambda it: it) -> list[dict[str, Any]]:
  """Evaluates every candidate not yet in `results_file` (one JSON line each, appended as they finish) and
  returns all results, best goodput per GPU first. A candidate starts from `start_guess`, so it waits for its
  `dependencies`; which guess each gets does not depend on which worker finishes first."""
  done = {}
  if results_file.exists():
    for line in results_file.read_text().splitlines():
      if line.strip():
        entry = json.loads(line)
        done[entry["label"]] = entry
  todo = [c for c in candidates if c.label not in done]
  todo_labels = {c.label for c in todo}
  waiting = {c.label: {d.label for d in dependencies(c, candidates) if d.label in todo_labels} for c in todo}
  dependents: dict[str, list[Candidate]] = {}  # label -> candidates waiting for its result
  for c in todo:
    for label in waiting[c.label]:
      dependents.setdefault(label, []).append(c)
  ready = [c for c in todo if not waiting[c.label]]

  def unblocked(label: str) -> list[Candidate]:
    """The candidates that wait for nothing more once `label` is done."""
    out = []
    for c in dependents.pop(label, []):
      waiting[c.label].discard(label)
      if not waiting[c.label]:
        out.append(c)
    return out

  def guess(c: Candidate) -> float | None:
    return start_guess(c, candidates, {label: e["goodput_per_gpu"] for label, e in done.items()})

  def entries() -> Iterator[dict[str, Any]]:
    if workers <= 1:
      queue = list(ready)
      while queue:
        c = queue.pop(0)
        entry = evaluate(problem, c, guess(c))
        done[c.label] = entry
        queue += unblocked(c.label)
        yield entry
      return
    # Fresh interpreters: forking a process that runs JAX's threads could deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_worker, initargs=(os.getpid(), problem)) as pool:
      running = {pool.submit(_evaluate_in_worker, c, guess(c)): c for c in ready}
      while running:
        finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
          c = running.pop(future)
          entry = future.result()
          done[c.label] = entry
          running.update({pool.submit(_evaluate_in_worker, d, guess(d)): d for d in unblocked(c.label)})
          yield entry

  with results_file.open("a", encoding="utf-8") as out:
    for entry in progress(entries()):
      out.write(json.dumps(entry) + "\n")
      out.flush()
  wanted = {c.label for c in candidates}
  return sorted((e for label, e in done.items() if label in wanted), key=lambda e: -e["goodput_per_gpu"])
