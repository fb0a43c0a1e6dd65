# python experiments/probes/refit_host.py pdopt/step_costs/*.json
"""Refits the host terms of cost files with the current `profile_steps.fit_host` from the calibration-replay
steps each file stores; the device's terms are kept, and a file is rewritten only when its host terms change.

Files profiled since the replay records each step's host gap and submissions are refit in full. Older files
store only each replay step's running and waiting requests: where fewer than `MIN_QUEUED_STEPS` of them had a
queue, `fit_host` has no term per waiting request, so that term is set to 0 and the others are kept (the
queued steps are the only rows the old term fitted, and each would move the other terms by its weight)."""
import dataclasses
import json
import sys

import numpy as np

from pdopt.benchmark import profile_steps
from pdopt.scheduling.step_cost import FEATURES, StepCostModel

for path in sys.argv[1:]:
  model = StepCostModel.load(path)
  meta = dict(model.metadata)
  replay = [s for s in meta.get("steps", []) if s.get("replay")]
  old = profile_steps.HostWork(**meta["host_seconds"])
  queued = sum(1 for s in replay if s["waiting"])
  if replay and all("host_s" in s for s in replay):
    rows = np.asarray([(1.0, s["seqs"], s["waiting"], s.get("arrivals", 0)) for s in replay], float)
    new = profile_steps.fit_host(rows, np.asarray([s["host_s"] for s in replay]))
    how = f"refit from the {len(replay)} replay steps stored here"
  elif replay and queued < profile_steps.MIN_QUEUED_STEPS:
    new = dataclasses.replace(old, per_waiting=0.0)
    how = (f"{queued} of the {len(replay)} replay steps stored here had a queue: no term per waiting request "
           "(this file predates the replay's per-step host gaps, so the other terms are kept)")
  else:
    new, how = old, ""
  if np.allclose(dataclasses.astuple(new), dataclasses.astuple(old), rtol=1e-9, atol=0):
    print(path, "unchanged")
    continue
  c = list(model.coefficients)
  for feature, field in (("step", "per_step"), ("seq", "per_seq"), ("waiting", "per_waiting")):
    c[FEATURES.index(feature)] += getattr(new, field) - getattr(old, field)
  meta["host_seconds"] = dataclasses.asdict(new)
  meta["host_refit"] = (f"host terms by experiments/probes/refit_host.py (fit_host: no term per waiting request "
                        f"from fewer than {profile_steps.MIN_QUEUED_STEPS} queued steps): {how}; before: "
                        f"{dataclasses.asdict(old)}")
  text = open(path, encoding="utf-8").read()
  indent = len(text.split("\n")[1]) - len(text.split("\n")[1].lstrip())  # keep the file's own layout
  out = dataclasses.replace(model, coefficients=tuple(c), metadata=meta).to_json()
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(out, indent=indent) + "\n")
  print(path, "host", dataclasses.asdict(old), "->", dataclasses.asdict(new))
