#!/bin/bash
# One H200: the step-cost profiles of the shipped model shapes and the decode-step baseline; on any other card
# it stops at once (exit 3), since those files are for the H200.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
case "$name" in *H200*) ;; *) exit 3 ;; esac
bash experiments/probes/profile_gpu.sh
python3 -m experiments.bench_engine --parts=decode --out=$OUT/engine_decode_h200.json > $OUT/bench_decode.log 2>&1
tail -30 $OUT/bench_decode.log
