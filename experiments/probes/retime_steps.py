# python experiments/probes/retime_steps.py CONFIG TRACE.json OUT.json [COST.json] [MAX_STEPS]
"""Times again, alone, the serving steps `step_trace.py` recorded: each step's sequences rebuilt at their
query and key lengths (fresh pages, random tokens) and run through the same executor, three times after an
untimed run. A step that takes while serving what it takes alone is priced by its composition, so a cost
model's error on it is the fit's; one that takes longer while serving is slowed by the serving around it."""
import json
import statistics
import sys
import time

import numpy as np

from pdopt.benchmark import config as config_lib
from pdopt.benchmark.profile_steps import _work
from pdopt.engine.engine import Engine
from pdopt.engine.executor import StepPlan
from pdopt.scheduling.step_cost import StepCostModel

import step_trace  # Beside this file.


def main(path: str, trace_path: str, out: str, cost_path: str = "", max_steps: str = "300") -> None:
  config, model = step_trace.load(path)
  cost = StepCostModel.load(cost_path) if cost_path else None
  rng = np.random.default_rng(0)
  result = []
  for run in json.load(open(trace_path, encoding="utf-8")):
    engine = Engine(model, config_lib.engine_config(config, run["policy"]))
    engine.warmup()
    executor, ps = engine.executor, engine.config.page_size
    steps = [s for s in run["steps"] if not s["compiled"]]
    stride = max(1, len(steps) // int(max_steps))
    rows = []
    for s in steps[::stride]:
      work = [_work(engine, f"r{i}", k - 1, k - 1, 1, True, rng) if d
              else _work(engine, f"r{i}", k, k - q, q, False, rng)
              for i, (q, k, d) in enumerate(zip(s["q"], s["kv"], s["decode"]))]
      plan = StepPlan(tuple(work), num_waiting=s["waiting"])
      times = []
      for i in range(4):
        start = time.perf_counter()
        outcome = executor.execute(plan)
        if outcome is None:  # A dispatched step: its time is until its outcome is back.
          executor.collect()
        if i:
          times.append(time.perf_counter() - start)
      for w in work:
        engine.block_manager.free(w.request.request_id)
      row = {"step": s["step"], "q": s["q"], "kv": s["kv"], "serving_s": s["execute_s"], "to_next_s": s["to_next_s"],
             "alone_s": statistics.median(times)}
      if cost is not None:
        t_pad, s_pad, p_pad = s["padded"]
        row["predicted_s"] = cost.seconds(s["q"], s["kv"], t_pad, s_pad, p_pad * ps, s["waiting"])
      rows.append(row)
    ratio = [r["serving_s"] / r["alone_s"] for r in rows]
    print(run["policy"], run["rate"], len(rows), "steps; serving / alone: median", round(statistics.median(ratio), 3),
          "p10", round(float(np.percentile(ratio, 10)), 3), "p90", round(float(np.percentile(ratio, 90)), 3),
          flush=True)
    result.append({"policy": run["policy"], "rate": run["rate"], "steps": rows})
    with open(out, "w", encoding="utf-8") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
