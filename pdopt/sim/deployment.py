"""Simulated deployments: the instances of a `DeploymentConfig` as simulated engines, in time order.

Each instance is the engine's own loop on its own virtual clock (`simulated_engine`), priced by the step-cost
model of its tensor-parallel degree (`StepCostModel.with_tensor_parallel` where no profile of that degree
exists). One event loop runs them in time order: an arrival goes to a front instance by the router's policy
(`pdopt.deploy.routing`, the real router's code), an instance with work takes its next step at its own
clock's time, and a request a prefill instance hands off reaches the least-loaded decode instance after its
KV transfer time (`TransferModel`), whose pages are freed on the prefill side when they arrive. An instance's
blocks of steady decoding run until the next event that reaches it (`SimExecutor.interrupt`), or, where its
free pool runs short, stop before the next event that could reach it.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
from typing import Callable, Sequence

from pdopt.deploy.config import DeploymentConfig
from pdopt.deploy.routing import Routing
from pdopt.engine.engine import Engine
from pdopt.engine.request import Request, RequestStatus, SamplingParams
from pdopt.metrics import RequestRecord, Slo, request_latency
from pdopt.models.config import ModelConfig
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim.clock import VirtualClock
from pdopt.sim.executor import SimExecutor, placeholder_token
from pdopt.workloads import Workload


@dataclasses.dataclass(frozen=True)
class TransferModel:
  """KV transfer time between instances: `latency` seconds plus the bytes over `bandwidth` bytes/s; `source`
  names the measurement (or assumption) behind them."""
  bandwidth: float
  latency: float = 0.0
  source: str = ""

  def seconds(self, num_bytes: float) -> float:
    return self.latency + num_bytes / self.bandwidth


@dataclasses.dataclass
class _Instance:
  index: int
  role: str
  engine: Engine
  clock: VirtualClock
  ids: dict[str, str] = dataclasses.field(default_factory=dict)  # engine id -> workload id
  imports: list[tuple[Request, str, int, float]] = dataclasses.field(default_factory=list)

  @property
  def load(self) -> int:
    return len(self.ids) + len(self.imports)


@dataclasses.dataclass(frozen=True)
class SimDeploymentResult:
  """One record per workload request (in workload order) and the run's counters.

  Attributes:
    records: the requests' records (KV transfer bytes and seconds included).
    duration: seconds from the first arrival until every request ended.
    num_steps: steps of all instances (blocks of steps counted step by step).
    num_preemptions: preemptions on all instances.
    num_transfers: requests moved from a prefill to a decode instance.
    num_rejected_at_submit: requests an instance refused when they were submitted (their records say why).
    stopped: the run stopped early, once more requests than `max_misses` had missed the SLO (the records then
      hold only the requests that had ended).
  """
  records: tuple[RequestRecord, ...]
  duration: float
  num_steps: int
  num_preemptions: int
  num_transfers: int
  num_rejected_at_submit: int = 0
  stopped: bool = False


def simulate_deployment(config: DeploymentConfig, model: ModelConfig, step_cost: Callable[[str], StepCostModel],
                        transfer: TransferModel, workload: Workload, slo: Slo | None = None,
                        max_misses: int | None = None, chain: bool = True) -> SimDeploymentResult:
  """Serves `workload` on the simulated instances of `config` (see the module docstring).

  Args:
    config: the deployment (the same schema as a real one).
    model: the served model's shape.
    step_cost: the cost model of an instance, given its role ("replica", "prefill", "decode").
    transfer: the KV transfer time between instances.
    workload: the requests (arrival times from 0).
    slo, max_misses: stop as soon as more than `max_misses` requests miss `slo` (ended without meeting it, or
      still without a first token past the TTFT bound): the question "does this rate meet the target?" has
      its answer then (a search's bisection asks it).
    chain: run steady decoding in blocks (`SimExecutor`); False runs every step on its own.

  Returns:
    The records and counters. Every request ends exactly once (unless the run stopped early).
  """
  arrivals = [r.arrival_time for r in workload]
  deliveries: list[tuple[float, int, int, Request, str, int, float]] = []  # heap: (time, seq, dst, request, ...)
  seq = itertools.count()
  instances: list[_Instance] = []

  def next_event(t: float, role: str) -> float | None:
    """The first time after t that work may reach an instance of `role`."""
    times = []
    i = bisect.bisect_right(arrivals, t)
    if i < len(arrivals) and role != "decode":
      times.append(arrivals[i])
    if role == "decode":
      times += [d[0] for d in deliveries if d[0] > t]
      times += [inst.clock.now for inst in instances if inst.role == "prefill" and inst.engine.has_unfinished()
                and inst.clock.now > t]
      if i < len(arrivals):
        times.append(arrivals[i])
    return min(times) if times else None

  token = placeholder_token(model.vocab_size, model.eos_token_id)
  for index, role in enumerate(config.roles()):
    clock = VirtualClock()
    cost = step_cost(role)
    events = (lambda r: lambda t: next_event(t, r))(role)
    engine = Engine(model, config.engine_of(role), clock=clock, step_cost=cost,
                    executor=_executor_factory(cost, clock, token, events, chain))
    instances.append(_Instance(index, role, engine, clock))

  routing = Routing(config.router, config.engine.page_size)
  front_role = "replica" if config.mode == "colocated" else "prefill"
  front = [i for i in instances if i.role == front_role]
  decode = [i for i in instances if i.role == "decode"]
  kv_token_bytes = step_cost("decode" if decode else front_role).sizes.kv_bytes_per_token * config.devices_per_instance
  page_size = config.engine.page_size
  ended: dict[str, RequestRecord] = {}
  transfers: dict[str, tuple[int, float]] = {}
  next_arrival, num_transfers, num_refused = 0, 0, 0
  requests = workload.requests

  def collect(inst: _Instance, touched: Sequence[Request]) -> None:
    for req in touched:
      if req.status.done and req.request_id in inst.ids:
        rid = inst.ids.pop(req.request_id)
        record = req.to_record()
        moved = transfers.get(rid)
        ended[rid] = dataclasses.replace(record, request_id=rid, kv_transfer_bytes=moved[0] if moved else 0,
                                         kv_transfer_s=moved[1] if moved else None)
        if slo is not None and not slo.met_by(ended[rid], request_latency(ended[rid])):
          nonlocal_misses[0] += 1

  nonlocal_misses, check = [0], itertools.count()

  def missed_so_far(now: float) -> int:
    """Ended requests that missed the SLO, plus those still without a first token past the TTFT bound."""
    late = 0
    if slo.ttft_ms is not None:
      bound = slo.ttft_ms / 1e3
      for inst in instances:
        for eid in inst.ids:
          req = inst.engine.requests.get(eid)
          if req is not None and req.first_token_time is None and now - req.arrival_time > bound:
            late += 1
      late += sum(now - r.arrival_time > bound for _, _, _, r, *_ in deliveries if r.first_token_time is None)
    return nonlocal_misses[0] + late

  stopped = False
  # Instances whose last step could do nothing (a prefill instance whose pool is all pages that wait for a
  # decode instance to take them): they wait, their clocks running, until the next event elsewhere.
  blocked: set[int] = set()
  while next_arrival < len(requests) or deliveries or any(i.engine.has_unfinished() or i.imports
                                                            for i in instances):
    if max_misses is not None and next(check) % 64 == 0:
      now = min([i.clock.now for i in instances if i.engine.has_unfinished()] or [0.0])
      if missed_so_far(now) > max_misses:
        stopped = True
        break
    t_arrival = requests[next_arrival].arrival_time if next_arrival < len(requests) else math.inf
    t_delivery = deliveries[0][0] if deliveries else math.inf
    ready = [i for i in instances if i.index not in blocked and i.engine.has_unfinished()]
    t_step, stepper = min(((i.clock.now, i.index) for i in ready), default=(math.inf, -1))
    t_next = min(t_arrival, t_delivery, t_step)
    if t_next == math.inf:
      raise RuntimeError(f"simulated deployment stalled: instances {sorted(blocked)} hold requests they cannot "
                         "schedule and nothing else is left to happen")
    if t_arrival <= min(t_delivery, t_step):
      request = requests[next_arrival]
      next_arrival += 1
      inst = instances[routing.pick([i.index for i in front], {i.index: i.load for i in front},
                                    request.prompt_token_ids)]
      if not inst.engine.has_unfinished():
        inst.clock.advance_to(t_arrival)
      inst.engine.executor.interrupt(t_arrival)
      params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
      try:
        inst.engine.add_request(request.prompt_token_ids, params, request_id=request.request_id,
                                arrival_time=t_arrival, priority=request.priority, client=request.client)
        inst.ids[request.request_id] = request.request_id
      except ValueError as e:
        ended[request.request_id] = RequestRecord(
            request_id=request.request_id, prompt_len=request.prompt_len, output_len=0, arrival_time=t_arrival,
            finish_time=t_arrival, status="rejected", reason=f"refused at submission: {e}", slo_miss=True,
            priority=request.priority, client=request.client)
        num_refused += 1
    elif t_delivery <= t_step:
      t, _, dst, req, rid, pages, seconds = heapq.heappop(deliveries)
      inst = instances[dst]
      if not inst.engine.has_unfinished():
        inst.clock.advance_to(t)
      inst.imports.append((req, rid, pages, seconds))
      _import_ready(inst, instances, transfers, t)
    else:
      inst = instances[stepper]
      preemptions = inst.engine.num_preemptions
      touched = inst.engine.advance()
      collect(inst, touched)
      handoffs = inst.engine.take_handoffs()
      if not touched and not handoffs and inst.clock.now == t_step and inst.engine.num_preemptions == preemptions:
        blocked.add(inst.index)  # Nothing changed: it waits for something else to happen.
        continue
      for req in handoffs:
        rid = inst.ids.pop(req.request_id)
        pages = -(-req.num_computed_tokens // page_size)
        num_bytes = pages * page_size * kv_token_bytes
        seconds = transfer.seconds(num_bytes)
        dst = routing.pick([d.index for d in decode], {d.index: d.load for d in decode})
        moved = dataclasses.replace(req, all_token_ids=list(req.all_token_ids), token_times=list(req.token_times),
                                    status=RequestStatus.WAITING)
        heapq.heappush(deliveries, (inst.clock.now + seconds, next(seq), dst, moved, rid, num_bytes, seconds))
        num_transfers += 1
      if inst.role == "decode":
        _import_ready(inst, instances, transfers, t_step)
    for b in blocked:  # Something happened: the waiting instances look again, at its time.
      instances[b].clock.advance_to(t_next)
    blocked.clear()
  if not stopped:
    for inst in instances:
      inst.engine.check_no_leaks()
  records = tuple(ended[r.request_id] for r in requests if r.request_id in ended)
  end = max((r.finish_time for r in records if r.finish_time is not None), default=0.0)
  return SimDeploymentResult(records, end - (requests[0].arrival_time if requests else 0.0),
                             sum(i.engine.executor.num_steps for i in instances),
                             sum(i.engine.num_preemptions for i in instances), num_transfers, num_refused, stopped)


def _executor_factory(cost: StepCostModel, clock: VirtualClock, token: int, events, chain: bool):
  return lambda bm, buckets: SimExecutor(cost, clock, bm, buckets, token, events, chain, interrupts=True)


def _import_ready(inst: _Instance, instances: list[_Instance], transfers: dict, now: float) -> None:
  """Moves delivered requests into the decode engine while its pool holds them (at time `now`), freeing their
  pages on the prefill side."""
  if not inst.imports:
    return
  inst.engine.executor.interrupt(now)
  waiting = []
  for req, rid, num_bytes, seconds in inst.imports:
    if inst.engine.import_request(req, None, -(-req.num_computed_tokens // inst.engine.config.page_size)):
      inst.ids[req.request_id] = rid
      transfers[rid] = (num_bytes, seconds)
      for src in instances:
        if src.role == "prefill" and req.request_id in src.engine.requests \
            and src.engine.requests[req.request_id].status is RequestStatus.HANDED_OFF:
          src.engine.executor.interrupt(now)
          src.engine.release_handoff(req.request_id)
          break
    else:
      waiting.append((req, rid, num_bytes, seconds))
  inst.imports = waiting
