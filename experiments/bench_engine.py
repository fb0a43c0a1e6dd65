"""The engine end to end on one accelerator: `python -m experiments.bench_engine --out=FILE.json`.

Decode steps against their roofline floor and the host overhead, prefill MFU, a serving run of the Azure
conversation trace, and output tokens/s against Hugging Face `transformers` `generate` on the same weights
and prompts (see `pdopt/benchmark/engine_speed.py`). `--quick` is a smoke run with small shapes (any
machine, CPU included: 1.3 GB resident and about a minute on two CPU cores; decode batches 1 and 4 unless
`--decode_batches` says otherwise; without a CUDA torch the `transformers` peer is skipped).
"""

from __future__ import annotations

import dataclasses
import os

# The transformers peer shares the card with JAX: let JAX allocate what it uses rather than 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402

from pdopt.benchmark import cli  # noqa: E402
from pdopt.benchmark import engine_speed as bench  # noqa: E402
from pdopt.scheduling import POLICIES  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes and few steps (smoke run).")
_MODELS = flags.DEFINE_list("models", ["llama-3.2-1b"], "pdopt presets to measure (random bf16 weights).")
_PARTS = flags.DEFINE_list("parts", ["decode", "prefill", "serving", "hf"], "Which parts to run.")
_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16", "64", "256"], "Decode batch sizes.")
_CONTEXT = flags.DEFINE_integer("context", 2048, "Tokens of history of every decoding sequence.")
_HF_BATCHES = flags.DEFINE_list("hf_batches", ["1", "64"], "Batch sizes of the generate comparison.")
_RATE = flags.DEFINE_float("serving_rate", 40.0, "Arrival rate (req/s) of the serving run.")
_REQUESTS = flags.DEFINE_integer("serving_requests", 600, "Requests of the serving run.")
_POLICIES = flags.DEFINE_list("serving_policies", ["chunked", "prefill_first"], "Policies of the serving run.")
_ASYNC = flags.DEFINE_bool("async_decode", False, "EngineConfig.async_decode for every engine of the run.")
_STEPS = flags.DEFINE_integer("num_scheduler_steps", 1,
                              "EngineConfig.num_scheduler_steps (needs --async_decode) for every engine of the run.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; valid: flags only")
  unknown = [p for p in _POLICIES.value if p not in POLICIES]
  if unknown:
    cli.fail(f"--serving_policies: unknown policy {unknown[0]!r}; valid: {', '.join(sorted(POLICIES))}")
  try:
    batches = tuple(int(b) for b in _BATCHES.value)
  except ValueError:
    cli.fail(f"--decode_batches={','.join(_BATCHES.value)}: not integers")
  if len(set(batches)) != len(batches) or min(batches, default=0) < 1:
    cli.fail(f"--decode_batches={','.join(_BATCHES.value)}; valid: distinct integers >= 1")
  settings = bench.Settings(
      models=tuple(_MODELS.value), parts=tuple(_PARTS.value),
      decode_batches=batches, context=_CONTEXT.value,
      hf_batches=tuple(int(b) for b in _HF_BATCHES.value), serving_rate=_RATE.value,
      serving_requests=_REQUESTS.value, serving_policies=tuple(_POLICIES.value), quick=_QUICK.value,
      async_decode=_ASYNC.value, scheduler_steps=_STEPS.value)
  if settings.quick:
    settings = bench.quick(settings)
    if flags.FLAGS["decode_batches"].present:  # asked for: measured as asked, even the default sizes
      settings = dataclasses.replace(settings, decode_batches=batches)
  bench.run(_OUT.value, settings)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
