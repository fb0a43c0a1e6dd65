"""Two processes as one JAX runtime on this machine (CPU devices, gloo collectives): the model sharded over
both processes' devices serves the same greedy tokens as one unsharded device, and the experiment entry
point runs a replay under `jax.distributed` with every process in step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pdopt

_PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]

# One process of the group; prints the greedy outputs as JSON on its last line.
_ENGINE_PROCESS = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
import pdopt
from pdopt import sharding
sharding.initialize(sys.argv[1], 2, int(sys.argv[2]))
assert jax.device_count() == 4 and jax.local_device_count() == 2
model = pdopt.init_model(pdopt.preset("tiny", num_kv_heads=4), seed=0)
mesh = sharding.make_mesh(sharding.MeshConfig(model=4))  # tensor parallelism across both processes
config = pdopt.EngineConfig(page_size=4, num_pages=64, max_num_batched_tokens=16, chunk_size=8, max_num_seqs=4)
engine = pdopt.Engine(model, config, mesh=mesh)
outs = engine.generate(PROMPTS, pdopt.SamplingParams(max_tokens=10, ignore_eos=True))
engine.check_no_leaks()
print(json.dumps([list(o.token_ids) for o in outs]))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_group(args_of, timeout: float) -> list[str]:
  """Starts one process per argument list, waits for all; returns their stdouts (fails on any error)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for args in args_of]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, out[-2000:] + err[-4000:]
    outs.append(out)
  return outs


def test_tensor_parallel_across_two_processes_matches_one_device():
  address = f"localhost:{_free_port()}"
  code = _ENGINE_PROCESS.replace("PROMPTS", repr(_PROMPTS))
  outs = _run_group([["-c", code, address, str(i)] for i in range(2)], timeout=600)
  got = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  model = pdopt.init_model(pdopt.preset("tiny", num_kv_heads=4), seed=0)
  engine = pdopt.Engine(model, pdopt.EngineConfig(page_size=4, num_pages=64, max_num_batched_tokens=16,
                                                  chunk_size=8, max_num_seqs=4))
  want = [list(o.token_ids) for o in engine.generate(_PROMPTS, pdopt.SamplingParams(max_tokens=10,
                                                                                     ignore_eos=True))]
  assert got[0] == got[1] == want


def test_experiment_entry_point_runs_under_jax_distributed(tmp_path):
  address = f"localhost:{_free_port()}"
  common = ["-m", "experiments.run", "--config=configs/quickstart.py", "--config.tensor_parallel=0",
            "--config.policies=chunked", "--config.workload.num_requests=4", "--config.progress=False",
            f"--coordinator_address={address}", "--num_processes=2"]
  _run_group([common + [f"--config.results_dir={tmp_path / f'p{i}'}", f"--process_id={i}"] for i in range(2)],
             timeout=600)
  metrics = json.loads((tmp_path / "p0" / "quickstart" / "metrics.json").read_text())
  assert metrics["chunked"]["completed"] == 4 and metrics["chunked"]["failed"] == 0
  assert not (tmp_path / "p1").exists(), "only process 0 writes results"
