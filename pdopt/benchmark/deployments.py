"""Multi-instance deployments in experiments: disaggregated prefill/decode against colocated replicas, one OS
process per instance (`pdopt.deploy`).

A deployment is written `disaggregated:P:D[:policy[:tp]]` (P prefill and D decode instances) or
`colocated:N[:policy[:tp]]` (N replicas behind the router); the policy (default `chunked`) schedules every
instance, `tp` (default 1) is each instance's number of devices. `colocated:1` is one engine in its own
process, the baseline of the same process overheads. Every deployment of a run places its instances on the
run's devices (`config.devices`, 0 = all of this host's GPUs, or CPU cores); on CPU each instance keeps to its
cores.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any, Sequence

import tqdm

from pdopt import deploy
from pdopt.benchmark.replay import ReplayResult, sampling_params
from pdopt.engine.config import EngineConfig
from pdopt.metrics import RequestRecord
from pdopt.models.source import ModelSource
from pdopt.scheduling import POLICIES
from pdopt.models.config import ModelConfig
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim import deployment as sim_deployment
from pdopt.sim.deployment import TransferModel
from pdopt.workloads import Workload


@dataclasses.dataclass(frozen=True)
class Deployment:
  """One deployment of a run: mode, instance counts, the policy of its instances and their devices each."""
  mode: str
  num_prefill: int
  num_decode: int
  policy: str = "chunked"
  devices_per_instance: int = 1

  @property
  def label(self) -> str:
    tp = f"-tp{self.devices_per_instance}" if self.devices_per_instance > 1 else ""
    if self.mode == "disaggregated":
      return f"disagg-{self.num_prefill}P{self.num_decode}D-{self.policy}{tp}"
    return f"colocated-{self.num_decode}x-{self.policy}{tp}"

  @property
  def num_instances(self) -> int:
    return self.num_prefill + self.num_decode

  def config(self, engine: EngineConfig, router: str, transfer_timeout_s: float) -> deploy.DeploymentConfig:
    return deploy.DeploymentConfig(mode=self.mode, num_prefill=self.num_prefill if self.num_prefill else None,
                                   num_decode=self.num_decode, devices_per_instance=self.devices_per_instance,
                                   router=router, engine=dataclasses.replace(engine, policy=self.policy),
                                   transfer_timeout_s=transfer_timeout_s)


def parse_deployments(spec: str) -> tuple[Deployment, ...]:
  """Deployments from "disaggregated:1:1,colocated:2:chunked:2" (empty: none).

  Raises:
    ValueError: an unknown mode or policy, or counts that are not positive integers (named).
  """
  out = []
  for item in (s.strip() for s in (spec or "").split(",")):
    if not item:
      continue
    parts = item.split(":")
    if parts[0] not in deploy.MODES:
      raise ValueError(f"config.deployments: unknown mode {parts[0]!r} in {item!r}; valid: {', '.join(deploy.MODES)}")
    counts = 2 if parts[0] == "disaggregated" else 1
    if not counts + 1 <= len(parts) <= counts + 3:
      raise ValueError(f"config.deployments: {item!r} should be disaggregated:P:D[:policy[:tp]] or "
                       "colocated:N[:policy[:tp]]")
    try:
      nums = [int(p) for p in parts[1:counts + 1]]
      tp = int(parts[counts + 2]) if len(parts) == counts + 3 else 1
    except ValueError:
      raise ValueError(f"config.deployments: instance counts and tp in {item!r} must be integers") from None
    if min(nums + [tp]) < 1:
      raise ValueError(f"config.deployments: instance counts and tp in {item!r} must be >= 1")
    policy = parts[counts + 1] if len(parts) >= counts + 2 else "chunked"
    if policy not in POLICIES:
      raise ValueError(f"config.deployments: unknown policy {policy!r} in {item!r}; valid: "
                       f"{', '.join(sorted(POLICIES))}")
    prefill, decode = (nums[0], nums[1]) if counts == 2 else (0, nums[0])
    out.append(Deployment(parts[0], prefill, decode, policy, tp))
  return tuple(out)


def local_devices(platform: str) -> list[int]:
  """This host's devices for instance processes, found without starting JAX here (which would take GPU
  memory the instances need): the GPUs `CUDA_VISIBLE_DEVICES` names or the driver lists, or the CPU cores this
  process may run on."""
  if platform == "cpu":
    return sorted(os.sched_getaffinity(0))
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [int(d) for d in visible.split(",") if d.strip()]
  gpus = pathlib.Path("/proc/driver/nvidia/gpus")
  return list(range(len(list(gpus.iterdir())))) if gpus.is_dir() else []


def gpu_kind() -> str:
  """The model name of this host's first GPU as the driver reports it ("NVIDIA H100 80GB HBM3", JAX's
  `device_kind`), found without starting JAX; "" when there is none."""
  for info in sorted(pathlib.Path("/proc/driver/nvidia/gpus").glob("*/information")):
    for line in info.read_text().splitlines():
      if line.startswith("Model:"):
        return line.split(":", 1)[1].strip()
  return ""


def replay_deployment(deployment: deploy.Deployment, workload: Workload, *, progress: bool = True,
                      desc: str | None = None, poll: float = 0.002) -> ReplayResult:
  """Submits each request when the clock passes its arrival time, handling what the instances report in
  between, until every request has ended.

  Returns:
    A `ReplayResult` with one record per workload request (a request refused at submission gets a rejected
    record with the error as its reason).
  """
  clock = deployment.clock
  requests = workload.requests
  refused: dict[str, RequestRecord] = {}
  bar = tqdm.tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
  start = clock()
  try:
    for request in requests:
      arrival = start + request.arrival_time
      while clock() < arrival:
        deployment.poll(min(poll, max(0.0, arrival - clock())))
      try:
        deployment.add_request(request.prompt_token_ids, sampling_params(request), request_id=request.request_id,
                               arrival_time=arrival, priority=request.priority, client=request.client)
      except ValueError as e:
        refused[request.request_id] = RequestRecord(
            request_id=request.request_id, prompt_len=request.prompt_len, output_len=0, arrival_time=arrival,
            finish_time=max(arrival, clock()), status="rejected", reason=f"refused at submission: {e}",
            slo_miss=True, priority=request.priority, client=request.client)
      bar.n = len(deployment.ended) + len(refused)
      bar.refresh()
    while deployment.has_unfinished():
      deployment.poll(0.05)
      bar.n = len(deployment.ended) + len(refused)
      bar.refresh()
  finally:
    bar.close()
  end = clock()
  ended = {**deployment.ended, **refused}
  records = tuple(ended[r.request_id] for r in requests)
  outputs = {rid: tuple(ids) for rid, ids in deployment.outputs.items()}
  return ReplayResult(records=records, outputs=outputs, start=start, duration=end - start, num_steps=0,
                      num_preemptions=0, num_compilations=0, num_rejected_at_submit=len(refused),
                      num_aborted_at_deadline=0)


def run_deployment(model: ModelSource, workload: Workload, deployment: Deployment, engine_config: EngineConfig, *,
                   devices: Sequence[int], platform: str, warmup: bool = True,
                   progress: bool = True, router: str = "least_loaded", transfer_timeout_s: float = 30.0,
                   listen: tuple[str, int] = ("127.0.0.1", 0), hosts: int = 1) -> tuple[ReplayResult, dict[str, Any]]:
  """Replays `workload` on fresh instance processes of `deployment` on `devices`.

  Returns:
    (the replay's result, the deployment's metrics.json facts); `experiment.PolicyRun.judged` makes the run.
  """
  config = deployment.config(engine_config, router, transfer_timeout_s)
  t0 = time.perf_counter()
  with deploy.Deployment(config, model, devices=devices, platform=platform, warmup=warmup, listen=listen,
                         hosts=hosts) as running:
    warmup_s = time.perf_counter() - t0
    result = replay_deployment(running, workload, progress=progress, desc=deployment.label)
    stats = running.close()
  result = dataclasses.replace(result, num_steps=sum(s.get("num_steps", 0) for s in stats.values()),
                               num_preemptions=sum(s.get("num_preemptions", 0) for s in stats.values()))
  entry = _entry(deployment, workload, result)
  lost = sorted(i for i, s in stats.items() if "lost" in s or "error" in s)
  entry.update(backend="real", warmup_s=warmup_s, instances_lost=lost)
  return result, entry


def simulate_run_deployment(model: ModelConfig, workload: Workload, deployment: Deployment, engine_config: EngineConfig,
                            *, step_cost: StepCostModel, transfer: TransferModel,
                            router: str = "least_loaded") -> tuple[ReplayResult, dict[str, Any]]:
  """`run_deployment` in the simulator (`pdopt.sim.deployment`): the same deployment schema, its instances as
  simulated engines on their own virtual clocks, `step_cost` at the instances' tensor-parallel degree, KV moves
  priced by `transfer`; returns what `run_deployment` does, the stats naming the cost and transfer models."""
  config = deployment.config(engine_config, router, transfer_timeout_s=30.0)
  sim = sim_deployment.simulate_deployment(config, model, lambda role: step_cost, transfer, workload)
  start = workload.requests[0].arrival_time if len(workload) else 0.0
  result = ReplayResult(records=sim.records, outputs={}, start=start, duration=sim.duration, num_steps=sim.num_steps,
                        num_preemptions=sim.num_preemptions, num_compilations=0,
                        num_rejected_at_submit=sim.num_rejected_at_submit, num_aborted_at_deadline=0)
  entry = _entry(deployment, workload, result)
  entry.update(backend="sim", step_cost=step_cost.source, step_cost_kind=step_cost.kind, transfer_model=transfer.source)
  return result, entry


def _entry(deployment: Deployment, workload: Workload, result: ReplayResult) -> dict[str, Any]:
  """The metrics.json facts of a deployment's run (its KV transfers included)."""
  transfers = sorted(r.kv_transfer_s for r in result.records if r.kv_transfer_s is not None)
  moved = sum(r.kv_transfer_bytes for r in result.records)
  return {
      "policy": deployment.label,
      "rate": float(workload.mean_rate),
      "num_steps": result.num_steps,
      "num_preemptions": result.num_preemptions,
      "num_rejected_at_submit": result.num_rejected_at_submit,
      "num_clamped": workload.num_clamped,
      "num_instances": deployment.num_instances,
      "devices_per_instance": deployment.devices_per_instance,
      "num_devices": deployment.num_instances * deployment.devices_per_instance,
      "num_transfers": len(transfers),
      "kv_transfer_bytes": moved,
      "mean_transfer_ms": 1e3 * statistics.fmean(transfers) if transfers else 0.0,
      "p99_transfer_ms": 1e3 * transfers[min(len(transfers) - 1, int(0.99 * len(transfers)))] if transfers else 0.0,
      "transfer_gbps": moved / sum(transfers) / 1e9 if transfers and sum(transfers) > 0 else 0.0,
  }
