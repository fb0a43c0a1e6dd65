"""The deployment search on one GPU, to check its ranking against real runs on the same card:

  python -m experiments.search --config=configs/search_gpu1.py
  python -m experiments.run --config=results/search_gpu1/best_config.py
  python -m experiments.run --config=results/search_gpu1/median_config.py

The Llama-3.2-1B shape (random bf16 weights) on one NVIDIA H100 with the shipped step-cost file (profiled at these
shape buckets; `--config.device` and `--config.cost_model` name another card's, as
`experiments/probes/sim_gpu_all.sh` does with a profile of the card at hand), the Azure conversation trace's
arrival pattern scaled to each rate, TTFT 500 ms and TPOT 50 ms for 90% of requests. One engine, its knobs
searched: `chunked`, `prefill_first` or `decode_first`, token budgets 256 to 2048, chunks 256 or 512, 32 or 128
sequences (42 candidates). The best and median configs serve the requests their rate was judged on.
"""

from pdopt.benchmark.deployment_search import default_search_config


def get_config():
  c = default_search_config()
  c.run_name = "search_gpu1"
  c.slo = "ttft:500 tpot:50"
  c.gpus = 1
  c.device = "NVIDIA H100 80GB HBM3"
  c.space.policies = ("chunked", "prefill_first", "decode_first")
  c.space.token_budgets = (256, 512, 1024, 2048)
  c.space.chunk_sizes = (256, 512)
  c.space.max_num_seqs = (32, 128)
  c.space.replicas = (1,)
  c.space.splits = ()
  c.space.tps = (1,)
  c.engine.token_buckets = (64, 256, 1024, 2048)
  c.engine.seq_buckets = (16, 64, 128)
  c.engine.page_buckets = (64, 256)
  return c
