"""Deployments of several engine instances, one OS process each: colocated replicas, or disaggregated prefill
and decode instances with KV pages moved device to device between processes.

```python
from pdopt import deploy
config = deploy.DeploymentConfig(mode="disaggregated", num_prefill=1, num_decode=1,
                                 engine=pdopt.EngineConfig(policy="chunked"))
with deploy.Deployment(config, ModelSource("tiny-code"), devices=[0, 1], platform="cpu") as d:
  d.add_request([1, 2, 3], pdopt.SamplingParams(max_tokens=8))
  while d.has_unfinished():
    d.poll(0.01)
  print(d.records(), d.outputs)
```

Modules: `config` (the deployment, validated and placed before any process starts), `router` (starts the
processes, routes, moves prefilled requests, handles faults), `instance` (the process of one instance),
`transfer` (KV pages between processes with `jax.experimental.transfer`).
"""

from pdopt.deploy.config import MODES, ROUTER_POLICIES, DeploymentConfig, host_of
from pdopt.deploy.router import Deployment, launch_host

__all__ = ["MODES", "ROUTER_POLICIES", "Deployment", "DeploymentConfig", "host_of", "launch_host"]
