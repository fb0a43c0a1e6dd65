"""The simulator against the real engine on one GPU: `python -m experiments.validate_sim --config=configs/validate_gpu.py`.

The first 400 requests of the Azure conversation trace, time-scaled to a rate the engine keeps up with
(15 req/s) and to one it cannot (60 req/s), under `chunked`, `prefill_first` and `slo_aware`, on the
Llama-3.2-1B shape (random bf16 weights), run for real and in the simulator with the step-cost model
profiled at the same shape buckets:

  python -m experiments.profile_steps --model=llama-3.2-1b --out=COST.json \
      --token_buckets=64,256,1024,2048 --seq_buckets=16,64,128 --page_buckets=64,256
  python -m experiments.validate_sim --config=configs/validate_gpu.py --config.cost_model=COST.json

Fields not set here keep the defaults documented in `pdopt/benchmark/config.py`.
"""

from pdopt.benchmark import default_config


def get_config():
  config = default_config()
  config.run_name = "validate_gpu"
  config.model = "llama-3.2-1b"
  config.dtype = "bfloat16"
  config.policies = "chunked,prefill_first,slo_aware"
  config.rates = "15,60"
  config.slo = "ttft:2000 tpot:100"
  config.progress = False
  config.compilation_cache_dir = "results/.jax_cache"

  w = config.workload
  w.kind = "azure"
  w.name = "azure_conv"
  w.num_requests = 400
  w.seed = 0

  e = config.engine
  e.page_size = 16
  e.num_pages = 8192
  e.max_model_len = 4096
  e.max_num_batched_tokens = 2048
  e.chunk_size = 512
  e.max_num_seqs = 128
  e.token_buckets = (64, 256, 1024, 2048)
  e.seq_buckets = (16, 64, 128)
  e.page_buckets = (64, 256)
  return config
