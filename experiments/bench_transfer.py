"""KV pages between two processes against an on-device copy: `python -m experiments.bench_transfer [--out=FILE.json]`
(`pdopt/benchmark/transfer_speed.py`)."""

from __future__ import annotations

import json

from absl import app, flags

from pdopt.benchmark import cli
from pdopt.benchmark import transfer_speed

_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")
_PAGES = flags.DEFINE_list("pages", ["1", "8", "64", "256"], "Pages (16 tokens of the Llama-3.2-1B KV) per transfer.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Transfers per size.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  result = transfer_speed.run([int(p) for p in _PAGES.value], _REPEATS.value)
  print(f"{result['meta']['device']}, jax {result['meta']['jax']}")
  print(transfer_speed.format_table(result))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
