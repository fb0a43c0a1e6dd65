"""Prints a completion of a prompt by a model that ships with pdopt.

  python -m experiments.generate --prompt="def fib(n):" --max_tokens=64 [--model=tiny-code] [--temperature=0.8]
"""

from __future__ import annotations

from absl import app, flags

import pdopt
from pdopt.benchmark import cli
from pdopt.models import pretrained

_PROMPT = flags.DEFINE_string("prompt", "def fib(n):", "Text to complete.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens (bytes) to generate.")
_MODEL = flags.DEFINE_string("model", "tiny-code", f"One of: {', '.join(sorted(pretrained.REGISTRY))}.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; valid: flags only (--prompt=..., --max_tokens=...)")
  try:
    model = pretrained.load_pretrained(_MODEL.value)
  except ValueError as e:
    cli.fail(f"--model: {e}")
  tok = pretrained.tokenizer(_MODEL.value)
  prompt = tok.encode(_PROMPT.value, add_bos=True)
  engine = pdopt.Engine(model, pdopt.EngineConfig(policy="chunked", page_size=16, num_pages=64,
                                                  max_num_batched_tokens=256, max_num_seqs=1,
                                                  max_model_len=len(prompt) + _MAX_TOKENS.value))
  params = pdopt.SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, seed=_SEED.value)
  out = engine.generate([prompt], params)[0]
  print(_PROMPT.value + tok.decode(out.token_ids))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
