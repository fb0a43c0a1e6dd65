"""Model-level effect of quantized KV caches on the shipped tiny-code model's held-out code.

  python -m experiments.kv_quant_quality [--model=tiny-code] [--windows=16] [--seq_len=256]
"""

from __future__ import annotations

from absl import app, flags

from pdopt.benchmark import cli
from pdopt.models import kv_quality, pretrained
from pdopt.training import data

_MODEL = flags.DEFINE_string("model", "tiny-code", "pdopt.load_pretrained name.")
_WINDOWS = flags.DEFINE_integer("windows", 16, "Held-out windows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per window.")


def main(argv: list[str]) -> None:
  del argv
  model = pretrained.load_pretrained(_MODEL.value)
  corpus = data.load_corpus()
  windows = data.eval_windows(corpus.eval_tokens, _SEQ_LEN.value, _WINDOWS.value)
  print(f"{_MODEL.value}: {len(windows)} held-out windows of {_SEQ_LEN.value} bytes")
  print(f"{'kv cache':<8} {'loss':>8} {'ppl':>8} {'max rel logit diff':>19} {'argmax agree':>13}")
  for r in kv_quality.kv_quant_quality(model, windows):
    print(f"{r.kv_quant:<8} {r.loss:8.4f} {r.perplexity:8.4f} {r.max_rel_logit_diff:19.2e} {r.argmax_agreement:13.4f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
