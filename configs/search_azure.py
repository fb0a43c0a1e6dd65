"""The deployment with the most goodput per GPU for the Azure conversation trace on H100s, in the simulator.

  python -m experiments.search --config=configs/search_azure.py

The Llama-3.2-1B shape served on up to 8 H100s (the shipped step-cost file, profiled on one H100, scaled to
tensor-parallel degree 2 with the all-reduce bandwidth measured on the lent 2-GPU H100 machine), the Azure LLM
inference trace (2023, conversation) with its arrival pattern scaled to each rate the bisection tries, each
rate held for at least 10 s (at least 250 requests, at most the trace's first 4000), TTFT 2 s and TPOT 100 ms
for 90% of the requests. The space: `chunked` and `prefill_first`,
token budgets 512 and 2048, chunks 256 and 512, 64 or 128 sequences, 1-8 replicas or 1P1D-4P4D splits,
TP 1 and 2 (304 candidates). Fields: `pdopt/benchmark/deployment_search.py`.
"""

from pdopt.benchmark.deployment_search import default_search_config


def get_config():
  c = default_search_config()
  c.run_name = "search_azure"
  return c
