# python experiments/probes/sim_instructions.py LABEL RATE NUM_REQUESTS [--setup-only]
"""One simulation of a `configs/search_azure.py` candidate (its label, as the search prints it) at one rate,
on the first NUM_REQUESTS requests of that rate's window: the unit of the search's work. Run it under
`valgrind --tool=cachegrind --cache-sim=no` (`sim_instructions.sh`) to count its instructions, which, unlike
its time on a shared machine, do not vary from run to run; `--setup-only` stops before the simulation, for
the count to subtract."""
import sys

from pdopt.benchmark import deployment_search
from pdopt.sim import search
from pdopt.sim.deployment import simulate_deployment
from pdopt.workloads import Workload

import configs.search_azure

label, rate, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
config = configs.search_azure.get_config()
problem = deployment_search.problem(config)
candidate = {c.label: c for c in deployment_search.space(config).candidates()}[label]
deployment, cost = search.deployment_of(problem, candidate)
window = search.at_rate(problem, rate)
workload = Workload(name=window.name, requests=window.requests[:n], num_clamped=0, mean_rate=rate)
if "--setup-only" not in sys.argv:
  result = simulate_deployment(deployment, problem.model, lambda role: cost, problem.transfer, workload)
  print(f"{label} at {rate:g} req/s: {len(result.records)} requests, {result.num_steps} steps")
