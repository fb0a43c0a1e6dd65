"""The deployment with the most goodput per GPU under an SLO, searched in the simulator:

  python -m experiments.search --config=configs/search_azure.py [--config.gpus=8] [--config.workers=2]

Prints the best candidates, and writes `results/<run_name>/` (results.jsonl, resumable; top.md; frontier.png;
best_config.py, which `python -m experiments.run --config=.../best_config.py` runs for real). The fields are
documented in `pdopt/benchmark/deployment_search.py`.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from pdopt.benchmark import cli
from pdopt.benchmark import deployment_search

_CONFIG = config_flags.DEFINE_config_file("config", None, "Search config file (configs/search_*.py).", lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    cli.fail("--config=configs/search_<name>.py is required")
  try:
    deployment_search.run_search(_CONFIG.value)
  except ValueError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(documented_in="pdopt/benchmark/deployment_search.py"))
