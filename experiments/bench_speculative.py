"""Decode speed against k for speculative decoding at batch 1 on held-out code prompts.

  python -m experiments.bench_speculative [--method=draft|ngram] [--ks=0,1,2,4,8] [--num_prompts=8]
      [--prompt_len=128] [--max_tokens=128] [--temperature=0] [--out=FILE.json]

Target `tiny-code`, draft `tiny-code-draft` (the shipped pair); the work is done by
`pdopt.benchmark.speculation_speed.run`, which prints nothing: this prints its Markdown table and writes the rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform

import jax
from absl import app, flags

from pdopt.benchmark import cli
from pdopt.benchmark import speculation_speed
from pdopt.models import pretrained

_METHOD = flags.DEFINE_enum("method", "draft", ["draft", "ngram"], "Where the guesses come from.")
_KS = flags.DEFINE_list("ks", ["0", "1", "2", "4", "8"], "Speculative tokens per step (0: no speculation).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Held-out prompts, served one at a time.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt length (byte tokens).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy; else request i samples with seed i.")
_TARGET = flags.DEFINE_string("target", "tiny-code", "Shipped target model.")
_DRAFT = flags.DEFINE_string("draft", "tiny-code-draft", "Shipped draft model.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  ks = [int(k) for k in _KS.value]
  target = pretrained.load_pretrained(_TARGET.value)
  draft = pretrained.load_pretrained(_DRAFT.value) if _METHOD.value == "draft" else None
  prompts = speculation_speed.heldout_prompts(_NUM_PROMPTS.value, _PROMPT_LEN.value, _TARGET.value)
  rows = speculation_speed.run(target, prompts, ks, method=_METHOD.value, draft=draft, max_tokens=_MAX_TOKENS.value,
                          temperature=_TEMPERATURE.value)
  print(speculation_speed.format_table(rows))
  if _OUT.value:
    meta = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, device=str(jax.devices()[0]),
                machine=platform.processor() or platform.machine(), target=_TARGET.value, draft=_DRAFT.value,
                temperature=_TEMPERATURE.value, method=_METHOD.value)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
