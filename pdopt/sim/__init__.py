"""Simulated serving: the engine's own loop on a virtual clock, with a step-cost model instead of a model.

```python
from pdopt import sim
clock = sim.VirtualClock()
engine = sim.simulated_engine(pdopt.preset("llama-3.2-1b"), pdopt.EngineConfig(policy="chunked"), step_cost,
                              clock, arrivals=[r.arrival_time for r in workload])
result = pdopt.benchmark.replay(engine, workload)      # the same replay as on a device
```

Modules: `clock` (the virtual clock), `executor` (the simulated executor: steps take the cost model's
predicted time), `fit` (fitting the step-cost model of `pdopt.scheduling.step_cost` to profiled steps).
"""

from __future__ import annotations

from typing import Sequence

from pdopt.engine.config import EngineConfig
from pdopt.engine.engine import Engine
from pdopt.models.config import ModelConfig
from pdopt.scheduling.step_cost import StepCostModel
from pdopt.sim.clock import VirtualClock
from pdopt.sim.executor import SimExecutor, arrival_events, placeholder_token


def simulated_engine(model: ModelConfig, config: EngineConfig, step_cost: StepCostModel, clock: VirtualClock,
                     arrivals: Sequence[float] = (), chain: bool = True) -> Engine:
  """An `Engine` for `model`'s shape whose steps run on `clock` under `step_cost` (`SimExecutor`); the
  policy plans with the same `step_cost`.

  Args:
    model: the served model's config (no weights are needed).
    config: the engine, as for a device; its `attention_backend`, `speculative` and `async_decode` have no
      simulated counterpart and must be left at their defaults.
    step_cost: predicts step times.
    clock: the engine's clock.
    arrivals: when requests will be submitted, on `clock` (lets steady decoding run in blocks up to them).
    chain: see `SimExecutor`.

  Raises:
    ValueError: an engine setting the simulator does not model, named.
  """
  if config.speculative is not None or config.async_decode:
    raise ValueError("the simulator models the synchronous engine: EngineConfig.speculative and async_decode "
                     "must be off")
  token = placeholder_token(model.vocab_size, model.eos_token_id)
  return Engine(model, config, clock=clock, step_cost=step_cost,
                executor=lambda bm, buckets: SimExecutor(step_cost, clock, bm, buckets, token, arrival_events(arrivals),
                                                         chain))


__all__ = ["SimExecutor", "VirtualClock", "arrival_events", "placeholder_token", "simulated_engine"]
