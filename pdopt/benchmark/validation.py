"""The simulator against the real engine: one experiment run both ways, and the error of each metric.

`python -m experiments.validate_sim --config=configs/X.py` runs `validate`: the config's experiment on the
devices (`backend="real"`), then in the simulator (`backend="sim"`, with the config's `cost_model` or the
shipped file of this model shape on this machine's device), and prints, per policy, the relative error of
the simulated median and P90 TTFT, TPOT and end-to-end latency and of the throughput against the real run.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections

from pdopt.benchmark import config as config_lib
from pdopt.benchmark import experiment

# The metrics compared, under their metrics.json names.
COMPARED: tuple[str, ...] = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "median_e2el_ms",
                             "p90_e2el_ms", "request_throughput", "output_throughput")


def errors(real: Mapping[str, float], simulated: Mapping[str, float]) -> dict[str, float]:
  """Relative error (simulated - real) / real of each `COMPARED` metric of two metrics.json entries (0 where
  both are 0)."""
  out = {}
  for key in COMPARED:
    r, s = float(real[key]), float(simulated[key])
    out[key] = 0.0 if r == s else (s - r) / r if r else float("inf")
  return out


def validate(config: ml_collections.ConfigDict | Mapping[str, Any],
             print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Runs `config` for real and simulated; returns {"real": metrics, "sim": metrics, "errors": {policy:
  {metric: relative error}}} (with a rate sweep, policies are keyed "policy@rate"), and prints the table."""
  config = config_lib.as_config(config)
  runs = {}
  for backend in ("real", "sim"):
    c = ml_collections.ConfigDict(config.to_dict())
    c.backend = backend
    c.run_name = f"{config.run_name}-{backend}"
    runs[backend] = experiment.run_experiment(c, print_fn=None)["metrics"]
  flat = {b: _flatten(m) for b, m in runs.items()}
  errs = {key: errors(flat["real"][key], flat["sim"][key]) for key in flat["real"]}
  if print_fn is not None:
    print_fn(format_errors(errs, flat["sim"][next(iter(flat["sim"]))].get("step_cost", "")))
  return {"real": runs["real"], "sim": runs["sim"], "errors": errs}


def _flatten(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
  """{policy: entry} or, with a sweep, {policy: {rate: entry}} as {"policy" or "policy@rate": entry}."""
  out = {}
  for policy, value in metrics.items():
    if "request_throughput" in value:
      out[policy] = value
    else:
      out.update({f"{policy}@{rate}": entry for rate, entry in value.items()})
  return out


def format_errors(errs: Mapping[str, Mapping[str, float]], cost_source: str = "") -> str:
  """A Markdown table: one row per policy, the signed relative error (%) of each compared metric."""
  lines = [f"simulated vs real (cost model: {cost_source or 'n/a'}), relative error in %",
           "| policy | " + " | ".join(COMPARED) + " |", "|---|" + "---:|" * len(COMPARED)]
  for policy, e in errs.items():
    lines.append(f"| {policy} | " + " | ".join(f"{100 * e[k]:+.1f}" for k in COMPARED) + " |")
  return "\n".join(lines)
