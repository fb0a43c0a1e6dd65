"""The simulator against the real engine on one experiment:

  python -m experiments.validate_sim --config=configs/quickstart.py

Runs the config on the devices and in the simulator and prints, per policy, the relative error of the
simulated median and P90 TTFT, TPOT, end-to-end latency and the throughputs (`pdopt/benchmark/validation.py`);
`--out=FILE.json` also writes both runs' metrics and the errors.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from pdopt.benchmark import cli
from pdopt.benchmark import validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "JSON file for both runs' metrics and the errors.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    cli.fail("--config=configs/<name>.py is required")
  try:
    result = validation.validate(_CONFIG.value)
  except ValueError as e:
    cli.fail(str(e))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(documented_in="pdopt/benchmark/config.py"))
