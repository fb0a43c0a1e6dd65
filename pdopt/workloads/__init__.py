"""Workloads: trace loaders, arrival processes, length clamping and prompt materialization.

```python
from pdopt import workloads
w = workloads.make_workload(workloads.WorkloadConfig(kind="azure", num_requests=200, rate=4.0),
                            max_model_len=2048, vocab_size=32000)
for r in w.requests: ...  # r.arrival_time (s), r.prompt_token_ids, r.max_tokens
```
"""

from pdopt.workloads.arrivals import ARRIVAL_PROCESSES, ArrivalProcess, arrival_times, scale_to_rate
from pdopt.workloads.build import make_workload
from pdopt.workloads.config import ARRIVALS, WORKLOAD_KINDS, Arrival, WorkloadConfig, WorkloadKind
from pdopt.workloads.lengths import LENGTH_DISTRIBUTIONS, LengthDistribution, clamp_lengths, synthetic_lengths
from pdopt.workloads.prompts import TokenIds, materialize_prompts
from pdopt.workloads.request import PRIORITY_CLASSES, Workload, WorkloadRequest, mean_rate
from pdopt.workloads.traces import (ARXIV_LENGTHS_TRACE, AZURE_CONV_TRACE, DEFAULT_TRACE_DIR, Trace,
                                    load_azure_trace, load_lengths_trace, resolve_trace_path)

__all__ = [
    "ARRIVAL_PROCESSES", "ARRIVALS", "ARXIV_LENGTHS_TRACE", "AZURE_CONV_TRACE", "Arrival", "ArrivalProcess",
    "DEFAULT_TRACE_DIR", "LENGTH_DISTRIBUTIONS", "LengthDistribution", "PRIORITY_CLASSES", "TokenIds", "Trace",
    "WORKLOAD_KINDS", "Workload",
    "WorkloadConfig", "WorkloadKind", "WorkloadRequest", "arrival_times", "clamp_lengths", "load_azure_trace",
    "load_lengths_trace", "make_workload", "materialize_prompts", "mean_rate", "resolve_trace_path",
    "scale_to_rate", "synthetic_lengths",
]
