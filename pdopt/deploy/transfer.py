"""KV pages between instance processes, device to device, with `jax.experimental.transfer`.

Each instance process runs one transfer server on its devices. A prefill instance publishes a request's
exported pages under a unique id (`await_pull`); the decode instance the router picked pulls them into arrays
sharded like its own cache (`pull`), so the copy goes from the prefill's devices to the decode's without the
host in between where the transport allows. A pull waits in a worker thread with a deadline: a peer that
died mid-transfer fails the pull, and one that never answers times it out, so the decode instance and its
other requests go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import time
from typing import Sequence

import jax
from jax.experimental import transfer


@dataclasses.dataclass(frozen=True)
class KVSpec:
  """What a published transfer holds: per flattened array its shape and dtype name, and the pages' count."""
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  num_pages: int

  @property
  def num_bytes(self) -> int:
    return sum(int(jax.numpy.dtype(d).itemsize) * _size(s) for s, d in zip(self.shapes, self.dtypes))


def _size(shape: Sequence[int]) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


class KVTransfer:
  """This process's transfer server.

  Args:
    host: the address peers reach this process at (the loopback on one host).
  """

  def __init__(self, host: str = "127.0.0.1"):
    self._server = transfer.start_transfer_server(jax.devices()[0].client, f"{host}:0", [f"{host}:0"])
    self.address: str = self._server.address()
    self._connections: dict[str, object] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kv-pull")

  def publish(self, uuid: int, arrays: Sequence[jax.Array], num_pages: int, timeout_s: float) -> KVSpec:
    """Makes `arrays` available to one pull under `uuid` for `timeout_s` seconds; returns what they are."""
    arrays = list(arrays)
    self._server.await_pull(uuid, arrays, timeout=datetime.datetime.now() + datetime.timedelta(seconds=timeout_s))
    return KVSpec(tuple(tuple(a.shape) for a in arrays), tuple(a.dtype.name for a in arrays), num_pages)

  def pull(self, address: str, uuid: int, spec: KVSpec, shardings: Sequence[jax.sharding.Sharding],
           timeout_s: float) -> tuple[list[jax.Array], float]:
    """The arrays published under `uuid` at `address`, placed with `shardings`, and the seconds the pull took.

    Raises:
      TimeoutError: not done within `timeout_s`.
      RuntimeError: the transfer failed (the peer closed the connection, for one).
    """
    start = time.perf_counter()
    future = self._pool.submit(self._pull, address, uuid, spec, list(shardings), timeout_s)
    try:
      arrays = future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
      raise TimeoutError(f"KV transfer {uuid} from {address} not done in {timeout_s:g} s") from None
    except Exception as e:  # The runtime raises its own error types for a broken transfer.
      raise RuntimeError(f"KV transfer {uuid} from {address} failed: {type(e).__name__}: {e}") from e
    return arrays, time.perf_counter() - start

  def _pull(self, address: str, uuid: int, spec: KVSpec, shardings: list, timeout_s: float) -> list[jax.Array]:
    if address not in self._connections:
      self._connections[address] = self._server.connect(address)
    structs = [jax.ShapeDtypeStruct(s, jax.numpy.dtype(d), sharding=sh)
               for s, d, sh in zip(spec.shapes, spec.dtypes, shardings)]
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    return jax.block_until_ready(self._connections[address].pull(uuid, structs, timeout=deadline))

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
