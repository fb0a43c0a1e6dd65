"""The deployment search on this machine's scale, to check it against real runs on 2 CPU cores:

  python -m experiments.search --config=configs/search_cpu.py
  python -m experiments.run --config=results/search_cpu/best_config.py
  python -m experiments.run --config=results/search_cpu/median_config.py

Each config runs at the rate the search scored it. The search's score is the highest rate that meets the
target, so the real counterpart is a sweep: `--config.rates=5.2,5.7,6.17,6.8` (and the same with
`--config.backend=sim`) gives the attainment at each rate, real and simulated (BENCHMARKS.md, "Deployment
search").

`tiny-code` with the shipped CPU step-cost file (`pdopt/step_costs/tiny-code_cpu.json`, profiled at these
shape buckets), a budget of 2 "GPUs" (CPU cores, one instance process each): 1 or 2 colocated replicas or 1
prefill + 1 decode instance, `chunked` or `prefill_first`, 64- or 128-token step budgets (12 candidates). KV
transfers at the CPU loopback bandwidth measured by `experiments.bench_transfer` (0.78 GB/s, ~8 ms per pull).
The workload is the quickstart's (the first 50 requests of the Azure conversation trace, prompts capped at 384
tokens, outputs at 48); the SLO the quickstart's, for 90% of requests.
"""

from pdopt.benchmark.deployment_search import default_search_config


def get_config():
  c = default_search_config()
  c.run_name = "search_cpu"
  c.model = "tiny-code"
  c.dtype = "float32"
  c.slo = "ttft:2000 tpot:150"
  c.attainment = 0.9
  c.gpus = 2
  c.device = "cpu"
  c.cost_model = "pdopt/step_costs/tiny-code_cpu_1core.json"
  c.transfer_gbps = 0.78
  c.transfer_latency_us = 8000.0
  c.workload.num_requests = 50
  c.workload.max_prompt_len = 384
  c.workload.max_output_len = 48
  c.space.policies = ("chunked", "prefill_first")
  c.space.token_budgets = (64, 128)
  c.space.chunk_sizes = (64,)
  c.space.max_num_seqs = (32,)
  c.space.replicas = (1, 2)
  c.space.splits = ((1, 1),)
  c.space.tps = (1,)
  c.rate_range = (0.25, 64.0)
  c.engine.num_pages = 512
  c.engine.max_model_len = 512
  c.engine.attention_backend = "reference"
  c.engine.token_buckets = (32, 64, 128)
  c.engine.seq_buckets = (32,)
  c.engine.page_buckets = (32,)
  c.workers = 1
  return c
