"""Quantized KV caches on the shipped tiny-code model: held-out perplexity barely moves."""

import numpy as np

import pdopt
from pdopt.models import kv_quality
from pdopt.training import data


def test_int8_and_fp8_kv_keep_held_out_perplexity():
  model = pdopt.load_pretrained("tiny-code")
  windows = data.eval_windows(data.load_corpus().eval_tokens, 128, 4)
  none, int8, fp8 = kv_quality.kv_quant_quality(model, windows)
  assert none.max_rel_logit_diff == 0 and none.argmax_agreement == 1
  assert abs(int8.perplexity / none.perplexity - 1) < 0.01
  assert abs(fp8.perplexity / none.perplexity - 1) < 0.03
  assert 0 < int8.max_rel_logit_diff < 2e-2 and int8.argmax_agreement > 0.97
  assert np.isfinite(fp8.loss)
