# python experiments/probes/refit_step_costs.py \
#     pdopt/step_costs/llama-3.2-1b_h100.json pdopt/step_costs/llama-3.1-8b_h100.json
"""One-time refit of the shipped GPU cost files: their calibration replays ran steps that compiled programs
(executor times of seconds); drop those rows (> 1 s) and fit again on the rest, keeping the measured host work."""
import sys, dataclasses
from pdopt.scheduling.step_cost import StepCostModel, FEATURES
from pdopt.sim import fit as fit_lib
for path in sys.argv[1:]:
  m = StepCostModel.load(path)
  meta = dict(m.metadata)
  steps = [fit_lib.ProfiledStep({k: v for k, v in s.items() if k not in ("features", "measured_ms", "predicted_ms")},
                                tuple(s["features"]), s["measured_ms"] / 1e3) for s in meta["steps"]]
  kept = [s for s in steps if s.seconds < 1.0]
  meta.pop("steps"); meta.pop("residuals")
  meta["commit"], meta["dirty"] = "a54ad7b", True
  meta["refit"] = (f"refit on {len(kept)} of {len(steps)} steps: calibration-replay steps that compiled a program "
                   "(executor times over 1 s) dropped; later profiles leave such steps out")
  fitted = fit_lib.fit(kept, m.sizes, m.device, meta)
  host = meta["host_seconds"]
  c = list(fitted.coefficients)
  c[FEATURES.index("step")] += host["per_step"]
  c[FEATURES.index("seq")] += host["per_seq"]
  c[FEATURES.index("waiting")] += host["per_waiting"]
  out = dataclasses.replace(fitted, coefficients=tuple(c))
  out.save(path)
  print(path, out.metadata["residuals"], [round(x, 6) for x in out.coefficients])
