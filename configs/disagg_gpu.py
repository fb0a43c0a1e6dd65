"""Disaggregated prefill/decode against colocated replicas on 2 GPUs, on long arXiv prompts.

  python -m experiments.run --config=configs/disagg_gpu.py [--config.rate=16]

Each instance is its own process on its own GPU (`pdopt.deploy`): 1 prefill + 1 decode instance (KV pages
moved GPU to GPU after each prefill, `jax.experimental.transfer`) against 2 `chunked` replicas behind a
least-loaded router, both on the same 2 GPUs, and one `chunked` engine process on one GPU for reference
(`colocated:1`). On 4 GPUs: `--config.devices=4 --config.deployments=colocated:1,colocated:4,
disaggregated:1:3,disaggregated:2:2`.

  model, dtype    "llama-3.2-1b" in bfloat16 (random weights unless `hf_dir` is set).
  workload        300 prompts of the arXiv summarization length trace (median about 2,700 tokens), outputs
                  capped at 256 tokens, Poisson arrivals at `rate`.
  rate            12 req/s (about 33,000 prompt tokens/s offered), enough to load two instances.
  slo             tight: TTFT 1.5 s, TPOT 40 ms.
  engine          2048-token step budget, 512-token chunks, 64 sequences per instance, 8192 pages of 16
                  tokens per instance; few shape buckets, since every instance compiles its own.
"""

from pdopt.benchmark.config import default_config


def get_config():
  c = default_config()
  c.run_name = "disagg_gpu"
  c.model = "llama-3.2-1b"
  c.dtype = "bfloat16"
  c.policies = ""
  c.deployments = "colocated:1,disaggregated:1:1,colocated:2"
  c.devices = 2
  c.rate = 12.0
  c.slo = "ttft:1500 tpot:40"
  c.max_duration = 150.0
  c.progress = False
  c.compilation_cache_dir = "results/.jax_cache"
  w = c.workload
  w.kind = "lengths"
  w.name = "arxiv"
  w.arrival = "poisson"
  w.num_requests = 300
  w.max_output_len = 256
  w.seed = 0
  e = c.engine
  e.page_size = 16
  e.num_pages = 8192
  e.max_model_len = 4096
  e.max_num_batched_tokens = 2048
  e.chunk_size = 512
  e.max_num_seqs = 64
  e.token_buckets = (64, 512, 2048)
  e.seq_buckets = (16, 64)
  e.page_buckets = (64, 256)
  return c
