"""`Deployment`: starts the instance processes, routes requests to them, moves prefilled requests from prefill
to decode instances, and collects every request's record.

The router runs in the caller's process. It listens on an address (`multiprocessing.connection.Listener`,
authenticated), starts one process per instance on this host (`python -m pdopt.deploy.instance`, with its
devices: `CUDA_VISIBLE_DEVICES` on GPUs; on CPU its own cores and as many virtual devices as its tensor-
parallel degree), or waits for instances that other hosts start (`start_local=False`, see
`pdopt.deploy.launch_host`), and hands each its `InstanceSpec`. Then:

- `add_request` routes a request to a front instance (replicas, or prefill instances) by the router policy;
- `poll` reads what the instances report: ended requests (records and tokens), handoffs (a prefill instance
  published a request's pages: the router picks the least-loaded decode instance, which pulls them), imports
  done (the router tells the prefill instance to free the pages: not before the decode side has them);
- faults: an instance whose process dies (or reports an error) loses its requests, which start over on a live
  instance (prefilled again), up to `max_attempts` times, else end as aborted with the reason; a transfer that
  fails or times out does the same to its request. No request disappears: each ends exactly once, here.
- `close` stops every instance and leaves no process behind, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing.connection
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from pdopt.deploy.config import DeploymentConfig, Role, host_of
from pdopt.deploy.instance import AUTHKEY_ENV, InstanceSpec
from pdopt.deploy.routing import Routing
from pdopt.engine.request import SamplingParams, checked_int, validate_request
from pdopt.metrics import RequestRecord
from pdopt.models.source import ModelSource


@dataclasses.dataclass
class _Request:
  """A request the router admitted, until it ends."""
  rid: str
  prompt: tuple[int, ...]
  params: SamplingParams
  arrival_time: float
  priority: int = 0
  client: str = ""
  instance: int = -1  # where it is now (a prefill instance until its handoff is imported)
  engine_id: str = ""  # its id on that instance's engine
  attempts: int = 0
  importing_to: int = -1  # the decode instance pulling its pages, or -1
  last_failure: str = ""


@dataclasses.dataclass
class _Instance:
  index: int
  role: Role
  devices: list[int]
  process: subprocess.Popen | None = None
  conn: multiprocessing.connection.Connection | None = None
  alive: bool = True
  ready: bool = False
  transfer_address: str | None = None
  stats: dict | None = None
  load: set[str] = dataclasses.field(default_factory=set)  # router ids of its requests


class Deployment:
  """Serves requests on the instance processes of `config` (see the module docstring).

  Args:
    config: the deployment.
    model: the model every instance builds.
    devices: the devices to place instances on (GPU indices, or CPU cores), `devices_per_instance` each.
    platform: "cpu" or "gpu".
    warmup: instances compile every shape before they say they are ready.
    listen: the router's address (host, port); port 0 picks a free one. Other hosts' instances connect here.
    hosts: the hosts the instances spread over, this one first: host h runs instances [h * n / hosts, (h + 1) *
      n / hosts) of the n, each with this many devices; this host starts its own, the others start theirs with
      `launch_host` (the same command on each host) and they connect to `listen`.
    pin_cpus: on CPU, each instance process runs on its own cores only.
    max_attempts: how many times a request may start (the first time included) before it is aborted.
    start_timeout_s: how long to wait for all instances to be ready.
    clock: the router's clock (seconds); instances on this host share it.

  Raises:
    ValueError: a deployment that does not fit the devices or the model (before any process starts).
    RuntimeError: an instance that could not start (its error is in the message); nothing is left running.
  """

  def __init__(self, config: DeploymentConfig, model: ModelSource, *, devices: Sequence[int], platform: str = "cpu",
               warmup: bool = True, listen: tuple[str, int] = ("127.0.0.1", 0), hosts: int = 1,
               pin_cpus: bool = True, max_attempts: int = 3, start_timeout_s: float = 900.0,
               clock: Callable[[], float] = time.perf_counter):
    if platform not in ("cpu", "gpu"):
      raise ValueError(f"platform={platform!r}; valid: cpu, gpu")
    model_config = model.config()
    placement = config.placements(model_config, list(devices), hosts)
    self.config, self.model, self.clock = config, model, clock
    self.vocab_size, self.max_attempts = model_config.vocab_size, max_attempts
    self.max_model_len = config.engine.model_len(model_config.max_position_embeddings)
    self.instances = [_Instance(i, role, placement[i]) for i, role in enumerate(config.roles())]
    self.requests: dict[str, _Request] = {}
    self.ended: dict[str, RequestRecord] = {}
    self.outputs: dict[str, list[int]] = {}
    self.transfers: dict[str, tuple[int, float]] = {}  # rid -> (bytes, seconds) of its KV move
    self._routing = Routing(config.router, config.engine.page_size)
    self._authkey = os.environ.get(AUTHKEY_ENV, "") or os.urandom(16).hex()
    self._listener = multiprocessing.connection.Listener(listen, authkey=bytes.fromhex(self._authkey))
    self.address = "{}:{}".format(*self._listener.address)
    self._closed = False
    try:
      for inst in self.instances:
        if host_of(inst.index, config.num_instances, hosts) == 0:
          inst.process = _spawn(self.address, inst.index, inst.devices, platform, self._authkey, pin_cpus)
      self._connect(warmup, start_timeout_s)
    except BaseException:
      self.close()
      raise

  # ------------------------------------------------------------------ start and stop

  def _connect(self, warmup: bool, timeout_s: float) -> None:
    """Accepts every instance's connection, sends its spec, and waits until all are ready."""
    deadline = time.monotonic() + timeout_s
    for _ in self.instances:
      # Accept in a daemon thread, so that an interrupt (Ctrl-C) while an instance is still starting leaves
      # at once: nothing waits for a thread blocked in accept (close() then closes the listener).
      accepted: queue.Queue = queue.Queue(1)
      threading.Thread(target=lambda: accepted.put(_call(self._listener.accept)), daemon=True).start()
      while True:
        try:
          conn = accepted.get(timeout=0.2)
          break
        except queue.Empty:
          pass
        if time.monotonic() > deadline:
          raise RuntimeError(f"instances did not connect to the router at {self.address} within {timeout_s:g} s")
        exited = [i for i in self.instances if i.process is not None and i.process.poll() is not None]
        if exited:
          raise RuntimeError(f"instance {exited[0].index} exited with code {exited[0].process.returncode} "
                             "before it connected")
      if isinstance(conn, BaseException):
        raise conn
      _, hello = conn.recv()
      inst = self.instances[hello["index"]]
      offset = 0.0 if hello["host"] == socket.gethostname() else self.clock() - hello["time"]
      inst.conn = conn
      conn.send(("spec", InstanceSpec(
          index=inst.index, role=inst.role, model=self.model, engine=self.config.engine_of(inst.role),
          tensor_parallel=self.config.devices_per_instance, clock_offset=offset,
          transfer_host=self._listener.address[0], transfer_timeout_s=self.config.transfer_timeout_s,
          warmup=warmup)))
    while not all(inst.ready for inst in self.instances):
      if time.monotonic() > deadline:
        raise RuntimeError(f"instances {[i.index for i in self.instances if not i.ready]} were not ready within "
                           f"{timeout_s:g} s")
      self.poll(0.5)
      dead = [i for i in self.instances if not i.alive]
      if dead:
        raise RuntimeError(f"instance {dead[0].index} ({dead[0].role}) failed to start: {dead[0].stats}")

  def close(self) -> dict[int, dict]:
    """Stops every instance (politely, then by force) and returns each one's final counters."""
    if self._closed:
      return {i.index: i.stats or {} for i in self.instances}
    self._closed = True
    # "stop" goes out from daemon threads while this thread drains what the instances still send: an instance
    # blocked sending to a router that had stopped reading (Ctrl-C mid-run) could otherwise never read its stop,
    # nor the router finish sending it.
    waiting = {inst.conn: inst for inst in self.instances if inst.alive and inst.conn is not None}
    for conn in waiting:
      threading.Thread(target=_call, args=(lambda c=conn: c.send(("stop", {})),), daemon=True).start()
    deadline = time.monotonic() + 10.0
    while waiting and time.monotonic() < deadline:
      for conn in multiprocessing.connection.wait(list(waiting), 0.1):
        try:
          kind, payload = conn.recv()
        except (EOFError, OSError):
          waiting.pop(conn)
          continue
        if kind == "stats":
          waiting.pop(conn).stats = payload
    for inst in self.instances:
      if inst.process is not None:
        with contextlib.suppress(ProcessLookupError):
          inst.process.terminate()
        try:
          inst.process.wait(5.0)
        except subprocess.TimeoutExpired:
          inst.process.kill()
          inst.process.wait()
      if inst.conn is not None:
        inst.conn.close()
    self._listener.close()
    return {i.index: i.stats or {} for i in self.instances}

  def __enter__(self) -> Deployment:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ requests

  def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                  request_id: str | None = None, arrival_time: float | None = None, priority: int = 0,
                  client: str = "") -> str:
    """Routes a request to a front instance (replicas, or prefill instances); `priority` and `client` as in
    `Engine.add_request`.

    Raises:
      ValueError: bad input (as `Engine.add_request` names it), a duplicate id, or no live front instance.
    """
    params = sampling_params or SamplingParams()
    prompt = validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len,
                              self.config.engine.page_size, self.config.engine.num_pages)
    rid = str(request_id) if request_id is not None else f"r{len(self.requests) + len(self.ended)}"
    if rid in self.requests or rid in self.ended:
      raise ValueError(f"request_id {rid!r} is already in use")
    req = _Request(rid, prompt, params, self.clock() if arrival_time is None else arrival_time,
                   checked_int("priority", priority, low=0), str(client))
    self.requests[rid] = req
    self._start(req)
    return rid

  def has_unfinished(self) -> bool:
    return bool(self.requests)

  def records(self) -> list[RequestRecord]:
    return list(self.ended.values())

  def _front(self) -> list[_Instance]:
    role = "replica" if self.config.mode == "colocated" else "prefill"
    return [i for i in self.instances if i.role == role and i.alive]

  def _pick(self, candidates: list[_Instance], prompt: Sequence[int] = ()) -> _Instance:
    index = self._routing.pick([c.index for c in candidates], {c.index: len(c.load) for c in candidates}, prompt)
    return self.instances[index]

  def _start(self, req: _Request) -> None:
    """Sends `req` to a front instance (again, after a fault), or ends it when it may not start again."""
    front = self._front()
    if req.attempts >= self.max_attempts or not front:
      why = "no live instance takes new requests" if not front else f"started {req.attempts} times"
      self._end(req, "aborted", f"failed: {why}" + (f"; last: {req.last_failure}" if req.last_failure else ""))
      return
    inst = self._pick(front, req.prompt)
    req.attempts += 1
    req.instance, req.engine_id, req.importing_to = inst.index, f"{req.rid}#{req.attempts}", -1
    inst.load.add(req.rid)
    self._send(inst, "add", {"rid": req.rid, "engine_id": req.engine_id, "prompt": req.prompt, "params": req.params,
                             "arrival_time": req.arrival_time, "priority": req.priority, "client": req.client})

  def _end(self, req: _Request, status: str, reason: str, record: RequestRecord | None = None,
           tokens: Sequence[int] = ()) -> None:
    self.requests.pop(req.rid, None)
    for inst in self.instances:
      inst.load.discard(req.rid)
    if record is None:
      record = RequestRecord(request_id=req.rid, prompt_len=len(req.prompt), output_len=0,
                             arrival_time=req.arrival_time, finish_time=max(req.arrival_time, self.clock()),
                             status=status, reason=reason, slo_miss=True, priority=req.priority,
                             client=req.client)
    else:
      moved = self.transfers.get(req.rid)
      record = dataclasses.replace(record, request_id=req.rid, kv_transfer_bytes=moved[0] if moved else 0,
                                   kv_transfer_s=moved[1] if moved else None)
    self.ended[req.rid] = record
    self.outputs[req.rid] = list(tokens)

  def _send(self, inst: _Instance, kind: str, payload: dict) -> None:
    try:
      inst.conn.send((kind, payload))
    except OSError:
      self._lost(inst, "its connection broke")

  # ------------------------------------------------------------------ what the instances report

  def poll(self, timeout: float = 0.0) -> None:
    """Handles every message the instances sent (waiting up to `timeout` seconds for the first)."""
    conns = {i.conn: i for i in self.instances if i.alive and i.conn is not None}
    for conn in multiprocessing.connection.wait(list(conns), timeout):
      inst = conns[conn]
      while inst.alive and conn.poll():
        try:
          kind, payload = conn.recv()
        except (EOFError, OSError):
          self._lost(inst, "its process exited")
          break
        self._handle(inst, kind, payload)
    for inst in self.instances:
      if inst.alive and inst.process is not None and inst.process.poll() is not None:
        self._lost(inst, f"its process exited with code {inst.process.returncode}")

  def _handle(self, inst: _Instance, kind: str, payload) -> None:
    match kind:
      case "ready":
        inst.ready, inst.transfer_address = True, payload["transfer_address"]
      case "ended":
        for item in payload:
          req = self.requests.get(item["rid"])
          if req is None or req.instance != inst.index:
            continue  # A request that started over elsewhere meanwhile.
          if "refused" in item:
            self._end(req, "rejected", f"refused by instance {inst.index}: {item['refused']}")
          else:
            self._end(req, item["record"].status, item["record"].reason or "", item["record"], item["tokens"])
      case "handoff":
        req = self.requests.get(payload["rid"])
        decode = [i for i in self.instances if i.role == "decode" and i.alive]
        if req is None or not decode:
          self._send(inst, "release", {"engine_id": payload["request"].request_id})
          if req is not None:
            self._end(req, "aborted", "failed: no live decode instance")
          return
        target = self._pick(decode)
        req.importing_to = target.index
        target.load.add(req.rid)
        self._send(target, "import", {"rid": req.rid, "request": payload["request"], "uuid": payload["uuid"],
                                      "spec": payload["spec"], "address": payload["address"]})
      case "imported":
        req = self.requests.get(payload["rid"])
        if req is None or req.engine_id != payload["engine_id"]:  # It started over meanwhile: drop the copy.
          self._send(inst, "abort", {"engine_id": payload["engine_id"]})
          return
        prefill = self.instances[req.instance]
        prefill.load.discard(req.rid)
        if prefill.alive:
          self._send(prefill, "release", {"engine_id": req.engine_id})
        req.instance, req.engine_id, req.importing_to = req.importing_to, payload["engine_id"], -1
        self.transfers[req.rid] = (payload["bytes"], payload["seconds"])
      case "import_failed":
        req = self.requests.get(payload["rid"])
        if req is not None and req.engine_id == payload["engine_id"]:
          self._restart(req, f"KV transfer failed: {payload['reason']}")
      case "stats":
        inst.stats = payload
      case "error":
        inst.stats = {"error": payload}
        self._lost(inst, f"it failed:\n{payload}")
      case _:
        raise ValueError(f"unknown message {kind!r} from instance {inst.index}")

  def _restart(self, req: _Request, why: str) -> None:
    """Starts `req` over on a front instance, freeing whatever it held where it was."""
    for inst in self.instances:
      inst.load.discard(req.rid)
    source = self.instances[req.instance] if req.instance >= 0 else None
    if source is not None and source.alive and source.role == "prefill":
      self._send(source, "release", {"engine_id": req.engine_id})
    req.last_failure = why
    self._start(req)

  def _lost(self, inst: _Instance, why: str) -> None:
    """An instance is gone: its requests start over elsewhere."""
    if not inst.alive:
      return
    inst.alive = False
    if inst.stats is None:
      inst.stats = {"lost": why}
    for req in list(self.requests.values()):
      if req.instance == inst.index or req.importing_to == inst.index:
        if req.instance == inst.index:
          req.instance = -1  # Nothing to free there.
        self._restart(req, f"instance {inst.index} ({inst.role}) was lost: {why}")


def launch_host(router: str, host: int, hosts: int, config: DeploymentConfig, model: ModelSource,
                devices: Sequence[int], platform: str = "cpu", pin_cpus: bool = True) -> int:
  """Starts this host's instances of a deployment whose router runs on host 0 at `router` ("HOST:PORT"), with
  the same `PDOPT_DEPLOY_AUTHKEY` in the environment, and waits for them to end; returns the number of instances
  that failed.

  Raises:
    ValueError: the deployment does not fit (as the router would say).
  """
  if not 0 < host < hosts:
    raise ValueError(f"host={host}: instances on other hosts than the router's are 1 to {hosts - 1}")
  if not os.environ.get(AUTHKEY_ENV):
    raise ValueError(f"{AUTHKEY_ENV} must be set, to the same hex key on every host of the deployment")
  placement = config.placements(model.config(), list(devices), hosts)
  procs = [_spawn(router, i, placement[i], platform, os.environ[AUTHKEY_ENV], pin_cpus)
           for i in range(config.num_instances) if host_of(i, config.num_instances, hosts) == host]
  try:
    return sum(p.wait() != 0 for p in procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _call(fn):
  """fn(), or the exception it raised (for a result handed over between threads)."""
  try:
    return fn()
  except BaseException as e:  # pylint: disable=broad-except
    return e


def _spawn(address: str, index: int, devices: list[int], platform: str, authkey: str,
           pin_cpus: bool) -> subprocess.Popen:
  """Starts instance `index` on this host with `devices` (GPUs it sees, or CPU cores it runs on)."""
  env = dict(os.environ, **{AUTHKEY_ENV: authkey})
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    env.pop("JAX_PLATFORMS", None)
  else:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={len(devices)}"])

  cores = ",".join(str(d) for d in devices) if platform == "cpu" and pin_cpus else ""
  # No preexec_fn: forking this multithreaded (JAX) process to run Python in the child could deadlock; the
  # instance pins itself and arranges to die with the router first thing (`instance.main`).
  return subprocess.Popen([sys.executable, "-m", "pdopt.deploy", address, str(index), cores], env=env,
                          stdin=subprocess.DEVNULL)
