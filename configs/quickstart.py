"""Quickstart (the README's main job): four policies on a slice of the Azure conversation trace, on CPU.

  python -m experiments.run --config=configs/quickstart.py

The model that ships with pdopt, `tiny-code` (5.3M parameters, byte-level, trained on Python source by
`experiments/train_tiny.py`), serves the first requests of the Azure LLM inference trace (2023,
conversation) with their real arrival pattern scaled to a rate that keeps the engine loaded, so that the
policies differ. Everything is sized to finish in under three
minutes on two CPU cores, JAX compilation included:

  workload        Azure conversation trace, rows [0, 50) (about 12 s of arrivals at 4 req/s), timestamps
                  scaled to `rate`; prompts capped at 384 tokens (these rows' median is about 390) and outputs
                  at 48, so most of the work is prompt, as in the trace.
  rate            4 req/s, well above what the engine sustains on two CPU cores (about 2.3 req/s on an
                  EPYC core pair): queues build up, and how a policy mixes prefill and decode decides the
                  latencies.
  engine          a 128-token step budget with 64-token chunks for `chunked`, 32 sequences, a 512-token
                  context (32 pages of 16 tokens per sequence, 512 pages in the pool). On CPU the reference
                  attention costs about (padded tokens) x (context) per step, so the token buckets (32, 64,
                  128) are fine enough that a small step is cheaper than a full one; one sequence bucket and one
                  page bucket: three compiled shapes.
  slo             TTFT 2 s, TPOT 150 ms; also the targets of `slo_aware`.
  compilation_cache_dir  the four engines compile the same shapes once; later runs start warm.

Fields not set here keep the defaults documented in `pdopt/benchmark/config.py`.
"""

from pdopt.benchmark import default_config


def get_config():
  config = default_config()
  config.run_name = "quickstart"
  config.model = "tiny-code"
  config.policies = "chunked,prefill_first,decode_first,slo_aware"
  config.rate = 4.0
  config.slo = "ttft:2000 tpot:150"
  config.compilation_cache_dir = "results/.jax_cache"

  w = config.workload
  w.kind = "azure"
  w.name = "azure_conv"
  w.start = 0
  w.num_requests = 50
  w.max_prompt_len = 384
  w.max_output_len = 48
  w.seed = 0

  e = config.engine
  e.page_size = 16
  e.num_pages = 512
  e.max_model_len = 512
  e.max_num_batched_tokens = 128
  e.chunk_size = 64
  e.max_num_seqs = 32
  e.attention_backend = "reference"
  e.token_buckets = (32, 64, 128)
  e.seq_buckets = (32,)
  e.page_buckets = (32,)
  return config
