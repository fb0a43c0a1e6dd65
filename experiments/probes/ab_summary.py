"""Compares the runs of `ab_bench_engine.sh`: per decode batch and prefill shape, each side's values (one per
round) and the ratio of B's median to A's.

  python experiments/probes/ab_summary.py OUT_DIR
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys


def _values(path: str) -> dict[str, float]:
  data = json.load(open(path, encoding="utf-8"))
  out = {}
  for model, res in data.items():
    if model == "meta":
      continue
    for row in res.get("decode", []):
      for key in ("device_ms", "engine_step_ms", "gpu_busy_ms"):
        out[f"{model} decode B={row['batch']} {key}"] = row[key]
    for row in res.get("prefill", []):
      out[f"{model} prefill {row['prompts']}x{row['prompt_len']} ms"] = row["ms"]
  return out


def main(out_dir: str) -> None:
  sides = {side: [_values(p) for p in sorted(glob.glob(os.path.join(out_dir, f"{side}_*.json")))] for side in "ab"}
  keys = sorted(set().union(*(v.keys() for runs in sides.values() for v in runs)))
  print("| measure | A (each round) | B (each round) | B / A (medians) |\n|---|---|---|---:|")
  for key in keys:
    a = [v[key] for v in sides["a"] if key in v]
    b = [v[key] for v in sides["b"] if key in v]
    if a and b:
      ratio = statistics.median(b) / statistics.median(a)
      print(f"| {key} | {', '.join(f'{x:.4g}' for x in a)} | {', '.join(f'{x:.4g}' for x in b)} | {ratio:.3f} |")


if __name__ == "__main__":
  main(sys.argv[1])
