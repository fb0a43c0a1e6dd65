"""The engine on a GPU (Pallas attention kernels) against the CPU reference path, token for token."""

from __future__ import annotations

import json

import pytest

# Runs in a fresh interpreter on PLATFORM; prints the greedy outputs as JSON. Prompts are slices of this
# repository's own source (real code, so the shipped model's predictions are confident), of lengths 1 to
# 300 so that steps mix decodes with prompt chunks of several sizes.
_GENERATE = """
import os
os.environ["JAX_PLATFORMS"] = "{platform}"
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
import json, pathlib
import jax
import pdopt
import pdopt.engine.speculative
assert jax.default_backend() == "{platform}".replace("cuda", "gpu"), jax.default_backend()
model = pdopt.load_pretrained("tiny-code", dtype="float32")
tok = pdopt.models.pretrained.tokenizer("tiny-code")
text = pathlib.Path("pdopt/engine/engine.py").read_bytes()
lengths = [1, 7, 16, 17, 40, 64, 99, 128, 200, 300, 33, 250]
prompts = [tok.encode(text[997 * i:997 * i + n]) for i, n in enumerate(lengths)]
config = pdopt.EngineConfig(policy="chunked", page_size=16, num_pages=256, max_num_batched_tokens=96,
                            chunk_size=48, max_num_seqs=8, attention_backend="{backend}", {extra})
draft = pdopt.load_pretrained("tiny-code-draft", dtype="float32") if config.speculative else None
engine = pdopt.Engine(model, config, draft_model=draft)
outs = engine.generate(prompts, pdopt.SamplingParams(max_tokens=48, ignore_eos=True))
engine.check_no_leaks()
print(json.dumps([list(o.token_ids) for o in outs]))
"""


@pytest.mark.gpu
def test_gpu_greedy_matches_cpu_reference(run_child):
  def generate(platform, backend, extra=""):
    out = run_child(_GENERATE.format(platform=platform, backend=backend, extra=extra), timeout=900)
    return json.loads(out.splitlines()[-1])
  cpu = generate("cpu", "reference")
  # Synchronous steps; overlapped blocks of 4 decode steps (decode-only programs on the GPU kernels); and a
  # draft model guessing 4 tokens (its one-token forwards are decode-only too), verified by the target.
  for extra in ("", "async_decode=True, num_scheduler_steps=4",
                "speculative=pdopt.engine.speculative.SpeculativeConfig(method='draft', num_speculative_tokens=4)"):
    gpu = generate("cuda", "pallas", extra)
    assert len(gpu) == len(cpu) == 12
    for i, (g, c) in enumerate(zip(gpu, cpu)):
      assert g == c, f"{extra or 'sync'}: prompt {i}: GPU {g} != CPU {c}"
