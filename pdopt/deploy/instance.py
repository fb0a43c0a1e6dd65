"""One engine instance in its own OS process, on its own devices, driven by the router.

    python -m pdopt.deploy HOST:PORT INDEX [CORES]       (the router starts these; see `router.Deployment`)

The process connects to the router (`multiprocessing.connection`, authenticated by the key in the environment
variable `PDOPT_DEPLOY_AUTHKEY`), receives its `InstanceSpec`, builds its model and engine on the devices it
sees, compiles, says it is ready, and then serves: it adds the requests the router sends, steps its engine
whenever it has work, and reports every request that ends with its record and tokens. A prefill instance
(disaggregated serving) reports each request that got its first token as a handoff, its KV pages published on
the process's transfer server (`transfer.KVTransfer`), and frees them when the router says the decode side has
them. A decode instance pulls such pages into its own pool and continues the request.

Messages are `(kind, payload)` tuples, pickled by `multiprocessing.connection`:

  router -> instance   spec, add, import, release, abort, stop
  instance -> router   clock, ready, ended, handoff, imported, import_failed, stats, error
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import itertools
import multiprocessing.connection
import os
import signal
import time
import traceback
from typing import Any

import jax

from pdopt.deploy.config import Role
from pdopt.deploy.transfer import KVTransfer
from pdopt.engine.config import EngineConfig
from pdopt.engine.engine import Engine
from pdopt.engine.request import Request, RequestStatus
from pdopt.models.source import ModelSource
from pdopt.sharding import MeshConfig, make_mesh

AUTHKEY_ENV = "PDOPT_DEPLOY_AUTHKEY"
_PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies (Linux)


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
  """What an instance runs.

  Attributes:
    index: its number in the deployment.
    role: "replica", "prefill" or "decode".
    model: the model to build.
    engine: its engine.
    tensor_parallel: devices its model is sharded over (all the devices the process sees).
    clock_offset: seconds to add to this host's `time.perf_counter()` to read the router's clock (0 on the
      router's host, whose clock every process shares).
    transfer_host: the address peers reach this process's transfer server at.
    transfer_timeout_s: how long a published KV transfer waits to be pulled, and a pull may take.
    warmup: compile every shape before serving.
  """
  index: int
  role: Role
  model: ModelSource
  engine: EngineConfig
  tensor_parallel: int = 1
  clock_offset: float = 0.0
  transfer_host: str = "127.0.0.1"
  transfer_timeout_s: float = 30.0
  warmup: bool = True


@dataclasses.dataclass
class _Import:
  """A handed-off request on its way into this instance's pool."""
  request: Request
  rid: str  # the router's id of the request
  future: concurrent.futures.Future | None
  kv: list | None = None
  num_pages: int = 0
  seconds: float = 0.0
  num_bytes: int = 0


class Instance:
  """The serving loop of one instance process (see the module docstring)."""

  def __init__(self, conn: multiprocessing.connection.Connection, spec: InstanceSpec):
    self.conn, self.spec = conn, spec
    clock = lambda: time.perf_counter() + spec.clock_offset  # noqa: E731
    model = spec.model.build()
    mesh = make_mesh(MeshConfig(model=spec.tensor_parallel)) if spec.tensor_parallel > 1 else None
    self.engine = Engine(model, spec.engine, clock=clock, mesh=mesh)
    self.transfer = KVTransfer(spec.transfer_host) if spec.role != "replica" else None
    self._uuids = itertools.count(spec.index << 40)
    self._ids: dict[str, str] = {}  # engine request id -> the router's
    self._imports: list[_Import] = []
    self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kv-import")
    self._stop = False

  def serve(self) -> None:
    warmup_s = time.perf_counter()
    compiled = self.engine.warmup() if self.spec.warmup else 0
    self._send("ready", {"index": self.spec.index, "compiled": compiled, "warmup_s": time.perf_counter() - warmup_s,
                         "transfer_address": self.transfer.address if self.transfer else None, "pid": os.getpid()})
    while not self._stop:
      busy = self.engine.has_unfinished() or bool(self._imports)
      while self.conn.poll(0 if busy else 0.02):
        self._handle(*self.conn.recv())
        if self._stop:
          break
      self._advance_imports()
      if self.engine.has_unfinished():
        self.engine.advance()
        self._report()

  # ------------------------------------------------------------------ messages

  def _send(self, kind: str, payload: Any) -> None:
    self.conn.send((kind, payload))

  def _handle(self, kind: str, payload: dict) -> None:
    match kind:
      case "add":
        rid = payload["engine_id"]
        self._ids[rid] = payload["rid"]
        arrival = min(payload["arrival_time"], self.engine.clock())  # Another host's clock may run ahead.
        try:
          self.engine.add_request(payload["prompt"], payload["params"], request_id=rid, arrival_time=arrival,
                                  priority=payload["priority"], client=payload["client"])
        except ValueError as e:
          self._send("ended", [{"rid": payload["rid"], "refused": str(e)}])
      case "import":
        request, spec = payload["request"], payload["spec"]
        self._ids[request.request_id] = payload["rid"]
        shardings = [a.sharding for a in jax.tree_util.tree_leaves(self.engine.executor.runner.cache)]
        future = self._pool.submit(self.transfer.pull, payload["address"], payload["uuid"], spec, shardings,
                                   self.spec.transfer_timeout_s)
        self._imports.append(_Import(request, payload["rid"], future, num_pages=spec.num_pages,
                                     num_bytes=spec.num_bytes))
      case "release":
        self.engine.release_handoff(payload["engine_id"])
      case "abort":
        self.engine.abort(payload["engine_id"])
      case "stop":
        self._stop = True
        self._send("stats", {"num_steps": self.engine.num_steps, "num_preemptions": self.engine.num_preemptions,
                             "prefix": dataclasses.asdict(self.engine.block_manager.stats())})
      case _:
        raise ValueError(f"unknown message {kind!r}")

  def _advance_imports(self) -> None:
    """Moves pulled requests into the engine as soon as their transfer is done and the pool holds them."""
    waiting = []
    for imp in self._imports:
      if imp.kv is None:
        if not imp.future.done():
          waiting.append(imp)
          continue
        try:
          flat, imp.seconds = imp.future.result()
        except (TimeoutError, RuntimeError) as e:
          self._send("import_failed", {"rid": imp.rid, "engine_id": imp.request.request_id, "reason": str(e)})
          continue
        imp.kv = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.engine.executor.runner.cache), flat)
      if self.engine.import_request(imp.request, imp.kv, imp.num_pages):
        self._send("imported", {"rid": imp.rid, "engine_id": imp.request.request_id, "bytes": imp.num_bytes,
                                "seconds": imp.seconds})
      else:
        waiting.append(imp)  # The pool is full for now; try again after the next steps.
    self._imports = waiting

  def _report(self) -> None:
    """Sends the requests that ended in the last step, and publishes the prefilled ones."""
    ended = []
    for rid in [r for r in self._ids if self.engine.requests.get(r) is not None]:
      req = self.engine.requests[rid]
      if req.status.done:
        ended.append({"rid": self._ids.pop(rid), "record": req.to_record(), "tokens": req.output_token_ids})
    if ended:
      self._send("ended", ended)
    for req in self.engine.take_handoffs():
      kv, num_pages = self.engine.executor.export_pages(req.request_id, req.num_computed_tokens)
      uuid = next(self._uuids)
      spec = self.transfer.publish(uuid, jax.tree_util.tree_leaves(kv), num_pages, self.spec.transfer_timeout_s)
      moved = dataclasses.replace(req, all_token_ids=list(req.all_token_ids), token_times=list(req.token_times),
                                  status=RequestStatus.WAITING)
      self._send("handoff", {"rid": self._ids.pop(req.request_id), "request": moved, "uuid": uuid, "spec": spec,
                             "address": self.transfer.address})


def main(argv: list[str]) -> int:
  """Serves as instance `argv[2]` of the router at `argv[1]`, on the CPU cores `argv[3]` ("0,1"; "" for any)."""
  with contextlib.suppress(OSError, AttributeError):  # Die with the router, even if it is killed outright.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if len(argv) > 3 and argv[3]:
    os.sched_setaffinity(0, [int(c) for c in argv[3].split(",")])
  host, port = argv[1].rsplit(":", 1)
  authkey = bytes.fromhex(os.environ[AUTHKEY_ENV])
  conn = multiprocessing.connection.Client((host, int(port)), authkey=authkey)
  conn.send(("clock", {"index": int(argv[2]), "time": time.perf_counter(), "host": os.uname().nodename}))
  try:
    kind, spec = conn.recv()
    assert kind == "spec", kind
    Instance(conn, spec).serve()
  except EOFError:
    return 0  # The router went away: nothing is left to serve.
  except BaseException:  # Reported, so that the router can say why the instance is gone.
    try:
      conn.send(("error", traceback.format_exc()))
    except OSError:
      pass
    return 1
  return 0


