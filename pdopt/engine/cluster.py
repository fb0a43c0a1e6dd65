"""Several engine instances on disjoint device sets: colocated replicas or disaggregated prefill/decode.

Each instance is an `Engine` on its own submesh, stepped by its own thread (JAX releases the GIL while
devices work, so instances overlap in time as separate servers would). A router sends each new request
to the least-loaded instance that takes new requests.

- `colocated`: every instance prefills and decodes (with its own scheduling policy), as N replicas of a
  server behind a load balancer.
- `disaggregated` (DistServe, Zhong et al., OSDI 2024; Splitwise, Patel et al., ISCA 2024): prefill
  instances run prompts until their first token, then the request's KV pages are copied device to device
  (`jax.device_put` between the two submeshes) into the pool of the least-loaded decode instance, which
  continues the request. Prefill and decode stop competing for the same steps; the price is the copy
  (measured per request: it shows in the first inter-token gap) and instances sized for one phase each.

Every request ends exactly once, on the instance that ends it; `records()` collects them.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import queue
import threading
import time
from typing import Callable, Sequence

import jax
from flax import nnx

from pdopt.engine.config import EngineConfig
from pdopt.engine.engine import Engine
from pdopt.engine.request import Request, RequestStatus, SamplingParams, checked_int
from pdopt.metrics import RequestRecord
from pdopt.models.transformer import Transformer
from pdopt.sharding import MeshConfig, make_mesh


class ClusterMode(enum.Enum):
  COLOCATED = "colocated"
  DISAGGREGATED = "disaggregated"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """How instances split the devices.

  Attributes:
    mode: "colocated" or "disaggregated".
    num_prefill: prefill instances (disaggregated only).
    num_decode: decode instances (disaggregated); for colocated, the number of replicas.
    engine: engine settings of every instance (`handoff_after_prefill` is set for prefill instances).
    decode_engine: settings of decode instances if they differ (e.g. a larger pool or another policy).
  """
  mode: str = "disaggregated"
  num_prefill: int = 1
  num_decode: int = 1
  engine: EngineConfig = EngineConfig()
  decode_engine: EngineConfig | None = None

  def __post_init__(self):
    try:
      mode = ClusterMode(self.mode)
    except ValueError:
      raise ValueError(f"ClusterConfig.mode={self.mode!r}; valid: "
                       f"{', '.join(m.value for m in ClusterMode)}") from None
    object.__setattr__(self, "num_decode", checked_int("ClusterConfig.num_decode", self.num_decode, low=1))
    low = 1 if mode is ClusterMode.DISAGGREGATED else 0
    object.__setattr__(self, "num_prefill", checked_int("ClusterConfig.num_prefill", self.num_prefill, low=low))
    for name in ("engine", "decode_engine"):
      value = getattr(self, name)
      if not isinstance(value, EngineConfig) and (name == "engine" or value is not None):
        raise ValueError(f"ClusterConfig.{name}={value!r}; valid: an EngineConfig" +
                         (" or None" if name == "decode_engine" else ""))

  @property
  def num_instances(self) -> int:
    return self.num_decode + (self.num_prefill if ClusterMode(self.mode) is ClusterMode.DISAGGREGATED else 0)


class _Instance(threading.Thread):
  """One engine and the thread that steps it; other threads talk to it only through its inbox."""

  def __init__(self, name: str, engine: Engine, on_step: Callable[["_Instance"], None] | None = None):
    super().__init__(name=name, daemon=True)
    self.engine = engine
    self.inbox: queue.Queue[Callable[[Engine], None]] = queue.Queue()
    self.pending_imports: list[tuple[Request, jax.Array, int]] = []
    self.on_step = on_step
    self.error: BaseException | None = None
    self._halt = threading.Event()
    self.lock = threading.Lock()

  def submit(self, fn: Callable[[Engine], None]) -> None:
    self.inbox.put(fn)

  def stop(self) -> None:
    self._halt.set()
    self.inbox.put(lambda engine: None)

  @property
  def load(self) -> int:
    """Requests queued, running or arriving here (read without the lock: an estimate for routing)."""
    return len(self.engine.waiting) + len(self.engine.running) + len(self.pending_imports) + self.inbox.qsize()

  def busy(self) -> bool:
    with self.lock:
      return self.engine.has_unfinished() or bool(self.pending_imports) or not self.inbox.empty()

  def run(self) -> None:
    try:
      while not self._halt.is_set():
        with self.lock:
          idle = not self.engine.has_unfinished() and not self.pending_imports
        try:
          fn = self.inbox.get(timeout=0.05) if idle else self.inbox.get_nowait()
        except queue.Empty:
          fn = None
        with self.lock:
          while fn is not None:
            fn(self.engine)
            try:
              fn = self.inbox.get_nowait()
            except queue.Empty:
              fn = None
          self.pending_imports = [p for p in self.pending_imports if not self.engine.import_request(*p)]
          if self.engine.has_unfinished():
            self.engine.step()
            if self.on_step is not None:
              self.on_step(self)
    except BaseException as e:  # Surfaced by Cluster.check(); a dead instance must not hang the run.
      self.error = e


class Cluster:
  """Serves requests on several instances; the same `add_request` / `has_unfinished` / `records` surface as
  an Engine, while the instances step themselves in their threads.

  Args:
    model: the model; each instance gets its own copy of the parameters on its devices.
    config: ClusterConfig.
    devices: the device budget, split evenly (each instance's share is its tensor-parallel mesh).
    clock: shared by all instances so timestamps compare.
  """

  def __init__(self, model: Transformer, config: ClusterConfig, devices: Sequence[jax.Device] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    devices = list(devices if devices is not None else jax.devices())
    n = config.num_instances
    if len(devices) % n:
      raise ValueError(f"{len(devices)} devices do not split evenly over {n} instances")
    per = len(devices) // n
    self.config = config
    self.clock = clock
    self.mode = ClusterMode(config.mode)
    self.transfer_times: dict[str, float] = {}
    self._lock = threading.Lock()
    self._ids = itertools.count()
    self._used_ids: set[str] = set()
    self.prefill: list[_Instance] = []
    self.decode: list[_Instance] = []
    for i in range(n):
      mesh = make_mesh(MeshConfig(data=1, model=per), devices[i * per:(i + 1) * per])
      is_prefill = self.mode is ClusterMode.DISAGGREGATED and i < config.num_prefill
      ecfg = config.engine if is_prefill or config.decode_engine is None else config.decode_engine
      if is_prefill:
        ecfg = dataclasses.replace(ecfg, handoff_after_prefill=True)
      engine = Engine(nnx.clone(model), ecfg, clock=clock, mesh=mesh)
      if is_prefill:
        self.prefill.append(_Instance(f"prefill-{i}", engine, on_step=self._hand_off))
      else:
        self.decode.append(_Instance(f"decode-{len(self.decode)}", engine))
    self.instances = self.prefill + self.decode
    for inst in self.instances:
      inst.start()

  @property
  def front(self) -> list[_Instance]:
    """Instances that take new requests."""
    return self.prefill if self.mode is ClusterMode.DISAGGREGATED else self.decode

  def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                  request_id: str | None = None, arrival_time: float | None = None) -> str:
    """Routes a request to the least-loaded front instance. Bad input raises ValueError there (named),
    synchronously, and the request is not queued. Ids are unique across the cluster."""
    inst = min(self.front, key=lambda i: i.load)
    with self._lock:
      rid = f"c{next(self._ids)}" if request_id is None else str(request_id)
      if rid in self._used_ids:
        raise ValueError(f"request_id {rid!r} is already in use")
      self._used_ids.add(rid)
    with inst.lock:
      try:
        inst.engine.add_request(prompt_token_ids, sampling_params, request_id=rid, arrival_time=arrival_time)
      except ValueError:
        with self._lock:
          self._used_ids.discard(rid)
        raise
    return rid

  def has_unfinished(self) -> bool:
    self.check()
    return any(inst.busy() for inst in self.instances)

  def wait(self, timeout: float | None = None, poll: float = 0.01) -> None:
    """Blocks until every request has ended (or raises TimeoutError)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.has_unfinished():
      if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError("cluster did not finish in time")
      time.sleep(poll)

  def check(self) -> None:
    for inst in self.instances:
      if inst.error is not None:
        raise RuntimeError(f"instance {inst.name} failed") from inst.error

  def close(self) -> None:
    for inst in self.instances:
      inst.stop()
    for inst in self.instances:
      inst.join(timeout=10)

  def __enter__(self) -> "Cluster":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def records(self) -> list[RequestRecord]:
    """One record per ended request, wherever it ended."""
    out = {}
    for inst in self.instances:
      with inst.lock:
        for req in inst.engine.requests.values():
          if req.status.done:
            out[req.request_id] = req.to_record()
    return list(out.values())

  def outputs(self) -> dict[str, list[int]]:
    """Generated ids of every ended request."""
    out = {}
    for inst in self.instances:
      with inst.lock:
        for rid, req in inst.engine.requests.items():
          if req.status.done:
            out[rid] = req.output_token_ids
    return out

  def check_no_leaks(self) -> None:
    for inst in self.instances:
      with inst.lock:
        inst.engine.check_no_leaks()

  # ------------------------------------------------------------------ handoff

  def _hand_off(self, src: _Instance) -> None:
    """Runs on the prefill instance's thread after each of its steps (its lock held)."""
    engine = src.engine
    for req in engine.take_handoffs():
      dst = min(self.decode, key=lambda i: i.load)
      start = self.clock()
      kv, num_pages = engine.executor.export_pages(req.request_id, req.num_computed_tokens)
      # Gathered pages have the rank and head split of the cache arrays they came from.
      target = jax.tree_util.tree_map(lambda a: a.sharding, dst.engine.executor.runner.cache)
      kv = jax.block_until_ready(jax.device_put(kv, target))
      engine.release_handoff(req.request_id)
      self.transfer_times[req.request_id] = self.clock() - start
      moved = dataclasses.replace(req, all_token_ids=list(req.all_token_ids), token_times=list(req.token_times),
                                  status=RequestStatus.WAITING)
      dst.submit(lambda e, r=moved, k=kv, n=num_pages, d=dst: d.pending_imports.append((r, k, n)))
