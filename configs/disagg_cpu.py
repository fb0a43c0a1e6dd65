"""Disaggregated prefill/decode against colocated replicas on a 2-core CPU, one process per instance.

  python -m experiments.run --config=configs/disagg_cpu.py

Each instance is its own process on its own core (`pdopt.deploy`): one `chunked` engine process
(`colocated:1`, the reference), 2 `chunked` replicas behind a least-loaded router (`colocated:2`), and 1
prefill + 1 decode instance with the KV pages of each prefilled request pulled from one process to the other
(`disaggregated:1:1`, `jax.experimental.transfer`), on a short arXiv-length workload (long prompts, where
prefill dominates), offered faster than one engine process serves it.

  model           the `tiny` preset (random weights), float32.
  workload        48 prompts of the arXiv length trace capped at 384 tokens, outputs at 32, Poisson arrivals.
  rate            6 req/s, above what one engine process on one core serves.
  engine          a 128-token step budget with 64-token chunks, 16 sequences, 160 pages of 16 tokens.
"""

from pdopt.benchmark.config import default_config


def get_config():
  c = default_config()
  c.run_name = "disagg_cpu"
  c.policies = ""
  c.deployments = "colocated:1,colocated:2,disaggregated:1:1"
  c.devices = 2
  c.rate = 6.0
  c.slo = "ttft:3000 tpot:150"
  c.progress = False
  c.workload.kind = "lengths"
  c.workload.num_requests = 48
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
