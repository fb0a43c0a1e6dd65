"""The main job: replay a workload against each scheduling policy and compare them.

  python -m experiments.run --config=configs/quickstart.py
  python -m experiments.run --config=configs/quickstart.py --config.policies=chunked,prefill_first --config.rate=4
  python -m experiments.run --config=configs/quickstart.py --dry_run    # print the resolved config, run nothing

Several processes or hosts (one command per process, the same on each but for --process_id; the model is
sharded over every device of every process, see `pdopt/sharding/distributed.py`):

  python -m experiments.run --config=configs/quickstart.py --config.tensor_parallel=0 \
      --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0

Deployments (`--config.deployments`, one process per instance) start their instance processes themselves on
one host; over several hosts, the same command runs on each host, with `PDOPT_DEPLOY_AUTHKEY` set to the same
hex key everywhere: host 0 runs the router at the coordinator address, every host its share of the instances.

Prints a "Serving Benchmark Result" block per policy and a comparison table, and writes
`results/<run_name>/` (config.json, metrics.json, requests.csv, ttft_cdf.png, tpot_cdf.png and, with
`--config.rates=1,2,4`, goodput_vs_rate.png; a rerun gets `results/<run_name>_2/` unless `--overwrite`).
Every config field is documented in `pdopt/benchmark/config.py`, every result field in `docs/results.md`;
the work is done by `pdopt.benchmark.run_experiment`. A mistake in the command or the config is one line
on stderr and exit code 2; logs are quiet unless `-v`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from pdopt import benchmark, sharding
from pdopt.benchmark import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py). Override a field with --config.FIELD=VALUE "
    "(--config.workload.num_requests=20); every field is documented in pdopt/benchmark/config.py; --dry_run "
    "prints them all.", lock_config=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config, print it resolved (JSON, as config.json "
                             "would hold it) and exit without running.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into results/<run_name>/ even if it holds an earlier "
                               "run (its files are removed first); without it the run goes to <run_name>_2/, ...")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process (multi-host) run; with "
                                   "--num_processes and --process_id, and --config.tensor_parallel=0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; valid: flags only (--config=configs/<name>.py ...)")
  if _CONFIG.value is None:
    cli.fail("--config is required; valid: a config file such as configs/quickstart.py")
  if _CONFIG.value.host_devices:
    # CPU only: split the host into virtual devices for multi-instance deployments. XLA reads this when
    # the backend starts, which has not happened yet at this point.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CONFIG.value.host_devices}")
  if _CONFIG.value.deployments:
    # The router of deployments leaves the GPUs' memory to the instance processes.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  try:
    if _DRY_RUN.value:
      config = benchmark.validate_config(_CONFIG.value)
      print(json.dumps(config.to_dict(), indent=2, default=str))
      print("# valid; every field is documented in pdopt/benchmark/config.py", file=sys.stderr)
      return
    if _COORDINATOR.value and _CONFIG.value.deployments:
      # Deployments over several hosts: host 0 runs the router (listening at the coordinator address) and its
      # share of the instances; every other host runs its share, which connect to the router.
      host, port = _COORDINATOR.value.rsplit(":", 1)
      if _PROCESS_ID.value == 0:
        benchmark.run_experiment(_CONFIG.value, overwrite=_OVERWRITE.value, deploy_listen=(host, int(port)),
                                 deploy_hosts=_NUM_PROCESSES.value)
      else:
        sys.exit(benchmark.serve_remote_instances(_CONFIG.value, _COORDINATOR.value, _PROCESS_ID.value,
                                                  _NUM_PROCESSES.value))
      return
    if _COORDINATOR.value:
      sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    benchmark.run_experiment(_CONFIG.value, overwrite=_OVERWRITE.value)
  except benchmark.ConfigError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
