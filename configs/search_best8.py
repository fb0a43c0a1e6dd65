"""The README's table: the best deployment on 8 H100s for each shipped workload and two SLOs, in the simulator.

  python -m experiments.search --config=configs/search_best8.py:azure,loose   # or azure,tight / arxiv,loose / ...

`configs/search_azure.py` with its space reduced to the choices that decide the deployment (colocated
replicas or P:D splits, tensor-parallel degree 1 or 2, `chunked` or `prefill_first`) at a vLLM-like engine
(2048-token budget, 512-token chunks, 128 sequences): 38 candidates. Workloads: the Azure conversation trace
(its own arrival pattern scaled) or the arXiv length trace (Poisson arrivals, outputs capped at 512 tokens),
each rate held for at least 10 s, rates 2.7% apart (8 bisection steps over the range, not 6: at 11% apart many
candidates tie). SLOs, for 90% of requests: loose TTFT 2 s and TPOT 100 ms, tight TTFT 500 ms and TPOT 50 ms.
"""

from configs import search_azure

SLOS = {"loose": "ttft:2000 tpot:100", "tight": "ttft:500 tpot:50"}


def get_config(arg: str = "azure,loose"):
  workload, slo = arg.split(",")
  if workload not in ("azure", "arxiv") or slo not in SLOS:
    raise ValueError(f"configs/search_best8.py:{arg}; valid: azure|arxiv,loose|tight")
  c = search_azure.get_config()
  c.run_name = f"best8_{workload}_{slo}"
  c.slo = SLOS[slo]
  c.space.policies = ("chunked", "prefill_first")
  c.space.token_budgets = (2048,)
  c.space.chunk_sizes = (512,)
  c.space.max_num_seqs = (128,)
  c.iterations = 8
  if workload == "arxiv":
    c.workload.kind, c.workload.name, c.workload.arrival, c.workload.max_output_len = "lengths", "arxiv", "poisson", 512
  return c
