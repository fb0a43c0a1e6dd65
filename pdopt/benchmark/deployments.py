"""Multi-instance deployments in experiments: disaggregated prefill/decode against colocated replicas.

A deployment is written `disaggregated:P:D[:policy]` (P prefill and D decode instances) or
`colocated:N[:policy]` (N replicas behind a least-loaded router); the policy (default `chunked`) schedules
every instance. All deployments of a run share one device budget (`config.devices`, 0 = all), split
evenly over their instances, so they compare at equal hardware.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Sequence

import jax
import tqdm

from pdopt import metrics as metrics_lib
from pdopt.benchmark.replay import ReplayResult, sampling_params
from pdopt.engine.cluster import Cluster, ClusterConfig, ClusterMode
from pdopt.engine.config import EngineConfig
from pdopt.metrics import RequestRecord
from pdopt.models.transformer import Transformer
from pdopt.scheduling import POLICIES
from pdopt.workloads import Workload


@dataclasses.dataclass(frozen=True)
class Deployment:
  """One deployment of a run: mode, instance counts, and the policy of its instances."""
  mode: ClusterMode
  num_prefill: int
  num_decode: int
  policy: str = "chunked"

  @property
  def label(self) -> str:
    if self.mode is ClusterMode.DISAGGREGATED:
      return f"disagg-{self.num_prefill}P{self.num_decode}D-{self.policy}"
    return f"colocated-{self.num_decode}x-{self.policy}"

  @property
  def num_instances(self) -> int:
    return self.num_decode + (self.num_prefill if self.mode is ClusterMode.DISAGGREGATED else 0)


def parse_deployments(spec: str) -> tuple[Deployment, ...]:
  """Deployments from "disaggregated:1:1,colocated:2" (empty: none).

  Raises:
    ValueError: an unknown mode or policy, or counts that are not positive integers (named).
  """
  out = []
  for item in (s.strip() for s in (spec or "").split(",")):
    if not item:
      continue
    parts = item.split(":")
    try:
      mode = ClusterMode(parts[0])
    except ValueError:
      raise ValueError(f"config.deployments: unknown mode {parts[0]!r} in {item!r}; valid: "
                       f"{', '.join(m.value for m in ClusterMode)}") from None
    counts = 2 if mode is ClusterMode.DISAGGREGATED else 1
    if len(parts) not in (counts + 1, counts + 2):
      raise ValueError(f"config.deployments: {item!r} should be disaggregated:P:D[:policy] or colocated:N[:policy]")
    try:
      nums = [int(p) for p in parts[1:counts + 1]]
    except ValueError:
      raise ValueError(f"config.deployments: instance counts in {item!r} must be integers") from None
    if min(nums) < 1:
      raise ValueError(f"config.deployments: instance counts in {item!r} must be >= 1")
    policy = parts[counts + 1] if len(parts) == counts + 2 else "chunked"
    if policy not in POLICIES:
      raise ValueError(f"config.deployments: unknown policy {policy!r} in {item!r}; valid: "
                       f"{', '.join(sorted(POLICIES))}")
    prefill, decode = (nums[0], nums[1]) if mode is ClusterMode.DISAGGREGATED else (0, nums[0])
    out.append(Deployment(mode, prefill, decode, policy))
  return tuple(out)


def replay_cluster(cluster: Cluster, workload: Workload, *, progress: bool = True, desc: str | None = None,
                   poll: float = 0.002) -> ReplayResult:
  """Submits each request when the clock passes its arrival time and waits until all have ended.

  Returns:
    A `ReplayResult` with one record per workload request (a request refused at submission gets a
    rejected record with the error as its reason).
  """
  clock = cluster.clock
  requests = workload.requests
  refused: dict[str, RequestRecord] = {}
  bar = tqdm.tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
  start = clock()
  try:
    for request in requests:
      arrival = start + request.arrival_time
      while clock() < arrival:
        time.sleep(min(poll, max(0.0, arrival - clock())))
      try:
        cluster.add_request(request.prompt_token_ids, sampling_params(request), request_id=request.request_id,
                            arrival_time=arrival)
      except ValueError as e:
        refused[request.request_id] = RequestRecord(
            request_id=request.request_id, prompt_len=request.prompt_len, output_len=0, arrival_time=arrival,
            finish_time=max(arrival, clock()), status="rejected", reason=f"refused at submission: {e}",
            slo_miss=True)
      bar.n = len(cluster.records()) + len(refused)
      bar.refresh()
    cluster.wait()
  finally:
    bar.close()
  end = clock()
  ended = {r.request_id: r for r in cluster.records()}
  ended.update(refused)
  records = tuple(ended[r.request_id] for r in requests)
  outputs = {rid: tuple(ids) for rid, ids in cluster.outputs().items()}
  engines = [inst.engine for inst in cluster.instances]
  return ReplayResult(records=records, outputs=outputs, start=start, duration=end - start,
                      num_steps=sum(e.num_steps for e in engines),
                      num_preemptions=sum(e.num_preemptions for e in engines),
                      num_compilations=0, num_rejected_at_submit=len(refused), num_aborted_at_deadline=0)


def run_deployment(model: Transformer, workload: Workload, deployment: Deployment, engine_config: EngineConfig, *,
                   devices: Sequence[jax.Device], slo: Any = None, warmup: bool = True, progress: bool = True):
  """Replays `workload` on a fresh cluster for `deployment` over `devices`; returns a `PolicyRun`."""
  from pdopt.benchmark.experiment import PolicyRun  # pylint: disable=import-outside-toplevel

  ecfg = dataclasses.replace(engine_config, policy=deployment.policy)
  config = ClusterConfig(mode=deployment.mode.value, num_prefill=deployment.num_prefill,
                         num_decode=deployment.num_decode, engine=ecfg)
  with Cluster(model, config, devices) as cluster:
    warmup_s = 0.0
    if warmup:
      t0 = time.perf_counter()
      for inst in cluster.instances:
        with inst.lock:
          inst.engine.warmup()
      warmup_s = time.perf_counter() - t0
    result = replay_cluster(cluster, workload, progress=progress, desc=deployment.label)
    cluster.check_no_leaks()
    transfers = sorted(cluster.transfer_times.values())
  m = metrics_lib.compute_metrics(result.records, slo=slo, duration=result.duration)
  stats = {
      "policy": deployment.label,
      "rate": float(workload.mean_rate),
      "num_steps": result.num_steps,
      "num_preemptions": result.num_preemptions,
      "warmup_s": warmup_s,
      "num_rejected_at_submit": result.num_rejected_at_submit,
      "num_clamped": workload.num_clamped,
      "num_instances": deployment.num_instances,
      "devices_per_instance": len(devices) // deployment.num_instances,
      "num_transfers": len(transfers),
      "mean_transfer_ms": 1e3 * statistics.fmean(transfers) if transfers else 0.0,
      "p99_transfer_ms": 1e3 * transfers[min(len(transfers) - 1, int(0.99 * len(transfers)))] if transfers else 0.0,
  }
  return PolicyRun(policy=deployment.label, replay=result, metrics=m, stats=stats)
