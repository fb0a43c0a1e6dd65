#!/usr/bin/env bash
# An A/B of `experiments.bench_engine` between two source trees, in separate processes that alternate
# (A, B, A, B, ...), so that drift of the card or the host during the run hits both alike.
#
#   experiments/probes/ab_bench_engine.sh A_DIR B_DIR OUT_DIR ROUNDS [bench_engine flags...]
#
# Writes OUT_DIR/{a,b}_<round>.json (logs to LOG_DIR, default /tmp); `python experiments/probes/ab_summary.py
# OUT_DIR` compares them.
set -euo pipefail
a=$(cd "$1" && pwd); b=$(cd "$2" && pwd); out=$3; rounds=$4; shift 4
logs=${LOG_DIR:-/tmp}
mkdir -p "$out" "$logs"
for round in $(seq 1 "$rounds"); do
  for side in a b; do
    dir=${!side}
    (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" python3 -m experiments.bench_engine \
        --out="$out/${side}_${round}.json" "$@") > "$logs/${side}_${round}.log" 2>&1 \
      || { echo "side $side round $round failed:"; tail -30 "$logs/${side}_${round}.log"; exit 1; }
    echo "side $side round $round done"
  done
done
