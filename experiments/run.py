"""The main job: replay a workload against each scheduling policy and compare them.

  python -m experiments.run --config=configs/quickstart.py
  python -m experiments.run --config=configs/quickstart.py --config.policies=chunked,prefill_first --config.rate=4

Prints a "Serving Benchmark Result" block per policy and a comparison table, and writes
`results/<run_name>/` (config.json, metrics.json, requests.csv, ttft_cdf.png, tpot_cdf.png and, with
`--config.rates=1,2,4`, goodput_vs_rate.png). The fields are documented in `pdopt/benchmark/config.py`; the
work is done by `pdopt.benchmark.run_experiment`.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from pdopt import benchmark

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py).",
                                          lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  try:
    benchmark.run_experiment(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
