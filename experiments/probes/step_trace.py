# python experiments/probes/step_trace.py configs/validate_gpu.py OUT.json chunked:15 chunked:60 chunked:15:distinct ...
"""Records every step of real serving runs: what each step held (query and key lengths per sequence, the
padded shape, the queue) and how long its executor took, plus the time until the next step started. The
step-cost model's errors on serving steps (not the profiled grid's) are read from these files offline."""
import importlib.util
import json
import sys
import time

from pdopt.benchmark import config as config_lib
from pdopt.benchmark import experiment
from pdopt.benchmark.replay import replay
from pdopt.benchmark.profile_steps import _TimedExecutor
from pdopt.engine.engine import Engine
from pdopt.engine.runner import StepStatic


def trace(config, policy: str, rate: float, model, distinct_static: bool = False) -> dict:
  engine_config = config_lib.engine_config(config, policy)
  workload = experiment.build_workload(config, model, rate)
  engine = Engine(model, engine_config)
  if distinct_static:  # As before runners shared one `StepStatic`: jit compares graphs at every step.
    held = engine.executor.runner.graphdef
    engine.executor.runner.graphdef = StepStatic(held.graphdef, held.treedef)
  engine.warmup()
  engine.executor = timed = _TimedExecutor(engine.executor)
  starts, calls_at, compiled = [], [], []
  advance = engine.advance

  def recorded_advance():  # What `replay` calls for every step.
    starts.append(time.perf_counter())
    calls_at.append(len(timed.calls))
    n = engine.num_compilations
    out = advance()
    compiled.append(engine.num_compilations != n)
    return out

  engine.advance = recorded_advance
  replay(engine, workload, progress=False)
  starts.append(time.perf_counter())
  ps = engine_config.page_size
  rows = []
  for i, first in enumerate(calls_at):
    end = calls_at[i + 1] if i + 1 < len(calls_at) else len(timed.calls)
    for plan, seconds in timed.calls[first:end]:
      q = [w.num_tokens for w in plan.work]
      kv = [w.start + w.num_tokens for w in plan.work]
      shape = engine.buckets.pick(sum(q), len(q), max(-(-k // ps) for k in kv))
      rows.append({"step": i, "q": q, "kv": kv, "decode": [bool(w.is_decode) for w in plan.work],
                   "padded": list(shape), "waiting": plan.num_waiting, "execute_s": seconds,
                   "to_next_s": starts[i + 1] - starts[i], "compiled": compiled[i]})
  decode = sorted(r["execute_s"] for r in rows if all(r["decode"]) and not r["compiled"]
                  and r["padded"] == [64, 16, 64])
  print(f"{policy}:{rate}{' distinct StepStatic' if distinct_static else ''}: {len(decode)} decode steps at "
        f"(64, 16, 64), median {1e3 * decode[len(decode) // 2]:.3f} ms" if decode else "no (64, 16, 64) decodes",
        flush=True)
  return {"policy": policy, "rate": rate, "distinct_static": distinct_static, "steps": rows}


def load(path: str):
  """The experiment config in the file at `path`, and its model."""
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_lib.as_config(module.get_config())
  return config, experiment.build_model(config)


def main(path: str, out: str, *runs: str) -> None:
  config, model = load(path)
  result = []
  for run in runs:
    policy, rate, *flag = run.split(":")
    result.append(trace(config, policy, float(rate), model, distinct_static=flag == ["distinct"]))
    print(run, len(result[-1]["steps"]), "steps", flush=True)
    with open(out, "w", encoding="utf-8") as f:  # After each run: a run cut short keeps the ones before.
      json.dump(result, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
