"""The whole Azure conversation trace, time-scaled, against the four policies on one GPU.

  python -m experiments.run --config=configs/azure_conv.py [--config.rate=30] [--config.rates=10,20,30]

The Azure LLM inference trace (2023, conversation: 19,366 requests over about an hour, median prompt about
1,000 tokens, median output about 130) replayed with its own arrival pattern compressed to `rate` requests/s,
on a 1B-parameter Llama-3.2 shape (random bf16 weights unless `hf_dir` names a checkpoint). At 20 req/s a
policy's replay takes about 16 minutes; a sweep (`rates`) multiplies that by the number of rates.

  model, dtype    "llama-3.2-1b" in bfloat16; set `hf_dir` to serve real weights (same shapes, same costs).
  workload        the whole trace (`num_requests` None), prompts and outputs clamped to 4096 tokens together.
  rate            20 req/s, about 3.6x the trace's own mean rate (5.5 req/s).
  engine          vLLM-like: 2048-token step budget, 512-token chunks for `chunked`, 128 sequences, 8192 pages
                  of 16 tokens (131k tokens of KV, about 4 GiB for this model), the Pallas attention kernels.
  slo             TTFT 2 s, TPOT 100 ms (also the targets of `slo_aware`).
  max_duration    a replay is cut (and what is left aborted, counted as failed) after 40 minutes.

Fields not set here keep the defaults documented in `pdopt/benchmark/config.py`.
"""

from pdopt.benchmark import default_config


def get_config():
  config = default_config()
  config.run_name = "azure_conv"
  config.model = "llama-3.2-1b"
  config.dtype = "bfloat16"
  config.policies = "chunked,prefill_first,decode_first,slo_aware"
  config.rate = 20.0
  config.slo = "ttft:2000 tpot:100"
  config.max_duration = 2400.0
  config.compilation_cache_dir = "results/.jax_cache"

  w = config.workload
  w.kind = "azure"
  w.name = "azure_conv"
  w.seed = 0

  e = config.engine
  e.page_size = 16
  e.num_pages = 8192
  e.max_model_len = 4096
  e.max_num_batched_tokens = 2048
  e.chunk_size = 512
  e.max_num_seqs = 128
  e.attention_backend = "auto"
  return config
