"""Benchmarks: serving experiments (a workload replayed against each policy, on the devices or in the
simulator), and the measurements behind BENCHMARKS.md.

Serving experiments: `config` (the experiment's fields), `experiment` (`run_experiment`), `replay`,
`deployments` (several instances), `validation` (the simulator against real runs), `profile_steps` (the
step-cost model's profile and fit). Measurements: `prefill_attention` and `decode_attention` (the kernels
against their peers), `engine_speed` (the engine against its roofline and `transformers`),
`speculation_speed` (speculative decoding), `timing` (shared timers).

```python
from pdopt import benchmark
out = benchmark.run_experiment({"run_name": "demo", "policies": "chunked,prefill_first",
                                "workload": {"kind": "synthetic", "num_requests": 20, "rate": 4.0}})
out["metrics"]["chunked"]["p99_itl_ms"]   # with config "rates": "2,4", out["metrics"]["chunked@4"]
```

or, piece by piece (what `notebooks/policy_comparison.ipynb` does):

```python
config = benchmark.default_config(); config.workload.num_requests = 20
model = benchmark.build_model(config)
workload = benchmark.build_workload(config, model)
run = benchmark.run_policy(model, workload, benchmark.engine_config(config, "chunked"), slo=config.slo)
```
"""

from pdopt.benchmark.config import (ConfigError, as_config, default_config, engine_config, parse_policies,
                                    parse_rates, workload_config)
from pdopt.benchmark.experiment import (ENGINE_STATS_KEYS, PolicyRun, build_model, build_workload, compare,
                                        enable_compilation_cache, rate_key, run_experiment, run_policy,
                                        serve_remote_instances, validate_config)
from pdopt.benchmark.replay import ReplayResult, replay, sampling_params
from pdopt.sim.clock import VirtualClock

__all__ = [
    "ConfigError", "ENGINE_STATS_KEYS", "PolicyRun", "ReplayResult", "VirtualClock", "as_config", "build_model",
    "build_workload", "compare", "default_config", "enable_compilation_cache", "engine_config", "parse_policies",
    "parse_rates", "rate_key", "replay", "run_experiment", "run_policy", "sampling_params", "serve_remote_instances",
    "validate_config", "workload_config",
]
