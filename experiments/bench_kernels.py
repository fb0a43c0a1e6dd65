"""Kernel benchmarks on one accelerator: `python -m experiments.bench_kernels {prefill,decode,tpu} --out=FILE.json`.

Each subcommand times pdopt's kernel and its peers in one run on one card, checks correctness against the
`jnp` reference in the same run, prints a table and writes every number to `--out`. `prefill` and `decode`
need a GPU; `tpu` (ragged paged attention) a TPU, and without one prints the expected rooflines.
"""

from __future__ import annotations

from absl import app, flags

from pdopt.benchmark import cli

_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer shapes and repetitions (smoke run).")


def main(argv: list[str]) -> None:
  commands = ("prefill", "decode", "tpu")
  if len(argv) != 2 or argv[1] not in commands:
    cli.fail(f"usage: python -m experiments.bench_kernels {{{','.join(commands)}}} --out=FILE.json")
  if argv[1] == "prefill":
    from pdopt.benchmark import prefill_attention as bench  # pylint: disable=import-outside-toplevel
  elif argv[1] == "tpu":
    from pdopt.benchmark import tpu_attention as bench  # pylint: disable=import-outside-toplevel
  else:
    from pdopt.benchmark import decode_attention as bench  # pylint: disable=import-outside-toplevel
  bench.run(out=_OUT.value, quick=_QUICK.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
