"""Several processes (hosts) as one JAX runtime: start-up, and a clock every process reads alike.

Multi-controller JAX runs the same program in every process, each driving its own devices; a step whose
mesh spans the processes is one collective program, so every process must take the same scheduling
decisions in the same order. The engine's decisions depend only on its queues and on its clock; with
`SharedClock` as the engine clock every process sees process 0's times, and the processes stay in step.

  # on each of N hosts (or N processes of one host), the same command with its own process id:
  python -m experiments.run --config=configs/quickstart.py --config.tensor_parallel=0 \\
      --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """`jax.distributed.initialize`, with cross-process collectives over gloo when the platform is the CPU.

  Raises:
    ValueError: a process id outside [0, num_processes), named.
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  # Only the CPU backend reads this (GPUs use NCCL); without it CPU collectives across processes fail.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


class SharedClock:
  """Seconds since construction on process 0's `perf_counter`, the same value on every process.

  Every call is a broadcast from process 0, so every process must call it the same number of times in the
  same order, which the engine and the replay do when they take the same decisions.
  """

  def __init__(self):
    self._start = time.perf_counter()

  def __call__(self) -> float:
    now = np.float32(time.perf_counter() - self._start)
    return float(multihost_utils.broadcast_one_to_all(now))
