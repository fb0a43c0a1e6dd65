# python experiments/probes/step_errors.py TRACE.json COST.json
"""The cost model's error on serving steps, by what a step ran and what the step before it ran: each step of a
`step_trace.py` file (its time until the next step started, host work included) against the prediction of
COST.json at its padded shape, grouped by its kind and its predecessor's (D decode-only, P prompts only, M
mixed, - no work). A group priced well alone but badly after another kind points at a cost the model has no
term for (a decode step after long prompt steps, say). Steps that compiled are left out."""
import collections
import json
import statistics
import sys

from pdopt.scheduling.step_cost import StepCostModel


def kind(row: dict) -> str:
  decodes = row["decode"]
  if not decodes:
    return "-"  # A step with no work.
  return "D" if all(decodes) else ("P" if not any(decodes) else "M")


def main(trace_path: str, cost_path: str, page_size: int = 16) -> None:
  cost = StepCostModel.load(cost_path)
  for run in json.load(open(trace_path, encoding="utf-8")):
    groups = collections.defaultdict(list)
    previous, real_total, predicted_total = None, 0.0, 0.0
    for row in run["steps"]:
      if not row["compiled"]:
        tokens, seqs, pages = row["padded"]
        predicted = cost.seconds(row["q"], row["kv"], tokens, seqs, pages * page_size, row["waiting"])
        groups[(kind(row), previous)].append((row["to_next_s"], row["execute_s"], predicted, len(row["q"])))
        real_total += row["to_next_s"]
        predicted_total += predicted
      previous = kind(row)
    if not groups:
      print(f"{run['policy']} @ {run['rate']:g}: no step ran without compiling")
      continue
    print(f"{run['policy']} @ {run['rate']:g}: {len(run['steps'])} steps, {real_total:.2f} s real, "
          f"predicted / real {predicted_total / real_total:.3f}")
    for (this, before), steps in sorted(groups.items(), key=lambda g: -sum(s[0] for s in g[1])):
      real, predicted = sum(s[0] for s in steps), sum(s[2] for s in steps)
      print(f"  {this} after {before}: {len(steps):5d} steps, {real:7.3f} s real (median "
            f"{1e3 * statistics.median(s[0] for s in steps):.2f} ms, executor "
            f"{1e3 * statistics.median(s[1] for s in steps):.2f} ms), predicted / real {predicted / real:.3f}, "
            f"median {statistics.median(s[3] for s in steps):g} sequences")


if __name__ == "__main__":
  main(*sys.argv[1:3], *map(int, sys.argv[3:4]))
