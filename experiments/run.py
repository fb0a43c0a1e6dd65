"""The main job: replay a workload against each scheduling policy and compare them.

  python -m experiments.run --config=configs/quickstart.py
  python -m experiments.run --config=configs/quickstart.py --config.policies=chunked,prefill_first --config.rate=4

Several processes or hosts (one command per process, the same on each but for --process_id; the model is
sharded over every device of every process, see `pdopt/sharding/distributed.py`):

  python -m experiments.run --config=configs/quickstart.py --config.tensor_parallel=0 \
      --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0

Prints a "Serving Benchmark Result" block per policy and a comparison table, and writes
`results/<run_name>/` (config.json, metrics.json, requests.csv, ttft_cdf.png, tpot_cdf.png and, with
`--config.rates=1,2,4`, goodput_vs_rate.png). The fields are documented in `pdopt/benchmark/config.py`; the
work is done by `pdopt.benchmark.run_experiment`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from pdopt import benchmark, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py).",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process (multi-host) run; with "
                                   "--num_processes and --process_id, and --config.tensor_parallel=0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  if _CONFIG.value.host_devices:
    # CPU only: split the host into virtual devices for multi-instance deployments. XLA reads this when
    # the backend starts, which has not happened yet at this point.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CONFIG.value.host_devices}")
  try:
    if _COORDINATOR.value:
      sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    benchmark.run_experiment(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
