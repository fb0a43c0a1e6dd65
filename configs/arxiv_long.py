"""Long prompts where prefill dominates: arXiv summarization lengths with Poisson arrivals, on one GPU.

  python -m experiments.run --config=configs/arxiv_long.py [--config.rate=2] [--config.rates=0.5,1,2,4]

Prompts of the arXiv summarization length trace (median about 2,700 tokens, p99 about 3,900) with their
summaries as outputs (median about 170 tokens), arriving as a Poisson process. Every prompt is larger than
`chunked`'s chunk and most are larger than the step budget, so the policies differ mainly in how they split
and order prefill work against the running decodes: `prefill_first` runs a long prompt alone over several
steps (decodes stall), `chunked` and `decode_first` interleave it with them.

  model, dtype    "llama-3.2-1b" in bfloat16 (random weights unless `hf_dir` is set).
  workload        the first 1,000 rows of the arXiv length trace, Poisson arrivals at `rate`, outputs capped
                  at 512 tokens, prompt + output clamped to 8192 tokens.
  rate            2 req/s (about 6,000 prompt tokens/s offered).
  engine          2048-token step budget, 512-token chunks for `chunked`, 64 sequences, 16384 pages of 16
                  tokens (262k tokens of KV), the Pallas attention kernels.
  slo             TTFT 5 s (long prompts take longer to read), TPOT 100 ms.

Fields not set here keep the defaults documented in `pdopt/benchmark/config.py`.
"""

from pdopt.benchmark import default_config


def get_config():
  config = default_config()
  config.run_name = "arxiv_long"
  config.model = "llama-3.2-1b"
  config.dtype = "bfloat16"
  config.policies = "chunked,prefill_first,decode_first,slo_aware"
  config.rate = 2.0
  config.slo = "ttft:5000 tpot:100"
  config.max_duration = 1800.0
  config.compilation_cache_dir = "results/.jax_cache"

  w = config.workload
  w.kind = "lengths"
  w.name = "arxiv"
  w.arrival = "poisson"
  w.num_requests = 1000
  w.max_output_len = 512
  w.seed = 0

  e = config.engine
  e.page_size = 16
  e.num_pages = 16384
  e.max_model_len = 8192
  e.max_num_batched_tokens = 2048
  e.chunk_size = 512
  e.max_num_seqs = 64
  e.attention_backend = "auto"
  return config
