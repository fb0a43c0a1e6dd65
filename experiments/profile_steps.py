"""Profiles engine steps on the machine at hand and fits the step-cost model the simulator and `slo_aware` use.

  python -m experiments.profile_steps --model=tiny-code --out=pdopt/step_costs/tiny-code_cpu.json \
      --token_buckets=32,64,128 --seq_buckets=32 --page_buckets=32     # the quickstart's shapes
  python -m experiments.profile_steps --model=llama-3.2-1b --out=pdopt/step_costs/llama-3.2-1b_h200.json

`--model` is a shipped model (`tiny-code`) or a `pdopt.preset` name (random weights). The file records the
fitted coefficients, the device (measured copy bandwidth and matmul rate), versions, date, commit, every
profiled step with its measured and predicted time, and the fit's residuals (`pdopt/benchmark/profile_steps.py`).
"""

from __future__ import annotations

from absl import app, flags

from pdopt.benchmark import cli
from pdopt.benchmark import profile_steps

_MODEL = flags.DEFINE_string("model", "tiny-code", "A shipped model or a pdopt.preset name.")
_OUT = flags.DEFINE_string("out", None, "Where to write the fitted cost model (JSON).", required=True)
_KV = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8", "fp8"], "EngineConfig.kv_cache_dtype.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed runs per step (default: 10 on accelerators, 5 on CPU).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 128, "Largest decode batch of the grid (memory of large models).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_TOKENS = flags.DEFINE_list("token_buckets", None, "The engine's token buckets to profile at (default: its own).")
_SEQS = flags.DEFINE_list("seq_buckets", None, "The engine's sequence buckets.")
_PAGES = flags.DEFINE_list("page_buckets", None, "The engine's page buckets.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  given = [_TOKENS.value, _SEQS.value, _PAGES.value]
  if any(given) and not all(given):
    cli.fail("--token_buckets, --seq_buckets and --page_buckets go together")
  buckets = tuple(tuple(int(b) for b in v) for v in given) if all(given) else None
  try:
    model = profile_steps.profile_and_fit(_MODEL.value, kv_cache_dtype=_KV.value, repeats=_REPEATS.value,
                                          max_batch=_MAX_BATCH.value, page_size=_PAGE_SIZE.value, buckets=buckets)
  except ValueError as e:
    cli.fail(str(e))
  model.save(_OUT.value)
  r = model.metadata["residuals"]
  print(f"wrote {_OUT.value}: {r['num_steps']} steps, relative error median {100 * r['median_rel_error']:.1f}% "
        f"p90 {100 * r['p90_rel_error']:.1f}% max {100 * r['max_rel_error']:.1f}%")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
