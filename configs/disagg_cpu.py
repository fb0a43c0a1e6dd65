"""Disaggregated prefill/decode against colocated replicas, on 2 virtual CPU devices (a smoke-size run).

  python -m experiments.run --config=configs/disagg_cpu.py

1 prefill + 1 decode instance against 2 `chunked` replicas behind a least-loaded router, and the single
`chunked` engine for reference, on a short arXiv-length workload (long prompts, where prefill dominates).
"""

from pdopt.benchmark.config import default_config


def get_config():
  c = default_config()
  c.run_name = "disagg_cpu"
  c.policies = "chunked"
  c.deployments = "disaggregated:1:1,colocated:2"
  c.host_devices = 2
  c.devices = 2
  c.rate = 3.0
  c.slo = "ttft:3000 tpot:150"
  c.compilation_cache_dir = "results/.jax_cache"
  c.workload.kind = "lengths"
  c.workload.num_requests = 24
  c.workload.max_prompt_len = 384
  c.workload.max_output_len = 32
  c.workload.low_token_id = 2
  c.engine.num_pages = 160
  c.engine.max_num_batched_tokens = 128
  c.engine.max_num_seqs = 16
  c.engine.chunk_size = 64
  c.engine.max_model_len = 512
  c.engine.token_buckets = (16, 128)
  c.engine.seq_buckets = (16,)
  c.engine.page_buckets = (8, 32)
  return c
