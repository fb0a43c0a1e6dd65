"""Fairness and priorities on the Azure conversation trace, in the simulator:
`python -m experiments.run --config=configs/fairness_azure.py`.

The first 1000 requests of the trace, time-scaled to 15, 25 and 35 req/s, on the Llama-3.2-1B shape with the
H100 step-cost model its results in BENCHMARKS.md were made with (profiled on 2026-12-06,
`docs/benchmarks/step_costs_llama-3.2-1b_h100_2026-12-06.json`;
`--config.cost_model=pdopt/step_costs/llama-3.2-1b_h100.json` takes the one shipped now, whose engine runs this
load faster), in two priority classes: every prompt
of 3000 tokens or more, and a fifth of the others at random, is a batch request (judged by its end-to-end
latency, 60 s); the rest are interactive (TTFT 1 s, TPOT 50 ms). Requests come from 8 clients, client k
sending in proportion to 1 / (k + 1). A pool of 2048 pages (32k tokens) for up to 128 sequences makes the
engine preempt under load; each policy runs with recompute and with swap preemption.

The question: which policy gives interactive requests their SLO while batch requests still progress. Every
report splits its metrics by class; metrics.json adds slowdowns, Jain's index and decode stall times
(`docs/results.md`). Fields not set here keep the defaults documented in `pdopt/benchmark/config.py`; the
same experiment on the GPU is `--config.backend=real --config.cost_model=''` there.
"""

from pdopt.benchmark import default_config


def get_config():
  config = default_config()
  config.run_name = "fairness_azure"
  config.model = "llama-3.2-1b"
  config.dtype = "bfloat16"
  config.backend = "sim"
  config.cost_model = "docs/benchmarks/step_costs_llama-3.2-1b_h100_2026-12-06.json"
  config.policies = ("chunked+recompute,chunked+swap,prefill_first+recompute,prefill_first+swap,"
                     "slo_aware+recompute,slo_aware+swap,fair+recompute,fair+swap")
  config.rates = "15,25,35"
  config.slo = "ttft:1000 tpot:50"
  config.batch_slo = "e2el:60000"
  config.progress = False

  w = config.workload
  w.kind = "azure"
  w.name = "azure_conv"
  w.num_requests = 1000
  w.seed = 0
  w.batch_fraction = 0.2
  w.batch_min_prompt_len = 3000
  w.num_clients = 8
  w.client_skew = 1.0

  e = config.engine
  e.page_size = 16
  e.num_pages = 2048
  e.max_model_len = 4096
  e.max_num_batched_tokens = 2048
  e.chunk_size = 512
  e.max_num_seqs = 128
  e.token_buckets = (64, 256, 1024, 2048)
  e.seq_buckets = (16, 64, 128)
  e.page_buckets = (64, 256)
  return config
