"""Trains pdopt's shipped byte-level target/draft pair on the Python standard library.

  python -m experiments.train_tiny --config=configs/train_tiny.py [--config.cpu_small=True]

Writes checkpoints (with manifest.json) to `config.out_dir` and loss curves to `config.run_dir`; the work is
done by `pdopt.training.train.run`.
"""

from __future__ import annotations

import json

from absl import app, logging
from ml_collections import config_flags

from pdopt.benchmark import cli
from pdopt.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/train_tiny.py).",
                                          lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; valid: flags only")
  if _CONFIG.value is None:
    cli.fail("--config is required; valid: configs/train_tiny.py")
  logging.set_verbosity(logging.INFO)  # the training's progress lines
  summaries = train.run(_CONFIG.value)
  print(json.dumps({name: {k: s[k] for k in ("num_params", "final_train_loss_last20_mean", "eval", "verify")}
                    for name, s in summaries.items()}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(documented_in="configs/train_tiny.py"))
