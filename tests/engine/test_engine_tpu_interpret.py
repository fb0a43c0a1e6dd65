"""The engine's TPU path on a CPU: `tiny-code` served through the TPU attention kernel, run in TPU interpret
mode (`pallas_kernels.api.tpu_interpret_mode`), gives the greedy tokens of the reference path.

Inside the context the api takes the platform to be a TPU: attention goes to `pallas_kernels.ragged_paged`
(with backend "pallas", a kernel that could not serve a call would fail the test rather than fall back), the
fused decode layer, a GPU kernel, gives way to the model's unfused path, and every kernel call runs in JAX's
TPU interpreter with race detection. Steps mix prompt chunks with cached prefixes and decodes.
"""

from __future__ import annotations

import dataclasses

import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.ragged_paged
import pdopt
from pallas_kernels import api

# A prompt longer than a chunk (prefilled in several steps behind its own cached prefix) and short prompts
# that decode while it prefills; two prompts share a first page (a prefix-cache hit).
_PROMPTS = [list(range(3, 53)), [7, 8, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113,
                                            114, 115, 116, 5], [100 + i for i in range(16)] + [40, 41]]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_tiny_code_through_the_tpu_kernel_matches_the_reference(kv_cache_dtype, monkeypatch):
  traced = []  # one entry per layer of each compiled step that took the TPU kernel
  kernel = pallas_kernels.ragged_paged.ragged_paged_attention
  monkeypatch.setattr(pallas_kernels.ragged_paged, "ragged_paged_attention",
                      lambda *args, **kwargs: traced.append(1) or kernel(*args, **kwargs))
  model = pdopt.load_pretrained("tiny-code")
  # One token bucket, one sequence bucket and one page bucket: one compiled step.
  config = pdopt.EngineConfig(page_size=16, num_pages=24, max_num_batched_tokens=32, max_num_seqs=4, chunk_size=20,
                              max_model_len=96, token_buckets=(32,), seq_buckets=(4,), page_buckets=(8,),
                              kv_cache_dtype=kv_cache_dtype)
  params = pdopt.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
  reference = pdopt.Engine(model, dataclasses.replace(config, attention_backend="reference"))
  want = [o.token_ids for o in reference.generate(_PROMPTS, params)]
  with api.tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
    engine = pdopt.Engine(model, dataclasses.replace(config, attention_backend="pallas"))
    got = [o.token_ids for o in engine.generate(_PROMPTS, params)]
  assert got == want
  assert len(traced) == model.config.num_layers  # one compiled step, every layer through the kernel
  engine.check_no_leaks()
