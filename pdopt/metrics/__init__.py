"""Serving metrics under vLLM's `benchmark_serving` names, goodput under an SLO, reports and plots.

```python
from pdopt import metrics
m = metrics.compute_metrics(records, slo="ttft:2000 tpot:100")   # records: list[metrics.RequestRecord]
print(metrics.format_benchmark_result(m, policy="chunked"))
json.dump(metrics.metrics_to_dict(m), f)
```
"""

from pdopt.metrics.latency import RequestLatency, request_latency
from pdopt.metrics.plots import (CDF_METRICS, CdfMetric, cdf_population, latency_values_ms, plot_goodput_vs_rate,
                                 plot_latency_cdf, plot_latency_cdfs)
from pdopt.metrics.records import RECORD_STATUSES, RequestRecord, RecordStatus
from pdopt.metrics.report import (DEFAULT_COLUMNS, REQUEST_COLUMNS, RUN_COLUMNS, format_benchmark_result,
                                  format_comparison_table, request_rows, write_requests_csv)
from pdopt.metrics.serving import (LATENCY_METRICS, STATISTICS, ServingMetrics, compute_metrics, latency_stats,
                                   metrics_from_dict, metrics_to_dict, run_duration)
from pdopt.metrics.slo import SLO_METRICS, Slo, SloMetric, parse_slo

__all__ = [
    "CDF_METRICS", "CdfMetric", "DEFAULT_COLUMNS", "LATENCY_METRICS", "RECORD_STATUSES", "REQUEST_COLUMNS",
    "RUN_COLUMNS", "RecordStatus", "RequestLatency", "RequestRecord", "SLO_METRICS", "STATISTICS", "ServingMetrics",
    "Slo", "SloMetric", "cdf_population", "compute_metrics", "format_benchmark_result", "format_comparison_table",
    "latency_stats", "latency_values_ms", "metrics_from_dict", "metrics_to_dict", "parse_slo",
    "plot_goodput_vs_rate", "plot_latency_cdf", "plot_latency_cdfs", "request_latency", "request_rows",
    "run_duration", "write_requests_csv",
]
