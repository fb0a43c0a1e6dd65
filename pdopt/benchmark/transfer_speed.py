"""KV transfer between instance processes (`pdopt.deploy.transfer`) against a copy within one device.

`python -m experiments.bench_transfer --out=FILE.json` starts a publishing process, then pulls arrays of
several sizes from it (as a decode instance pulls a prefilled request's pages), each size several times, and
times an on-device copy of the same bytes in the pulling process for comparison. On CPU both processes share
the host's memory (loopback); on GPUs each process has its own GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from pdopt.benchmark import timing
from pdopt.deploy.transfer import KVSpec, KVTransfer

# Per transfer: layers x (K, V) arrays of [K heads, pages, page_size, head_dim], like a request's pages.
_LAYOUT = (16, 8, 16, 64)  # layers, KV heads, page size, head dim (the Llama-3.2-1B shape)


@dataclasses.dataclass(frozen=True)
class Row:
  pages: int
  mb: float
  pull_ms: float
  pull_gbps: float
  copy_gbps: float


def _arrays(pages: int, seed: int) -> list[jax.Array]:
  layers, heads, page_size, dim = _LAYOUT
  key = jax.random.key(seed)
  return [jax.random.normal(jax.random.fold_in(key, i), (heads, pages, page_size, dim), jnp.bfloat16)
          for i in range(2 * layers)]


def publisher(pages: Sequence[int], repeats: int) -> None:
  """The publishing side (a child process): publishes `repeats` transfers of each size under ids
  (size index, repeat), prints its address, and waits until killed."""
  xfer = KVTransfer()
  for i, n in enumerate(pages):
    for r in range(repeats):
      arrays = _arrays(n, seed=i * 100 + r)
      xfer.publish(i * 1000 + r, arrays, n, timeout_s=600)
  print(f"ADDRESS {xfer.address}", flush=True)
  time.sleep(3600)


def run(pages: Sequence[int] = (1, 8, 64, 256), repeats: int = 5) -> dict[str, Any]:
  """Pulls every published transfer and returns the rows with the run's metadata."""
  env = dict(os.environ)
  child = subprocess.Popen([sys.executable, "-c", "import sys; from pdopt.benchmark import transfer_speed as t; "
                            f"t.publisher({list(pages)}, {repeats})"], stdout=subprocess.PIPE, text=True, env=env)
  try:
    line = ""
    while not line.startswith("ADDRESS"):
      line = child.stdout.readline()
      if not line and child.poll() is not None:
        raise RuntimeError("the publishing process exited")
    address = line.split()[1]
    xfer = KVTransfer()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rows = []
    for i, n in enumerate(pages):
      layers, heads, page_size, dim = _LAYOUT
      spec = KVSpec(((heads, n, page_size, dim),) * (2 * layers), ("bfloat16",) * (2 * layers), n)
      times = []
      for r in range(repeats):
        _, seconds = xfer.pull(address, i * 1000 + r, spec, [sharding] * (2 * layers), timeout_s=120)
        times.append(seconds)
      local = _arrays(n, seed=7)
      copy = jax.jit(lambda xs: [x + 0 for x in xs])
      copy_s = timing.time_jax(lambda: copy(local), warmup=2, iters=repeats)
      mb = spec.num_bytes / 1e6
      pull = statistics.median(times[1:] if len(times) > 1 else times)  # The first pays the connection.
      rows.append(Row(n, mb, 1e3 * pull, mb / 1e3 / pull, 2 * mb / 1e3 / copy_s))
    return {"meta": {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                     "jax": jax.__version__, "layout": list(_LAYOUT), "repeats": repeats},
            "rows": [dataclasses.asdict(r) for r in rows]}
  finally:
    child.kill()
    child.wait()


def format_table(result: dict[str, Any]) -> str:
  lines = ["| pages | MB | pull ms | pull GB/s | device copy GB/s (read + write) |", "|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['pages']} | {r['mb']:.2f} | {r['pull_ms']:.2f} | {r['pull_gbps']:.2f} | {r['copy_gbps']:.1f} |")
  return "\n".join(lines)
